"""Image-classification datasets as numpy arrays.

``load_dataset(name, split, data_dir=None)`` returns a `Dataset` whose ``images`` are
``(N, H, W, C)`` float32 in ``[0, 1]`` (raw pixel intensity / max; no standardization — the
teachers standardize inside their stem) and whose ``labels`` are ``(N,)`` int32.

Names:

- ``digits``: scikit-learn's bundled 8×8×1 digits (1797 images), split into a fixed
  stratified train (1437) / test (360) partition.
- ``fashion_mnist`` / ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]`` …). Fashion-MNIST
  comes from the Debian/Ubuntu package ``dataset-fashion-mnist``; without ``data_dir`` it is
  read from the first folder that holds it: the package's system folder
  (``/usr/share/datasets/fashion-mnist``), then the user cache where ``cvxdist data fetch``
  extracts the package (`user_dataset_dir`: ``$CVXDIST_CACHE_DIR/datasets/fashion-mnist``,
  the cache defaulting to ``${XDG_CACHE_HOME:-~/.cache}/cvxdist``).
- ``idx``: any folder of IDX files given as ``data_dir``.
- ``tfds:NAME``: TensorFlow Datasets by name (``tfds:cifar10``), read from ``data_dir`` (or
  TFDS's default); never downloads. Imported lazily.

Splits are ``train`` and ``test``. `samples_per_class` draws seeded class-balanced subsets;
`holdout_split` carves a held-out part of the training images for label-free model selection.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from cvxdist.errors import UserError

#: Datasets a Debian package ships as IDX files: name -> (package, its folder below the root).
DEBIAN_DATASETS = {"fashion_mnist": ("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")}
#: Where packages are installed (`system_dataset_dir`); tests point it elsewhere.
SYSTEM_ROOT = Path("/")
FASHION_MNIST_DIR = SYSTEM_ROOT / DEBIAN_DATASETS["fashion_mnist"][1]
MNIST_DIR = Path("/usr/share/datasets/mnist")
#: Environment variable that moves cvxdist's user cache (datasets fetched without root).
CACHE_ENV = "CVXDIST_CACHE_DIR"
DATASET_NAMES = ("digits", "fashion_mnist", "mnist", "idx", "tfds:NAME")
SPLITS = ("train", "test")
# Datasets whose classes are not mirror-symmetric (no horizontal flips when augmenting).
NO_FLIP = ("digits", "mnist", "idx", "tfds:mnist", "tfds:emnist", "tfds:svhn_cropped")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to get them."""


