"""Reading a pickled torch module without running any of it: DALL-E's published encoder.pkl.

`torch.save(module)` pickles the module object itself, so loading it the usual way imports the classes
the file names (`dall_e.encoder.Encoder`, ...) and calls whatever the pickle asks for: a file can run
any command that way (ssl_vit.checkpoint.read_checkpoint refuses such files). Here a `pickle.Unpickler`
answers only the names such a file needs, each with something inert of our own:

    dall_e.encoder.Encoder, dall_e.encoder.EncoderBlock,      stand-ins that record their state (the
    dall_e.utils.Conv2d, torch.nn's Sequential, ReLU,         pickled __dict__: parameters, buffers,
    MaxPool2d, Identity                                       submodules, attributes); never imported
    torch._utils._rebuild_tensor_v2, _rebuild_parameter       functions of ours that record (storage,
                                                              offset, size, stride) and check that no
                                                              hooks come with the tensor
    torch.FloatStorage, HalfStorage, ...                      the storage's dtype
    torch.device                                              its name
    collections.OrderedDict, builtins.set                     the containers of a module's state

and refuses every other name (`RefusedPickle`, naming it) before anything is called. The tensors'
bytes are read from the file as data: from the archive's `data/<key>` entries (torch >= 1.6's zip
format) or from after the pickle (torch's legacy format: numel as int64, then the bytes).

A few bytes of pickle can describe a tensor of any size (a stride of 0 repeats one number 2^40 times),
so nothing is read or copied before the numbers are checked against what the file holds: every tensor
must lie inside its storage, each of its numbers a distinct element (no zero strides, no overlapping
dimensions); each storage's declared size must be the bytes the file has for it; and neither the
storages nor the tensors copied out of them may take more bytes than the whole file.
"""
from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch

MODULE_CLASSES = {
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"), ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.linear", "Identity"),
}
STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
LEGACY_MAGIC, LEGACY_VERSION = 0x1950A86A20F9469CFC6C, 1001   # torch/serialization.py's MAGIC_NUMBER, PROTOCOL_VERSION


class RefusedPickle(pickle.UnpicklingError):
    """The file asked for something this reader does not allow; nothing of it was run."""


# -------------------------------------------------------------------------------------------
# what the allowed names become


class RecordedModule:
    """A pickled module's stand-in: its class name and the state (its __dict__) the pickle gave it."""
    type_name: ClassVar[str] = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise RefusedPickle(f"{self.type_name}: expected a module's state (a dict), got {type(state).__name__}")
        self.state = state

    @property
    def attributes(self) -> dict[str, Any]:
        """The plain values among its state (the encoder's n_hid, vocab_size, ...)."""
        return {k: v for k, v in getattr(self, "state", {}).items()
                if not k.startswith("_") and isinstance(v, (bool, int, float, str))}

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Its parameters and persistent buffers and those of its submodules, named as torch names them."""
        return {name: ref.materialize() for name, ref in self.tensor_refs(prefix).items()}

    def tensor_refs(self, prefix: str = "") -> dict[str, "TensorRef"]:
        """Where those tensors' numbers are (nothing read or copied yet)."""
        state = getattr(self, "state", {})
        skip = state.get("_non_persistent_buffers_set") or set()
        tensors: dict[str, TensorRef] = {}
        for group in ("_parameters", "_buffers"):
            for name, value in _mapping(state.get(group, {}), f"{prefix}{group}").items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, TensorRef):
                    raise RefusedPickle(f"{prefix}{name}: expected a tensor, got {type(value).__name__}")
                tensors[prefix + name] = value
        for name, child in _mapping(state.get("_modules", {}), f"{prefix}_modules").items():
            if child is None:
                continue
            if not isinstance(child, RecordedModule):
                raise RefusedPickle(f"{prefix}{name}: expected a module, got {type(child).__name__}")
            tensors.update(child.tensor_refs(f"{prefix}{name}."))
        return tensors


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RefusedPickle(f"{where}: expected a dict, got {type(value).__name__}")
    return value


_STAND_INS: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
    """The inert class that takes the place of `module.name` (one per name)."""
    if (module, name) not in _STAND_INS:
        _STAND_INS[module, name] = type(name, (RecordedModule,), {"type_name": f"{module}.{name}"})
    return _STAND_INS[module, name]


@dataclass(frozen=True)
class StorageType:
    dtype: torch.dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass
class StorageRef:
    dtype: torch.dtype
    key: str
    numel: int                            # as the pickle declares it: checked against the file before reading
    data: Optional[torch.Tensor] = None   # [numel] of dtype, once read

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def fill(self, raw: bytes) -> None:
        if len(raw) != self.nbytes:
            raise RefusedPickle(f"storage {self.key}: {len(raw)} bytes, expected {self.numel} x "
                                f"{_itemsize(self.dtype)} (truncated file?)")
        self.data = torch.frombuffer(bytearray(raw), dtype=self.dtype) if raw else torch.empty(0, dtype=self.dtype)


