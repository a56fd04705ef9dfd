"""Safe checkpoint files: flax.serialization msgpack (never pickle), written atomically.

A checkpoint is a nested dict of arrays / numbers. Readers verify it against an expected
SHA-256 (when known) and against a template tree, so a truncated, corrupted or mismatched
file fails with one clear line instead of a deep msgpack traceback.
"""

from __future__ import annotations

import hashlib
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


def save_tree(path: str | os.PathLike, tree: Any) -> str:
    """Serialize a pytree of arrays to msgpack at ``path``; returns the file's SHA-256."""
    state = serialization.to_state_dict(jax.device_get(tree))
    write_atomic(path, serialization.msgpack_serialize(state))
    return file_sha256(path)


def load_tree(
    path: str | os.PathLike, template: Any = None, expected_sha256: str | None = None
) -> Any:
    """Read a msgpack checkpoint; check its hash and, given a template, its tree and shapes.

    Returns the restored tree (the template's structure when a template is given, else a
    nested dict of numpy arrays).
    """
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
        state = serialization.msgpack_restore(raw)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({len(raw)} bytes): {type(err).__name__}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a tree of arrays")
    if template is None:
        return state
    expected = serialization.to_state_dict(template)
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
