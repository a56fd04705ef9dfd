"""Block activations of a teacher, streamed per chunk of whole images.

One activation path serves every data term of a distillation (DESIGN §2a). For a teacher, a
block ``cut..to`` and a set of images, `stream_activations` yields `ImageActivations` chunks,
each holding **whole images** with their ids:

- ``rows (B, L, D)``: the student's input rows at each of the block's ``L`` output locations,
  ``rows="patch"`` (the ``k×k`` patch of the block input ``z`` centred there; conv students)
  or ``rows="pooled"`` (``L = 1``: the global-average-pooled block input; head students);
- ``targets (B, L, C)``: the teacher's block output there (``y - z`` with ``identity``);
- ``logits (B, k)`` (``logits=True``): the teacher's own logits;
- ``jacobian (B, k, L·C)`` (``jacobian=True``): ``J_n = ∂ logits / ∂ y`` at the teacher's
  block output ``y_n`` (one reverse pass per class), the Gauss–Newton readout.

The block input may come through an already replaced prefix (``input_fn``); the targets,
logits and Jacobians always come from the teacher's own path. Subsampling picks images, not
rows (`select_images`), so every data term sees whole images. Memory stays one chunk of
images; `collect_activations` concatenates them when the caller wants one array. An optional
disk cache (``cache_dir``) stores the chunks as ``.npz`` (loaded with ``allow_pickle=False``),
keyed by the teacher checkpoint's SHA-256, the cut pair, a fingerprint of the images and the
settings; an entry is written to a temporary folder and renamed when complete.

Patch-row feature order
-----------------------
For a block with input ``z (B, H, W, C_in)`` and output ``y (B, H_out, W_out, C_out)``, the
stride is ``s = H / H_out`` (inferred; must be an integer, the same for W) and each row is the
``k×k`` patch of ``z`` (``SAME`` zero padding, as in the teachers' own convolutions) centred
on the output location, flattened in ``(kh, kw, C_in)`` order::

    feature index = (i * k + j) * C_in + c        (i, j: kernel row/column, c: channel)

so a conv kernel in Flax's HWIO layout ``W (k, k, C_in, C_out)`` acts on rows as
``rows @ W.reshape(k * k * C_in, C_out)`` and a row-space weight matrix ``U (k*k*C_in, C_out)``
is the conv kernel ``U.reshape(k, k, C_in, C_out)``. Locations are ordered (row, column):
``rows.reshape(B, H_out, W_out, -1)`` recovers the spatial layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.errors import UserError
from cvxdist.teachers.teacher import Teacher, batched_apply

ROW_KINDS = ("patch", "pooled")
CACHE_VERSION = 2
#: The fields of `ImageActivations` that hold arrays over images (axis 0).
_FIELDS = ("image_ids", "rows", "targets", "logits", "jacobian")


@dataclasses.dataclass(frozen=True)
class ImageActivations:
    """Activations of a block for whole images (see the module docstring).

    Attributes:
        image_ids: ``(B,)`` indices of the images in the array that was streamed.
        rows: ``(B, L, D)`` float32 student input rows per output location.
        targets: ``(B, L, C)`` float32 teacher block outputs (``y - z`` with ``identity``).
        logits: ``(B, k)`` the teacher's logits, or ``None``.
        jacobian: ``(B, k, L·C)`` ``∂ logits / ∂ y`` at the teacher's ``y``, or ``None``.
    """

    image_ids: np.ndarray
    rows: np.ndarray
    targets: np.ndarray
    logits: np.ndarray | None = None
    jacobian: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def locations(self) -> int:
        """``L``: output locations (rows) per image."""
        return self.rows.shape[1]

    def flat_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``(B·L, D)`` and targets ``(B·L, C)``, image by image."""
        return (
            self.rows.reshape(-1, self.rows.shape[-1]),
            self.targets.reshape(-1, self.targets.shape[-1]),
        )

    @staticmethod
    def concatenate(chunks: Sequence[ImageActivations]) -> ImageActivations:
        """The chunks as one (in order)."""
        if not chunks:
            raise UserError("no images to stream")
        joined = {}
        for name in _FIELDS:
            parts = [getattr(c, name) for c in chunks]
            joined[name] = None if parts[0] is None else np.concatenate(parts)
        return ImageActivations(**joined)


