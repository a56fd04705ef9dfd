"""Read PyTorch state_dicts as numpy arrays, without torch and without running pickled code.

``torch.save`` (PyTorch ≥ 1.6) writes a zip archive: ``<root>/data.pkl`` (a pickle of the
object, whose tensors refer to storages by key) and ``<root>/data/<key>`` (each storage's raw
bytes). `read_torch_zip` unpickles ``data.pkl`` with an unpickler that resolves only the few
globals a state_dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter`` and the ``torch.*Storage`` dtype markers); anything else
fails with `TorchFileError` before it is called, and tensor views are bounds-checked against
their storage. ``.safetensors`` files are read with the ``safetensors`` package (numpy API).

A file this reader refuses (the legacy non-zip format, exotic tensor types) can be converted
where torch is installed: ``torch.save(torch.load(path, weights_only=True), new_path)``
(``weights_only=True`` keeps torch's own unpickler restricted too), or to safetensors.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cvxdist.errors import UserError


class TorchFileError(UserError, ValueError):
    """A checkpoint file that cannot be read as a state_dict of tensors."""


def _bfloat16() -> Any:
    import ml_dtypes  # installed with jax

    return ml_dtypes.bfloat16


# torch.<Name>Storage -> numpy dtype (a callable for the lazily imported bfloat16)
_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """What unpickling ``torch.FloatStorage`` etc. gives: just the dtype."""

    def __init__(self, name: str) -> None:
        dtype = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(dtype() if dtype is _bfloat16 else dtype)


def _rebuild_tensor(
    storage: np.ndarray,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: Any,
) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: a (copied) strided view of a storage."""
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise TorchFileError(f"invalid tensor layout: size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise TorchFileError(
            f"tensor of size {size} at offset {offset} reads past its storage ({storage.size})"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._root, self._byteorder = archive, root, byteorder
        self._storages: dict[str, np.ndarray] = {}  # tensors that share a storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(
            f"refusing to unpickle {module}.{name}: only tensors in (ordered) dicts are read"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"unsupported persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        try:
            raw = self._archive.read(f"{self._root}/data/{key}")
        except KeyError:
            raise TorchFileError(f"storage {key!r} is missing from the archive") from None
        stored = dtype.newbyteorder(">") if self._byteorder == "big" else dtype
        if len(raw) < numel * dtype.itemsize:
            raise TorchFileError(f"storage {key!r} is truncated")
        return np.frombuffer(raw, stored, count=numel).astype(dtype)


def read_torch_zip(path: str | os.PathLike) -> Any:
    """Unpickle a ``torch.save`` zip archive into nested dicts of numpy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise TorchFileError(
            f"{path} is not a zip-format torch checkpoint (a legacy torch.save format?); "
            "re-save it with torch.save(torch.load(path, weights_only=True), new_path)"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: expected one */data.pkl in the archive")
        root = pickles[0].removesuffix("/data.pkl")
        names = set(archive.namelist())
        order = f"{root}/byteorder"
        byteorder = archive.read(order).decode().strip() if order in names else "little"
        data = archive.read(pickles[0])
        try:
            return _RestrictedUnpickler(data, archive, root, byteorder).load()
        except TorchFileError:
            raise
        except Exception as err:
            raise TorchFileError(f"{path}: corrupt pickle ({type(err).__name__}: {err})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file (needs the ``safetensors`` package)."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise TorchFileError(
            "reading .safetensors needs the safetensors package: pip install 'cvxdist[export]'"
        ) from None
    try:
        return dict(load_file(str(path)))
    except Exception as err:
        raise TorchFileError(f"{path}: not a readable safetensors file ({err})") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat ``{name: array}`` state_dict from ``.safetensors`` or a torch zip checkpoint.

    A checkpoint that wraps the state_dict (``{"state_dict": ...}`` or ``{"model": ...}``) is
    unwrapped, and a ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise TorchFileError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = read_torch_zip(path)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise TorchFileError(f"{path} does not hold a state_dict (a dict of tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)