@dataclass
class TensorRef:
    storage: StorageRef
    offset: int
    size: tuple
    stride: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * _itemsize(self.storage.dtype)

    def check_layout(self, name: str) -> None:
        """Refuse a layout that would read numbers the storage does not hold, or the same number twice:
        only then is a copy of the tensor no larger than its storage, whatever the pickle says."""
        where = f"{name}: size {self.size}, stride {self.stride}, offset {self.offset} in storage {self.storage.key}"
        dims = sorted((s, n) for n, s in zip(self.size, self.stride) if n > 1)   # innermost first
        if dims and dims[0][0] == 0:
            raise RefusedPickle(f"{where}: a stride 0 repeats one number along a dimension (a few bytes of pickle "
                                f"asking for {self.nbytes} bytes once copied)")
        extent = 1                    # elements spanned by the dims so far: the next must step past them
        for stride, n in dims:
            if stride < extent:
                raise RefusedPickle(f"{where}: its dimensions overlap (they read the same numbers again)")
            extent += (n - 1) * stride
        end = self.offset + (extent if math.prod(self.size) else 0)
        if end > self.storage.numel:
            raise RefusedPickle(f"{where}: reaches element {end}, beyond its storage of {self.storage.numel}")

    def materialize(self) -> torch.Tensor:
        if self.storage.data is None:
            raise RefusedPickle(f"storage {self.storage.key} is referenced but not in the file")
        return self.storage.data.as_strided(self.size, self.stride, self.offset).clone()


def _ints(value: Any, what: str) -> tuple:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise RefusedPickle(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or len(hooks)):
        raise RefusedPickle("a tensor arrives with backward hooks (functions to run): refused")


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                   backward_hooks: Any = None, metadata: Any = None) -> TensorRef:
    """Stands in for torch._utils._rebuild_tensor_v2: records where the tensor's numbers are."""
    if not isinstance(storage, StorageRef) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise RefusedPickle("_rebuild_tensor_v2 called with something other than a storage and an offset")
    _no_hooks(backward_hooks)
    if metadata:
        raise RefusedPickle("a tensor arrives with metadata (attributes to set): refused")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise RefusedPickle(f"tensor size {size} and stride {stride} differ in length")
    return TensorRef(storage, storage_offset, size, stride)


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> TensorRef:
    """Stands in for torch._utils._rebuild_parameter: the parameter's tensor, without hooks."""
    if not isinstance(data, TensorRef):
        raise RefusedPickle("_rebuild_parameter called with something other than a tensor")
    _no_hooks(backward_hooks)
    return data


def device_name(*args: Any) -> str:
    """Stands in for torch.device: its name ('cpu', 'cuda:0')."""
    if not 1 <= len(args) <= 2 or not isinstance(args[0], str) or (len(args) == 2 and not isinstance(args[1], int)):
        raise RefusedPickle(f"torch.device{args!r}: unexpected arguments")
    return ":".join(str(a) for a in args)


# -------------------------------------------------------------------------------------------
# the unpickler


