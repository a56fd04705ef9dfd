"""Block activations of a teacher as convex-problem rows, streamed in bounded chunks.

For a teacher, a block ``cut..to`` and a set of images:

- `stream_blocks` yields ``(z, y)`` per batch: the block input ``z = prefix(x)`` and the block
  output ``y = block(z)`` (numpy, ``(B, H, W, C)`` or ``(B, classes)`` after ``head``);
- `stream_rows` yields `RowChunk` s of problem rows and targets, either
  ``rows="patch"`` (conv student: one row per output location) or ``rows="pooled"`` (head
  student: global-average-pooled block input, target = block output, e.g. the logits).

Every chunk comes from one batch of images, so memory stays flat whatever the dataset size;
``collect_rows`` concatenates them when the caller wants one array. An optional disk cache
(``cache_dir``) stores the chunks as ``.npz`` (loaded with ``allow_pickle=False``), keyed by
the teacher checkpoint's SHA-256, the cut pair, a fingerprint of the images and the row
settings.

Patch-row feature order
-----------------------
For a block with input ``z (B, H, W, C_in)`` and output ``y (B, H_out, W_out, C_out)``, the
stride is ``s = H / H_out`` (inferred; must be an integer, the same for W) and each row is the
``k×k`` patch of ``z`` (``SAME`` zero padding, as in the teachers' own convolutions) centred
on the output location, flattened in ``(kh, kw, C_in)`` order::

    feature index = (i * k + j) * C_in + c        (i, j: kernel row/column, c: channel)

so a conv kernel in Flax's HWIO layout ``W (k, k, C_in, C_out)`` acts on rows as
``rows @ W.reshape(k * k * C_in, C_out)`` and a row-space weight matrix ``U (k*k*C_in, C_out)``
is the conv kernel ``U.reshape(k, k, C_in, C_out)``. Rows are ordered (image, row, column):
``rows.reshape(B, H_out, W_out, -1)`` recovers the spatial layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.errors import UserError
from cvxdist.teachers.teacher import Teacher, batched_apply

ROW_KINDS = ("patch", "pooled")
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RowChunk:
    """``rows (n, d)`` and ``targets (n, c)`` float32 from one batch of images."""

    rows: np.ndarray
    targets: np.ndarray


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


def pooled_rows(z: jnp.ndarray, y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rows ``(B, C_in)``: ``z`` average-pooled; targets ``(B, c)``: ``y`` (pooled if 4-D)."""
    rows = z.mean(axis=(1, 2)) if z.ndim == 4 else z.reshape(z.shape[0], -1)
    targets = y.mean(axis=(1, 2)) if y.ndim == 4 else y.reshape(y.shape[0], -1)
    return rows, targets


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


def _row_settings(kind: str, kernel_size: int, stride: int | None) -> dict[str, Any]:
    if kind not in ROW_KINDS:
        raise UserError(f"unknown row kind {kind!r}; choose one of {', '.join(ROW_KINDS)}")
    if kind == "pooled":
        return {"rows": kind}
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError(f"patch kernel size must be a positive odd number, got {kernel_size}")
    return {"rows": kind, "kernel_size": kernel_size, "stride": stride}


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


def stream_rows(
    teacher: Teacher,
    images: np.ndarray,
    cut: str,
    to: str | None = None,
    rows: str = "patch",
    kernel_size: int = 3,
    stride: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[RowChunk]:
    """Yield `RowChunk` s for block ``cut..to`` of ``teacher`` over ``images``.

    One chunk per batch of ``batch_size`` images: ``batch·H_out·W_out`` patch rows, or
    ``batch`` pooled rows. With ``cache_dir`` the chunks are read from, or written to, a
    cache entry there (written to a temporary folder and renamed when complete, so an
    interrupted stream leaves no partial entry).
    """
    settings = _row_settings(rows, kernel_size, stride)
    if cache_dir is None:
        yield from _compute_rows(teacher, images, cut, to, settings, batch_size, progress)
        return
    key = cache_key(teacher, cut, to, images_fingerprint(images), settings, batch_size)
    entry = Path(cache_dir) / key
    if (entry / "manifest.json").is_file():
        yield from _read_cache(entry, progress)
        return
    tmp = entry.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    total_rows = 0
    for chunk in _compute_rows(teacher, images, cut, to, settings, batch_size, progress):
        np.savez(tmp / f"chunk_{count:06d}.npz", rows=chunk.rows, targets=chunk.targets)
        count += 1
        total_rows += len(chunk.rows)
        yield chunk
    manifest = {"chunks": count, "rows": total_rows, "cut": cut, "to": to or cut, **settings}
    (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)


def _compute_rows(
    teacher: Teacher,
    images: np.ndarray,
    cut: str,
    to: str | None,
    settings: dict[str, Any],
    batch_size: int,
    progress: bool,
) -> Iterator[RowChunk]:
    io = _block_io(teacher, cut, to)
    if settings["rows"] == "pooled":

        def compute(variables, x):
            return pooled_rows(*io(variables, x))

    else:

        def compute(variables, x):
            z, y = io(variables, x)
            s = settings["stride"] or infer_stride(z.shape[1:3], y.shape[1:3])
            patches = image_patches(z, settings["kernel_size"], s)
            if patches.shape[1:3] != y.shape[1:3]:
                raise UserError(
                    f"stride {s} gives {patches.shape[1:3]} output locations but the "
                    f"block output is {y.shape[1:3]}"
                )
            return patches, y  # per image, so padded images can be trimmed

    desc = f"rows {cut}..{to or cut}"
    fn = jax.jit(compute)
    for rows, targets in batched_apply(fn, teacher.variables, images, batch_size, progress, desc):
        yield RowChunk(
            rows.reshape(-1, rows.shape[-1]).astype(np.float32, copy=False),
            targets.reshape(-1, targets.shape[-1]).astype(np.float32, copy=False),
        )


def _read_cache(entry: Path, progress: bool) -> Iterator[RowChunk]:
    from tqdm.auto import tqdm

    manifest = json.loads((entry / "manifest.json").read_text())
    for i in tqdm(range(manifest["chunks"]), desc="cached rows", disable=not progress, leave=False):
        path = entry / f"chunk_{i:06d}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                yield RowChunk(data["rows"], data["targets"])
        except (OSError, ValueError, KeyError) as err:
            raise UserError(
                f"row cache {entry} is damaged ({path.name}: {err}); delete it"
            ) from None


def collect_rows(
    teacher: Teacher, images: np.ndarray, cut: str, to: str | None = None, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """All rows and targets of `stream_rows` concatenated: ``(N_rows, d)``, ``(N_rows, c)``.

    Memory grows with the number of images: prefer iterating `stream_rows` for large sets.
    """
    chunks = list(stream_rows(teacher, images, cut, to, **kwargs))
    if not chunks:
        raise UserError("no images to stream")
    return (
        np.concatenate([c.rows for c in chunks]),
        np.concatenate([c.targets for c in chunks]),
    )
