"""Read a PyTorch state dict saved by `torch.save` in the legacy format, with NumPy alone.

A .pth file is a pickle, and unpickling runs whatever callables the file names: `torch.load` on a
hostile file can run any code. This reader runs none. Its unpickler resolves only the handful of
globals a tensor state dict is made of, each to a stand-in defined here (a dict, or a function that
records a tensor's shape and strides), and refuses every other global with `UnsafePickleError`
before anything is called. Tensor data is read as raw little-endian arrays with NumPy.

The legacy format (torch < 1.6, and `_use_new_zipfile_serialization=False`) is six pickles and the
data, one after another:
    magic number, protocol version, system info, the object (tensors as persistent ids of their
    storages), the list of storage keys in the order their data follows, then for each storage:
    int64 element count and the raw elements.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for something a tensor state dict never needs: it is refused, and nothing of it ran."""


class StateDictError(ValueError):
    """The file is not a legacy torch.save state dict this reader understands."""


class _Sealed:
    """Refuses the pickle BUILD opcode, which would set attributes of an object the file did not make
    (such as the shared storage types below) or of a tensor record after its checks."""

    def __setstate__(self, state):
        raise UnsafePickleError(f"The file tries to change a {type(self).__name__.lstrip('_')} object, so it is refused.")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """Stands in for torch.FloatStorage and friends: only the element type matters."""

    name: str
    dtype: np.dtype


STORAGE_TYPES = {
    name: _StorageType(name, np.dtype(dtype).newbyteorder("<"))
    for name, dtype in {
        "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
        "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
        "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    }.items()
}


class _Storage(_Sealed):
    """A storage named in the pickle; its elements are read from the file after the pickle."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key, self.type, self.numel = key, storage_type, numel
        self.data: np.ndarray | None = None


class _TensorRef(_Sealed):
    """What _rebuild_tensor_v2 returns here: where a tensor's elements lie in its storage."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if self.shape and min(self.shape) == 0:
            return np.zeros(self.shape, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
        if self.offset < 0 or any(s < 0 for s in self.strides) or last >= len(data):
            raise StateDictError(f"a tensor reaches outside its storage '{self.storage.key}'")
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.shape,
                                               tuple(s * data.itemsize for s in self.strides), writeable=False)
        return np.array(view, order="C")  # an independent, contiguous copy


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2; checks its arguments instead of trusting them."""
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or not _is_int_tuple(size) \
            or not _is_int_tuple(stride) or len(size) != len(stride) or not isinstance(requires_grad, bool) \
            or backward_hooks or metadata:
        raise StateDictError("a tensor record has arguments a plain saved tensor doesn't have")
    return _TensorRef(storage, storage_offset, size, stride)


class _StateDict(collections.OrderedDict):
    """Stands in for collections.OrderedDict (torch sets a `_metadata` attribute on state dicts)."""


# The only globals a state dict of tensors needs, each mapped to the stand-in used instead.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): storage_type for name, storage_type in STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, numbers, strings and tensor records, and nothing else."""

    def __init__(self, file, allowed: dict | None = None):
        super().__init__(file)
        self.allowed = ALLOWED_GLOBALS if allowed is None else allowed
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.allowed) or "none here"
            raise UnsafePickleError(
                f"The file asks for {module}.{name}, which a state dict of tensors never needs, so it is refused "
                f"(unpickling it could run code). Allowed: {allowed}."
            ) from None

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count, view metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"the file holds a persistent reference that is not a tensor storage: {pid!r:.100}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise StateDictError(f"a storage record is malformed: {pid!r:.100}")
        if view is not None:
            raise StateDictError("the file holds storage views, which this reader does not support")
        storage = self.storages.setdefault(key, _Storage(key, storage_type, numel))
        if storage.type != storage_type or storage.numel != numel:
            raise StateDictError(f"storage '{key}' is described two different ways")
        return storage


def _load_plain(file, what: str):
    """One of the format's bookkeeping pickles: plain data only, no globals at all."""
    try:
        return RestrictedUnpickler(file, allowed={}).load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise StateDictError(f"the file's {what} can't be read ({exc.__class__.__name__}: {exc})") from None


def read_state_dict(source: str | Path | bytes) -> dict[str, np.ndarray]:
    """A legacy torch.save file of a flat {name: tensor} state dict -> {name: NumPy array}, in the file's order.

    Raises UnsafePickleError for a file that would run code, StateDictError for anything else unexpected.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if data[:2] == b"PK":
        raise StateDictError("this is the zip torch.save format; only the legacy format is supported")
    file = io.BytesIO(data)
    if _load_plain(file, "magic number") != LEGACY_MAGIC:
        raise StateDictError("this is not a legacy torch.save file (wrong magic number)")
    if _load_plain(file, "protocol version") != LEGACY_PROTOCOL:
        raise StateDictError("this torch.save file has an unknown protocol version")
    system = _load_plain(file, "system info")
    if not isinstance(system, dict) or system.get("little_endian") is not True:
        raise StateDictError("this torch.save file was written on a big-endian machine, which is not supported")

    unpickler = RestrictedUnpickler(file)
    try:
        state = unpickler.load()
    except (UnsafePickleError, StateDictError):
        raise
    except Exception as exc:
        raise StateDictError(f"the state dict can't be read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()):
        raise StateDictError("the file does not hold a flat state dict of named tensors")

    keys = _load_plain(file, "storage list")
    if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storages) or len(set(keys)) != len(keys):
        raise StateDictError("the file's storage list does not match the tensors it holds")
    for key in keys:
        storage = unpickler.storages[key]
        header = file.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != storage.numel:
            raise StateDictError(f"the data of storage '{key}' is missing or of the wrong size (truncated file?)")
        nbytes = storage.numel * storage.type.dtype.itemsize
        raw = file.read(nbytes)
        if len(raw) != nbytes:
            raise StateDictError(f"the file ends inside storage '{key}' (truncated file?)")
        storage.data = np.frombuffer(raw, storage.type.dtype)
    if file.read(1):
        raise StateDictError("the file has data after its last storage")
    return {name: ref.to_numpy() for name, ref in state.items()}