def select_images(num_images: int, max_images: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``max_images`` images (all when ``None`` or more).

    Subsampling picks images, never rows: every selected image keeps all its locations.
    """
    if max_images is not None and max_images < 1:
        raise UserError(f"the number of images must be at least 1, got {max_images}")
    if max_images is None or max_images >= num_images:
        return np.arange(num_images)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_images, max_images, replace=False))


def infer_stride(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """The block's spatial stride: ``ceil``-consistent ratio of input to output size."""
    strides = set()
    for size_in, size_out in zip(in_hw, out_hw):
        stride = max(1, round(size_in / size_out))
        if -(-size_in // stride) != size_out:
            raise UserError(
                f"block maps spatial size {tuple(in_hw)} to {tuple(out_hw)}: not a strided "
                "SAME convolution, so patch rows cannot match it; use pooled rows"
            )
        strides.add(stride)
    if len(strides) != 1:
        raise UserError(
            f"block has different strides along H and W: {tuple(in_hw)} -> {tuple(out_hw)}"
        )
    return strides.pop()


def image_patches(z: jnp.ndarray, kernel_size: int, stride: int = 1) -> jnp.ndarray:
    """``k×k`` SAME-padded patches of ``z (B, H, W, C)``: ``(B, ceil(H/s), ceil(W/s), k*k*C)``.

    Features in ``(kh, kw, C)`` order (see the module docstring), matching HWIO kernels.
    """
    b, _, _, c = z.shape
    k = kernel_size
    patches = jax.lax.conv_general_dilated_patches(
        z,
        filter_shape=(k, k),
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    # conv_general_dilated_patches orders features (C, kh, kw); reorder to (kh, kw, C).
    ho, wo = patches.shape[1:3]
    return patches.reshape(b, ho, wo, c, k * k).swapaxes(-1, -2).reshape(b, ho, wo, k * k * c)


def patch_rows(
    z: jnp.ndarray, y: jnp.ndarray, kernel_size: int = 3, stride: int | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rows ``(B*H_out*W_out, k*k*C_in)`` and targets ``(B*H_out*W_out, C_out)``.

    ``z (B, H, W, C_in)`` is the block input, ``y (B, H_out, W_out, C_out)`` its output;
    ``stride`` defaults to the one inferred from the shapes.
    """
    if z.ndim != 4 or y.ndim != 4:
        raise UserError(
            f"patch rows need 4-D block input and output, got {z.shape} -> {y.shape}; "
            "use pooled rows for a head block"
        )
    if stride is None:
        stride = infer_stride(z.shape[1:3], y.shape[1:3])
    patches = image_patches(z, kernel_size, stride)
    if patches.shape[1:3] != y.shape[1:3]:
        raise UserError(
            f"stride {stride} gives {patches.shape[1:3]} output locations but the block "
            f"output is {y.shape[1:3]}"
        )
    return patches.reshape(-1, patches.shape[-1]), y.reshape(-1, y.shape[-1])


def _block_io(teacher: Teacher, cut: str, to: str | None):
    fns = teacher.cut_functions(cut, to)

    def io(variables: Any, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        z = fns.prefix(variables, x)
        return z, fns.block(variables, z)

    return io


def stream_blocks(
    teacher: Teacher,
    images: np.ndarray,
    cut: str,
    to: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(block input, block output)`` per batch of ``images (N, H, W, C)``."""
    io = jax.jit(_block_io(teacher, cut, to))
    desc = f"block {cut}..{to or cut}"
    yield from batched_apply(io, teacher.variables, images, batch_size, progress, desc)


def _settings(
    kind: str, kernel_size: int, stride: int | None, identity: bool, logits: bool, jacobian: bool
) -> dict[str, Any]:
    if kind not in ROW_KINDS:
        raise UserError(f"unknown row kind {kind!r}; choose one of {', '.join(ROW_KINDS)}")
    settings = {"rows": kind, "identity": identity, "logits": logits, "jacobian": jacobian}
    if kind == "pooled":
        return settings
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError(f"patch kernel size must be a positive odd number, got {kernel_size}")
    return {**settings, "kernel_size": kernel_size, "stride": stride}


def cache_key(
    teacher: Teacher,
    cut: str,
    to: str | None,
    images_fingerprint: str,
    settings: dict[str, Any],
    batch_size: int,
) -> str:
    """Hex key of a row cache entry (teacher checkpoint, cut pair, images, row settings)."""
    start, stop = teacher.resolve(cut, to)
    payload = {
        "version": CACHE_VERSION,
        "teacher_sha256": teacher.checkpoint_sha256,
        "cut": teacher.segments[start],
        "to": teacher.segments[stop],
        "images": images_fingerprint,
        "batch_size": batch_size,
        **settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def images_fingerprint(images: np.ndarray) -> str:
    """Content hash of an image array (shape and bytes)."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def stream_activations(
    teacher: Teacher,
    images: np.ndarray,
    cut: str,
    to: str | None = None,
    *,
    image_ids: np.ndarray | None = None,
    input_fn: Callable[[Any, jnp.ndarray], jnp.ndarray] | None = None,
    rows: str = "patch",
    kernel_size: int = 3,
    stride: int | None = None,
    identity: bool = False,
    logits: bool = False,
    jacobian: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[ImageActivations]:
    """Yield `ImageActivations` of block ``cut..to`` for ``images[image_ids]``, batch by batch.

    Args:
        image_ids: which images (default: all), e.g. from `select_images`.
        input_fn: ``f(variables, x) -> z``, the block input through an already replaced
            prefix (default: the teacher's prefix). The cache is not used with it.
        identity: targets are ``y - z`` (students that add their input back); needs a block
            that keeps its shape.
        logits, jacobian: also yield the teacher's logits / ``∂ logits / ∂ y``.
    """
    settings = _settings(rows, kernel_size, stride, identity, logits, jacobian)
    ids = np.arange(len(images)) if image_ids is None else np.asarray(image_ids, np.int64)
    compute = _activation_fn(teacher, cut, to, settings, input_fn)
    if cache_dir is None or input_fn is not None:
        yield from _compute(compute, teacher, images, ids, batch_size, progress, cut, to)
        return
    fingerprint = images_fingerprint(images) + images_fingerprint(ids)
    key = cache_key(teacher, cut, to, fingerprint, settings, batch_size)
    entry = Path(cache_dir) / key
    if (entry / "manifest.json").is_file():
        yield from _read_cache(entry, progress)
        return
    tmp = entry.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    for chunk in _compute(compute, teacher, images, ids, batch_size, progress, cut, to):
        arrays = {k: getattr(chunk, k) for k in _FIELDS if getattr(chunk, k) is not None}
        np.savez(tmp / f"chunk_{count:06d}.npz", **arrays)
        count += 1
        yield chunk
    manifest = {"chunks": count, "images": len(ids), "cut": cut, "to": to or cut, **settings}
    (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)


def collect_activations(
    teacher: Teacher, images: np.ndarray, cut: str, to: str | None = None, **kwargs: Any
) -> ImageActivations:
    """All chunks of `stream_activations` as one `ImageActivations`.

    Memory grows with the number of images: iterate `stream_activations` for large sets.
    """
    return ImageActivations.concatenate(
        list(stream_activations(teacher, images, cut, to, **kwargs))
    )


def _activation_fn(
    teacher: Teacher,
    cut: str,
    to: str | None,
    settings: dict[str, Any],
    input_fn: Callable[[Any, jnp.ndarray], jnp.ndarray] | None,
) -> Callable[[Any, jnp.ndarray], dict[str, jnp.ndarray]]:
    """``f(variables, x)``: the arrays of `ImageActivations` for a batch (jitted)."""
    fns = teacher.cut_functions(cut, to)
    input_fn = input_fn or fns.prefix
    pooled = settings["rows"] == "pooled"

    def compute(variables: Any, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        z = input_fn(variables, x)
        y = fns.block(variables, fns.prefix(variables, x))
        out: dict[str, jnp.ndarray] = {}
        if settings["logits"]:
            out["logits"] = fns.suffix(variables, y)
        if settings["jacobian"]:
            out["jacobian"] = _suffix_jacobian(fns.suffix, variables, y)
        if settings["identity"]:
            if z.shape != y.shape:
                raise UserError(
                    f"an identity shortcut needs a block that keeps its shape, got "
                    f"{z.shape[1:]} -> {y.shape[1:]}"
                )
            y = y - z
        if pooled:
            rows = z.mean(axis=(1, 2)) if z.ndim == 4 else z.reshape(z.shape[0], -1)
            out["rows"] = rows[:, None, :]
            out["targets"] = (y.mean(axis=(1, 2)) if y.ndim == 4 else y)[:, None, :]
            return out
        if z.ndim != 4 or y.ndim != 4:
            raise UserError(
                f"patch rows need 4-D block input and output, got {z.shape} -> {y.shape}; "
                "use pooled rows for a head block"
            )
        s = settings["stride"] or infer_stride(z.shape[1:3], y.shape[1:3])
        patches = image_patches(z, settings["kernel_size"], s)
        if patches.shape[1:3] != y.shape[1:3]:
            raise UserError(
                f"stride {s} gives {patches.shape[1:3]} output locations but the block output "
                f"is {y.shape[1:3]}"
            )
        out["rows"] = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        out["targets"] = y.reshape(y.shape[0], -1, y.shape[-1])
        return out

    return jax.jit(compute)


def _suffix_jacobian(suffix: Callable, variables: Any, y: jnp.ndarray) -> jnp.ndarray:
    """``(B, k, L·C)``: ``∂ suffix(y_n) / ∂ y_n`` per image (one VJP per class; BatchNorm is
    in inference mode, so images do not interact)."""

    def one(y_n: jnp.ndarray) -> jnp.ndarray:
        logits, vjp = jax.vjp(lambda a: suffix(variables, a[None])[0], y_n)
        (rows,) = jax.vmap(vjp)(jnp.eye(logits.shape[0], dtype=logits.dtype))
        return rows.reshape(logits.shape[0], -1)

    return jax.vmap(one)(y)


def _compute(
    compute: Callable,
    teacher: Teacher,
    images: np.ndarray,
    ids: np.ndarray,
    batch_size: int,
    progress: bool,
    cut: str,
    to: str | None,
) -> Iterator[ImageActivations]:
    desc = f"activations {cut}..{to or cut}"
    size = max(1, min(batch_size, len(ids)))
    for begin, out in zip(
        range(0, len(ids), size),
        batched_apply(compute, teacher.variables, _Gather(images, ids), size, progress, desc),
    ):
        chunk_ids = ids[begin : begin + size]
        arrays = {k: np.asarray(v, np.float32) for k, v in out.items()}
        yield ImageActivations(chunk_ids, **arrays)


class _Gather:
    """``images[ids]`` sliced lazily (so a subset of a large array is never copied whole)."""

    def __init__(self, images: np.ndarray, ids: np.ndarray) -> None:
        self.images, self.ids = images, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.asarray(self.images[self.ids[index]])


def _read_cache(entry: Path, progress: bool) -> Iterator[ImageActivations]:
    from tqdm.auto import tqdm

    manifest = json.loads((entry / "manifest.json").read_text())
    for i in tqdm(range(manifest["chunks"]), desc="cached rows", disable=not progress, leave=False):
        path = entry / f"chunk_{i:06d}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                yield ImageActivations(**{k: data[k] for k in data.files})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"activation cache {entry} is damaged ({path.name}: {err}); delete it"
            ) from None