class DatasetFormatError(UserError, ValueError):
    """A dataset file exists but is corrupt, truncated or not in the expected format."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images ``(N, H, W, C)`` float32 in [0, 1], labels ``(N,)`` int32."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str = "train"

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"images must be (N, H, W, C) and labels (N,); got {self.images.shape} "
                f"and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def hflip_ok(self) -> bool:
        """Whether horizontal flips are a label-preserving augmentation."""
        return self.name not in NO_FLIP

    def take(self, indices: np.ndarray, split: str | None = None) -> Dataset:
        """The examples at ``indices`` (in that order)."""
        indices = np.asarray(indices)
        return dataclasses.replace(
            self,
            images=self.images[indices],
            labels=self.labels[indices],
            split=split or self.split,
        )


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Load ``split`` of dataset ``name`` (see the module docstring for names)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "digits":
        return _load_digits(split)
    if name.startswith("tfds:"):
        return _load_tfds(name, name.removeprefix("tfds:"), split, data_dir)
    if name in ("fashion_mnist", "mnist", "idx"):
        if data_dir is not None:
            folder = Path(data_dir)
        elif name in DEBIAN_DATASETS:
            folder = find_dataset_folder(name)
            if folder is None:
                searched = " nor ".join(str(f) for f in dataset_folders(name))
                raise DatasetNotFoundError(
                    f"dataset {name!r} is not in {searched}; {_how_to_get(name)}"
                )
        elif name == "mnist":
            folder = MNIST_DIR
        else:
            raise UserError("dataset 'idx' needs a data_dir (a folder of IDX files)")
        return load_idx_folder(folder, split, name=name)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def cache_dir() -> Path:
    """cvxdist's user cache: ``$CVXDIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/cvxdist``
    (``~/.cache/cvxdist`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cvxdist"


def system_dataset_dir(name: str) -> Path:
    """Where the Debian package of dataset ``name`` installs its IDX files."""
    return SYSTEM_ROOT / DEBIAN_DATASETS[name][1]


def user_dataset_dir(name: str) -> Path:
    """Where ``cvxdist data fetch NAME`` extracts a dataset's package without root."""
    return cache_dir() / "datasets" / Path(DEBIAN_DATASETS[name][1]).name


def dataset_folders(name: str) -> tuple[Path, Path]:
    """The folders searched for a packaged dataset, in order: system, then user cache."""
    return system_dataset_dir(name), user_dataset_dir(name)


def holds_idx_dataset(folder: Path) -> bool:
    """Whether ``folder`` has the four IDX files of a train and a test split."""
    return all(
        _find_idx(Path(folder), f"{_IDX_PREFIX[split]}-{kind}-ubyte") is not None
        for split in SPLITS
        for kind in ("images-idx3", "labels-idx1")
    )


def find_dataset_folder(name: str) -> Path | None:
    """The first of `dataset_folders` that holds dataset ``name``, or ``None``."""
    return next((f for f in dataset_folders(name) if holds_idx_dataset(f)), None)


# ----------------------------------------------------------------------------- digits


def _load_digits(split: str) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    labels = bunch.target.astype(np.int32)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=0.2, random_state=0, stratify=labels)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return Dataset(images[chosen], labels[chosen], 10, "digits", split)


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz"):
        path = folder / candidate
        if path.exists():
            return path
    # Also accept the dotted spelling some mirrors use (train-images.idx3-ubyte).
    dotted = stem.replace("-idx", ".idx")
    for candidate in (dotted, dotted + ".gz"):
        path = folder / candidate
        if path.exists():
            return path
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array with its declared shape."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"IDX file {path} is truncated (incomplete header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "longer than its header says"
        raise DatasetFormatError(
            f"IDX file {path} is {kind}: header {shape} needs {expected} bytes, found {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _how_to_get(name: str) -> str:
    if name in DEBIAN_DATASETS:
        return (
            f"run `cvxdist data fetch {name}` (or `apt-get install {DEBIAN_DATASETS[name][0]}`) "
            "or pass --data-dir with its IDX files"
        )
    if name == "mnist":
        return "pass --data-dir with the MNIST IDX files, or use tfds:mnist with a TFDS data_dir"
    return "pass --data-dir with the IDX files"


def load_idx_folder(folder: str | os.PathLike, split: str = "train", name: str = "idx") -> Dataset:
    """Load ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``folder``."""
    folder = Path(folder)
    prefix = _IDX_PREFIX[split]
    image_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if image_path is None or label_path is None:
        missing = f"{prefix}-{'images-idx3' if image_path is None else 'labels-idx1'}-ubyte[.gz]"
        raise DatasetNotFoundError(
            f"dataset {name!r}: no {missing} in {folder}; {_how_to_get(name)}"
        )
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetFormatError(
            f"IDX files in {folder} disagree: images {images.shape}, labels {labels.shape}"
        )
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    labels = labels.astype(np.int32)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if name in ("fashion_mnist", "mnist"):
        num_classes = 10
    return Dataset((images / scale).astype(np.float32), labels, num_classes, name, split)


# ----------------------------------------------------------------------------- TFDS


def _load_tfds(full_name: str, tfds_name: str, split: str, data_dir) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(
            "TFDS datasets need tensorflow-datasets and tensorflow: pip install 'cvxdist[data]'"
        ) from None
    try:
        builder = tfds.builder(tfds_name, data_dir=None if data_dir is None else str(data_dir))
    except Exception as err:  # tfds raises DatasetNotFoundError and others
        raise UserError(f"unknown TFDS dataset {tfds_name!r}: {err}".splitlines()[0]) from None
    try:
        data = builder.as_dataset(split=split, batch_size=1024, as_supervised=True)
    except AssertionError:
        raise DatasetNotFoundError(
            f"TFDS dataset {tfds_name!r} is not prepared in {builder.data_dir}; prepare it on "
            "a machine with network access (tfds build) and pass that data_dir"
        ) from None
    batches = list(tfds.as_numpy(data))
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if images.ndim == 3:
        images = images[..., None]
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    num_classes = int(builder.info.features["label"].num_classes)
    return Dataset(
        (images / scale).astype(np.float32),
        np.asarray(labels).astype(np.int32),
        num_classes,
        full_name,
        split,
    )


# ----------------------------------------------------------------------------- subsets


def samples_per_class(dataset: Dataset, per_class: int | None, seed: int = 0) -> Dataset:
    """A class-balanced subset with ``per_class`` images of each class (``None`` = all).

    Reproducible from ``seed``; classes with fewer images contribute all they have. The
    result keeps the original order of the chosen images.
    """
    if per_class is None:
        return dataset
    if per_class < 1:
        raise UserError(f"samples per class must be positive, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == label)
        take = min(per_class, len(members))
        chosen.append(rng.choice(members, size=take, replace=False))
    return dataset.take(np.sort(np.concatenate(chosen)))


def holdout_split(
    dataset: Dataset, fraction: float = 0.1, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into (rest, held-out) with ``fraction`` of it held out, seeded.

    Use the held-out part of the *training* images for label-free model selection (e.g.
    choosing λ by the teacher-agreement of the held-out block outputs).
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"holdout fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    count = max(1, round(fraction * len(dataset)))
    held, rest = np.sort(order[:count]), np.sort(order[count:])
    return dataset.take(rest), dataset.take(held, split=f"{dataset.split}-holdout")