class RestrictedUnpickler(pickle.Unpickler):
    """Answers only the names in the module docstring; storages become `StorageRef`s (filled later)."""

    def __init__(self, file, storages: Optional[dict[str, StorageRef]] = None):
        super().__init__(file)
        self.storages = {} if storages is None else storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in MODULE_CLASSES:
            return stand_in(module, name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module in ("builtins", "__builtin__") and name == "set":   # protocol 2 names the module __builtin__
            return set
        if (module, name) == ("torch", "device"):
            return device_name
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return rebuild_parameter
        raise RefusedPickle(f"refused to load {module}.{name}: the file asks for it, and only the classes and "
                            "tensor-rebuild functions of a pickled DALL-E encoder are allowed (nothing was run)")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise RefusedPickle(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], RecordedModule):
            return pid[1]  # legacy format: a module class with its source code (not checked, never run)
        if kind != "storage" or len(pid) not in (5, 6) or not isinstance(pid[1], StorageType):
            raise RefusedPickle(f"unexpected persistent id {pid[:2]!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise RefusedPickle("storage views (torch < 1.0 files) are not supported")
        key, numel = pid[2], pid[4]
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise RefusedPickle(f"unexpected storage id {pid[:5]!r}")
        ref = self.storages.setdefault(key, StorageRef(pid[1].dtype, key, numel))
        if ref.dtype != pid[1].dtype:
            raise RefusedPickle(f"storage {key} is read as two dtypes")
        return ref


def read_module_pickle(path: Union[str, Path]) -> RecordedModule:
    """The module pickled at `path` (torch.save of a module, zip or legacy format), as a
    `RecordedModule` whose `state_dict()` holds its tensors. Raises RefusedPickle for anything else."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return _read_zip(path)
    if head[:1] == b"\x80":
        return _read_legacy(path)
    raise RefusedPickle(f"{path} is neither a PyTorch zip archive nor a pickle")


def _read_zip(path: Path) -> RecordedModule:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise RefusedPickle(f"{path} is not a readable zip archive ({e})") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise RefusedPickle(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in names and _entry(archive, prefix + "byteorder", path).strip() != b"little":
            raise RefusedPickle(f"{path} was written on a big-endian machine")
        unpickler = RestrictedUnpickler(io.BytesIO(_entry(archive, pickles[0], path)))
        root = _checked(_load(unpickler, path), unpickler.storages, path)
        for key, ref in unpickler.storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise RefusedPickle(f"{path}: storage {key} is missing from the archive")
            ref.fill(_entry(archive, entry, path, ref))
    return root


def _entry(archive: zipfile.ZipFile, name: str, path: Path, ref: Optional[StorageRef] = None) -> bytes:
    """An archive entry's bytes, once its header says they are no more than the file holds (torch
    writes every entry uncompressed; a compressed one could inflate to any size)."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise RefusedPickle(f"{path}: {name} is compressed (torch.save stores every entry as it is)")
    if ref is not None and info.file_size != ref.nbytes:
        raise RefusedPickle(f"{path}: storage {ref.key} declares {ref.numel} numbers ({ref.nbytes} bytes), the "
                            f"archive holds {info.file_size} bytes for it")
    if info.file_size > path.stat().st_size:
        raise RefusedPickle(f"{path}: {name} says it holds {info.file_size} bytes, more than the whole file")
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise RefusedPickle(f"{path}: {name} cannot be read ({e}); a truncated file?") from None


def _read_legacy(path: Path) -> RecordedModule:
    size = path.stat().st_size
    with path.open("rb") as f:
        if _load(RestrictedUnpickler(f), path) != LEGACY_MAGIC:
            raise RefusedPickle(f"{path} is a pickle but not a torch.save file")
        if _load(RestrictedUnpickler(f), path) != LEGACY_VERSION:
            raise RefusedPickle(f"{path}: unknown torch.save protocol version")
        info = _load(RestrictedUnpickler(f), path)
        if not isinstance(info, dict) or not info.get("little_endian", False):
            raise RefusedPickle(f"{path} was written on a big-endian machine")
        unpickler = RestrictedUnpickler(f)
        root = _checked(_load(unpickler, path), unpickler.storages, path)
        keys = _load(RestrictedUnpickler(f), path)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise RefusedPickle(f"{path}: unexpected list of storages")
        for key in keys:
            ref = unpickler.storages.get(key)
            if ref is None:
                raise RefusedPickle(f"{path}: storage {key} is not referenced by the pickle")
            numel = int.from_bytes(f.read(8), "little")
            if numel != ref.numel:
                raise RefusedPickle(f"{path}: storage {key} holds {numel} numbers, the pickle says {ref.numel}")
            if ref.nbytes > size - f.tell():
                raise RefusedPickle(f"{path}: storage {key} declares {ref.numel} numbers ({ref.nbytes} bytes), the "
                                    f"file has {size - f.tell()} bytes left; a truncated file?")
            ref.fill(f.read(ref.nbytes))
    return root


def _load(unpickler: RestrictedUnpickler, path: Path) -> Any:
    """unpickler.load(), whose failures on a damaged or hostile file (truncated data, a stand-in called
    with the wrong arguments) are refusals too: nothing of the file has run."""
    try:
        return unpickler.load()
    except RefusedPickle:
        raise
    except Exception as e:
        raise RefusedPickle(f"{path}: not a readable torch.save pickle ({type(e).__name__}: {e})") from None


def _checked(root: Any, storages: dict[str, StorageRef], path: Path) -> RecordedModule:
    """The unpickled module, once every tensor's layout and the bytes they all ask for are checked
    against the file's size: before any storage is read or any tensor copied."""
    if not isinstance(root, RecordedModule):
        raise RefusedPickle(f"{path} holds a {type(root).__name__}, not a pickled module")
    size = path.stat().st_size
    declared = sum(ref.nbytes for ref in storages.values())
    if declared > size:
        big = max(storages.values(), key=lambda ref: ref.nbytes)
        raise RefusedPickle(f"{path}: its storages declare {declared} bytes, more than the {size} of the file "
                            f"(storage {big.key} declares {big.numel} numbers)")
    tensors = root.tensor_refs()
    for name, ref in tensors.items():
        ref.check_layout(name)
    wanted = sum(ref.nbytes for ref in tensors.values())
    if wanted > size:  # in-bounds tensors may still all read one storage, each copy as large as it
        raise RefusedPickle(f"{path}: its tensors would take {wanted} bytes, more than the {size} of the file "
                            "(they read the same storages again)")
    return root
