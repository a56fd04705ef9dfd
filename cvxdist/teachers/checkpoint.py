"""Safe checkpoint files: flax.serialization msgpack (never pickle), written atomically.

A checkpoint is a nested dict of arrays / numbers. Readers verify it against an expected
SHA-256 (when known) and against a template tree, so a truncated, corrupted or mismatched
file fails with one clear line instead of a deep msgpack traceback.

Storage: ``float32`` is the plain msgpack of the tree. ``float16`` (for shipping large
teachers) rounds every float leaf to float16, splits it into its two byte planes (a
``(2, n)`` uint8 array: low bytes, then the sign/exponent bytes, which compress well) and
xz-compresses the msgpack; the reader needs the template for the shapes and returns float32.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from cvxdist.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(tree: Any) -> str:
    """Hex SHA-256 of a pytree's msgpack serialization (what `save_tree` would write)."""
    state = serialization.to_state_dict(jax.device_get(tree))
    return hashlib.sha256(serialization.msgpack_serialize(state)).hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (crash-safe)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


STORAGES = ("float32", "float16")


def _check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise CheckpointError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")


def stored_values(tree: Any, storage: str) -> Any:
    """The values a tree reads back as after saving with ``storage`` (float16: rounded)."""
    _check_storage(storage)
    if storage == "float32":
        return tree
    return jax.tree.map(lambda a: np.asarray(a, np.float16).astype(np.float32), tree)


def _to_planes(leaf: Any) -> Any:
    """A float leaf as the ``(2, n)`` uint8 byte planes of its float16 values."""
    leaf = np.asarray(leaf)
    if not np.issubdtype(leaf.dtype, np.floating):
        return leaf
    return np.ascontiguousarray(leaf.astype("<f2").reshape(-1).view(np.uint8).reshape(-1, 2).T)


def _from_planes(expected: Any, found: Any) -> Any:
    """Undo `_to_planes` where the template has a leaf of that size (as float32); anything
    else is returned as found, for the structure check to report."""
    if isinstance(found, dict):
        sub = expected if isinstance(expected, dict) else {}
        return {k: _from_planes(sub.get(k), v) for k, v in found.items()}
    size = math.prod(np.shape(expected)) if expected is not None else -1
    if isinstance(found, np.ndarray) and found.dtype == np.uint8 and found.shape == (2, size):
        values = np.ascontiguousarray(found.T).view("<f2").reshape(np.shape(expected))
        return values.astype(np.float32)
    return found


def save_tree(path: str | os.PathLike, tree: Any, storage: str = "float32") -> str:
    """Serialize a pytree of arrays to ``path`` (msgpack; see the module docstring for
    ``storage``); returns the file's SHA-256."""
    _check_storage(storage)
    state = serialization.to_state_dict(jax.device_get(tree))
    if storage == "float16":
        state = jax.tree.map(_to_planes, state)
        data = lzma.compress(serialization.msgpack_serialize(state), preset=9)
    else:
        data = serialization.msgpack_serialize(state)
    write_atomic(path, data)
    return file_sha256(path)


def load_tree(
    path: str | os.PathLike,
    template: Any = None,
    expected_sha256: str | None = None,
    storage: str = "float32",
) -> Any:
    """Read a checkpoint; check its hash and, given a template, its tree and shapes.

    Returns the restored tree (the template's structure when a template is given, else a
    nested dict of numpy arrays; ``float16`` storage needs the template and gives float32).
    """
    _check_storage(storage)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({len(raw)} bytes): its SHA-256 does "
            "not match the one recorded when it was written"
        )
    try:
        state = serialization.msgpack_restore(lzma.decompress(raw) if storage == "float16" else raw)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({len(raw)} bytes): {type(err).__name__}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a tree of arrays")
    if template is None:
        return state
    expected = serialization.to_state_dict(template)
    if storage == "float16":
        state = _from_planes(expected, state)
    _check_structure(path, expected, state)
    return serialization.from_state_dict(template, state)


def _check_structure(path: Path, expected: Any, found: Any, where: str = "") -> None:
    if isinstance(expected, dict):
        if not isinstance(found, dict) or set(expected) != set(found):
            have = sorted(found) if isinstance(found, dict) else type(found).__name__
            raise CheckpointError(
                f"checkpoint {path} does not fit the model at '{where or '/'}': "
                f"expected keys {sorted(expected)}, found {have}"
            )
        for key in expected:
            _check_structure(path, expected[key], found[key], f"{where}/{key}")
        return
    exp_shape = np.shape(expected)
    got_shape = np.shape(found)
    if exp_shape != got_shape:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model at '{where}': "
            f"expected shape {exp_shape}, found {got_shape}"
        )
