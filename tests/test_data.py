"""Dataset loaders: digits, IDX folders (written here), mock TFDS, subsets, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    find_dataset_folder,
    holdout_split,
    load_dataset,
    read_idx,
    samples_per_class,
)
from cvxdist.errors import UserError


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (magic 0x08, ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_folder(folder, n_train=30, n_test=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 5, 6), dtype=np.uint8)
        labels = rng.integers(0, 3, size=n, dtype=np.uint8)
        labels[:3] = [0, 1, 2]
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = _idx_bytes(array)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[prefix] = (images, labels)
    return arrays


def test_digits_splits_are_a_fixed_partition():
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert 0.0 <= train.images.min() and train.images.max() == 1.0
    assert train.num_classes == 10 and set(np.unique(test.labels)) == set(range(10))
    # no test image appears among the training images
    train_rows = {row.tobytes() for row in train.images.reshape(len(train), -1)}
    overlap = sum(row.tobytes() in train_rows for row in test.images.reshape(len(test), -1))
    assert overlap < 5  # digits has a few exact duplicates, not a shared split
    again = load_dataset("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = _write_idx_folder(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_dataset("idx", split, data_dir=tmp_path)
        images, labels = arrays[prefix]
        assert data.images.shape == (*images.shape, 1)
        np.testing.assert_allclose(data.images[..., 0], images / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.num_classes == 3 and not data.hflip_ok


def test_fashion_mnist_name_reads_any_idx_folder(tmp_path):
    _write_idx_folder(tmp_path)
    data = load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    assert data.name == "fashion_mnist" and data.num_classes == 10 and data.hflip_ok


def test_truncated_idx_gives_a_clear_error(tmp_path):
    _write_idx_folder(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetFormatError, match="truncated"):
        load_dataset("idx", "train", data_dir=tmp_path)


def test_corrupt_gzip_and_bad_magic_give_clear_errors(tmp_path):
    _write_idx_folder(tmp_path, gz=True)
    gz_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz_path.write_bytes(gz_path.read_bytes()[:-12])
    with pytest.raises(DatasetFormatError, match="t10k-labels"):
        load_dataset("idx", "test", data_dir=tmp_path)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(bad)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="data-dir"):
        load_dataset("mnist", "train", data_dir=tmp_path)


def test_missing_dataset_is_one_line_and_exit_2_on_the_command_line(tmp_path, capsys):
    code = main(
        [
            "teacher", "train", "--model", "small_cnn", "--dataset", "fashion_mnist",
            "--epochs", "1", "--out", str(tmp_path / "t"), "--data-dir", str(tmp_path),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "dataset-fashion-mnist" in err
    assert not (tmp_path / "t").exists()


def test_unknown_dataset_and_split_are_rejected():
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet_from_nowhere")
    with pytest.raises(UserError, match="unknown split"):
        load_dataset("digits", "validation")


@pytest.mark.skipif(
    find_dataset_folder("fashion_mnist") is None,
    reason="Fashion-MNIST is not there: `make test` fetches it (`cvxdist data fetch`)",
)
def test_fashion_mnist_default_location():
    test = load_dataset("fashion_mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_samples_per_class_is_balanced_and_seeded():
    train = load_dataset("digits", "train")
    sub = samples_per_class(train, 7, seed=3)
    assert np.bincount(sub.labels, minlength=10).tolist() == [7] * 10
    same = samples_per_class(train, 7, seed=3)
    other = samples_per_class(train, 7, seed=4)
    np.testing.assert_array_equal(sub.images, same.images)
    assert not np.array_equal(sub.images, other.images)
    assert samples_per_class(train, None) is train
    huge = samples_per_class(train, 10_000)
    assert len(huge) == len(train)


def test_holdout_split_partitions_the_training_images():
    train = load_dataset("digits", "train")
    rest, held = holdout_split(train, 0.2, seed=1)
    assert len(held) == round(0.2 * len(train)) and len(rest) + len(held) == len(train)
    assert held.split == "train-holdout"
    combined = np.concatenate([rest.images, held.images]).reshape(len(train), -1)
    key = np.lexsort(combined.T)
    ref = train.images.reshape(len(train), -1)
    np.testing.assert_array_equal(combined[key], ref[np.lexsort(ref.T)])
    _, held2 = holdout_split(train, 0.2, seed=1)
    np.testing.assert_array_equal(held.labels, held2.labels)


def test_mock_tfds_loads_without_downloading(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    with tfds.testing.mock_data(num_examples=12):
        data = load_dataset("tfds:cifar10", "train", data_dir=tmp_path)
    assert data.images.shape == (12, 32, 32, 3) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() <= data.images.max() <= 1.0
    assert data.labels.shape == (12,) and data.num_classes == 10 and data.hflip_ok
    assert data.name == "tfds:cifar10"
    with pytest.raises(DatasetNotFoundError, match="not prepared"):
        load_dataset("tfds:cifar10", "test", data_dir=tmp_path)
