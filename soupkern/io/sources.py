"""Tensor sources other than safetensors: in-memory state dicts and modules, PyTorch pickles
(`.pt`, `.pth`, `.bin`, `.pth.tar`) and PyTorch Distributed Checkpoint (DCP) folders.

Every source opens as a `Checkpoint` (soupkern.io.reader): tensor name -> (holder, TensorInfo),
where the holder serves the tensor's bytes the way a mapped safetensors file does (`view`,
`prefetch`, `release`, `address`), so every recipe and executor reads all sources alike. Names,
shapes and dtypes are known when the source opens; bytes are read when first viewed.

Pickles are unpickled by torch's weights-only unpickler (soupkern.io.torch_pickle): no code
from the file ever runs; the only globals allowed beyond torch's own are the harmless ones real
checkpoints carry (`argparse.Namespace`, which timm's train.py saves as `args`). Their tensors
are served from soupkern's own mapping of the file, as safetensors files are.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from soupkern.errors import InputError
from soupkern.libc import function
from soupkern.io.format import TensorInfo, _new_tensor_info
from soupkern.io.reader import _REMOVED, Checkpoint, _looks_like, _signature, open_regular

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("soupkern")

PAGE = mmap.PAGESIZE
# Containers checkpoints wrap their weights in, tried in this order when no key is named:
# Lightning / timm ({"state_dict": ...}), generic training loops ("model_state_dict", "model"),
# DeepSpeed / DDP ("module"). timm's EMA weights ("state_dict_ema") only when asked for.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pth.tar", ".ckpt", ".tar")
DCP_METADATA = ".metadata"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_BIN_SINGLE = "pytorch_model.bin"


def _torch_to_name() -> dict[Any, str]:
    from soupkern.torch_dtypes import TORCH_DTYPES

    return {v: k for k, v in TORCH_DTYPES.items()}


class LazyBytes:
    """A tensor's bytes behind the byte-view interface the engine reads, produced by `_load` on
    first view (a contiguous host copy, or the tensor's own memory) and dropped once the view's
    last byte is released."""

    __slots__ = ("path", "_bytes")

    def __init__(self, path: str):
        self.path = path
        self._bytes: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        raise NotImplementedError

    def view(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        if self._bytes is None:
            self._bytes = self._load()
        return self._bytes[start:info.nbytes if stop is None else stop]

    def address(self, info: TensorInfo) -> int:
        """The address of the tensor's bytes in host memory, valid until `release` of its end."""
        if self._bytes is None:
            self._bytes = self._load()
        return int(self._bytes.ctypes.data)

    def prefetch(self, begin: int, end: int) -> None:
        pass

    def release(self, begin: int, end: int) -> None:
        if self._bytes is not None and end >= self._bytes.nbytes:
            self._bytes = None

    def check_unchanged(self) -> None:
        pass


class TensorHolder(LazyBytes):
    """One in-memory tensor behind the byte-view interface the engine reads.

    A contiguous CPU tensor is viewed in place (no copy). A non-contiguous or device tensor is
    copied to a contiguous CPU tensor on first view and dropped when the view's last byte is
    released.
    """

    __slots__ = ("tensor", "direct")

    def __init__(self, tensor: torch.Tensor, path: str):
        super().__init__(path)
        self.tensor = tensor
        # whether the tensor's own memory is read (contiguous, on the CPU)
        self.direct = tensor.is_cpu and tensor.is_contiguous()

    def _load(self) -> np.ndarray:
        import torch

        t = self.tensor
        if not self.direct:
            t = t.to("cpu", memory_format=torch.contiguous_format) if t.device.type != "cpu" else t.contiguous()
        return t.reshape(-1).view(torch.uint8).numpy()

    def address(self, info: TensorInfo) -> int:
        if self.direct:
            return int(self.tensor.data_ptr())
        return super().address(info)


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # Linux's value


def _madvise(address: int, length: int, advice: int, page: int = PAGE) -> None:
    """madvise(advice) over the whole `page`-sized pages inside [address, address + length)."""
    madvise = function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    b = -(-address // page) * page
    e = (address + length) // page * page
    if e > b and madvise is not None:
        madvise(b, e - b, advice)


def prefer_huge_pages(t: torch.Tensor) -> None:
    """Ask for transparent huge pages under a new, untouched CPU tensor of several MiB (what
    PyTorch's THP_MEM_ALLOC_ENABLE does for every allocation): first-touch page faults, not the
    kernel, dominate writing fresh memory here (68 MB: 33 ms in 4 KiB faults, 6 ms in 2 MiB
    ones). Harmless where the pages exist already or the system disables THP."""
    nbytes = t.numel() * t.element_size()
    if sys.platform.startswith("linux") and nbytes >= 2 * HUGE_PAGE:
        _madvise(int(t.data_ptr()), nbytes, MADV_HUGEPAGE, HUGE_PAGE)


# ---------------------------------------------------------------------------------------------
# state dicts and modules in memory


def _is_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")  # a tensor means torch is imported already
    return torch is not None and isinstance(x, torch.Tensor)


def _is_module(x: object) -> bool:
    torch = sys.modules.get("torch")  # an nn.Module means torch is imported already
    return torch is not None and isinstance(x, torch.nn.Module)


def is_in_memory(x: object) -> bool:
    """Whether `x` is an in-memory ingredient (a mapping of tensors or an nn.Module), not a path."""
    return isinstance(x, Mapping) or _is_module(x)


def unwrap(obj: object, key: str | None, label: str) -> Mapping[str, Any]:
    """The state dict inside a checkpoint object: `obj[key]` when a key is named; else `obj` if
    its values are tensors; else the first of CONTAINER_KEYS it holds (one level deep, twice:
    {"model": {"module": ...}}). An nn.Module gives its state_dict()."""
    if _is_module(obj):
        if key is not None:
            raise InputError(f"is an nn.Module, its own state dict: state_dict_key {key!r} has nothing to pick from",
                             path=label)
        return obj.state_dict()  # type: ignore[union-attr,no-any-return]
    if not isinstance(obj, Mapping):
        raise InputError(f"holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)", path=label)
    if key is not None:
        if key not in obj:
            raise InputError(f"has no entry '{key}' (--state-dict-key); its top-level keys are {_keys(obj)}", path=label)
        inner = obj[key]
        if _is_module(inner):
            return inner.state_dict()  # type: ignore[no-any-return]
        if not isinstance(inner, Mapping):
            raise InputError(f"entry '{key}' holds a {type(inner).__name__}, not a state dict", path=label)
        return inner
    for _ in range(2):
        if obj and all(_is_tensor(v) for v in obj.values()):
            return obj
        found = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping) or _is_module(obj.get(k))]
        if not found:
            break
        others = [k for k in found[1:]] + (["state_dict_ema"] if "state_dict_ema" in obj else [])
        if others:
            log.warning("%s: souping its '%s' entry; it also holds %s: name the one to soup with --state-dict-key "
                        "(state_dict_key=)", label, found[0], ", ".join(f"'{k}'" for k in others))
        obj = obj[found[0]]
        if _is_module(obj):
            return obj.state_dict()  # type: ignore[union-attr,no-any-return]
    if isinstance(obj, Mapping) and obj and all(_is_tensor(v) for v in obj.values()):
        return obj
    raise InputError(f"holds no state dict: its top-level keys are {_keys(obj)} and none of "
                     f"{', '.join(CONTAINER_KEYS)} is a mapping of tensors; name the one to soup with "
                     f"--state-dict-key (state_dict_key=)", path=label)


def _keys(obj: Mapping[Any, Any]) -> str:
    keys = [repr(k) for k in list(obj)[:8]]
    return "[" + ", ".join(keys) + (", ..." if len(obj) > 8 else "") + "]"


def state_dict_checkpoint(obj: object, label: str, *, state_dict_key: str | None = None,
                          entry: Callable[[str, Any, str], tuple[Any, TensorInfo]] | None = None,
                          ) -> Checkpoint:
    """A Checkpoint over an in-memory state dict (or module, or container of one): every value a
    torch tensor of a dtype safetensors can hold; tensors are viewed in place, never copied
    unless non-contiguous or off the CPU. `entry(name, tensor, dtype)`: the (holder, info) of
    each tensor instead (a pickle's meta tensors, served from its file)."""
    import torch

    sd = unwrap(obj, state_dict_key, label)
    names = _torch_to_name()
    tensors: dict[str, tuple[Any, TensorInfo]] = {}
    new_info = _new_tensor_info
    Tensor, strided = torch.Tensor, torch.strided
    for name, t in sd.items():
        if type(name) is not str:
            raise InputError(f"state dict key {name!r} is not a string", path=label)
        if not isinstance(t, Tensor):
            raise InputError(f"value is a {type(t).__name__}, not a tensor", path=label, tensor=name)
        dtype = names.get(t.dtype)
        if dtype is None:
            raise InputError(f"dtype {t.dtype} cannot be souped or stored in safetensors", path=label, tensor=name)
        if t.layout is not strided:
            raise InputError(f"layout {t.layout} is not a dense tensor", path=label, tensor=name)
        if entry is not None:
            tensors[name] = entry(name, t, dtype)
            continue
        if t.is_meta:
            raise InputError("is on the meta device: it has no values to soup", path=label, tensor=name)
        if t.requires_grad:
            t = t.detach()  # shares the memory; numpy views of grad-requiring tensors are refused
        tensors[name] = (TensorHolder(t, label), new_info(name, dtype, tuple(t.shape), 0,
                                                                  t.numel() * t.element_size()))
    if not tensors:
        raise InputError("holds no tensors", path=label)
    return Checkpoint(label, [], tensors, {}, key_used=state_dict_key is not None)


# ---------------------------------------------------------------------------------------------
# PyTorch pickles


class _PickleFile:
    """A `.pt` file's identity, so a soup notices when it changes while being read."""

    def __init__(self, path: str, signature: tuple[int, int, int, int]):
        self.path = path
        self.signature = signature

    def check_unchanged(self) -> None:
        try:
            now = _signature(os.stat(self.path))
        except OSError as e:
            raise InputError(_REMOVED.format(e.strerror), path=self.path) from None
        if now != self.signature:
            raise InputError("was modified by another process while being read; the soup was not written "
                             "(rerun once the file is stable)", path=self.path)

    def close(self) -> None:
        pass


def _safe_globals() -> list[Any]:
    import argparse

    return [argparse.Namespace]


def _torch_load(path: str, why: object) -> object:
    """torch.load(weights_only=True) of the whole file into memory, with a notice: the fallback
    for pickles soupkern.io.torch_pickle does not map (never mmap=True: for a zip whose records
    are compressed, torch 2.13 returns wrong values that way, silently)."""
    import torch

    log.warning("%s: %s, so it cannot be served from a mapping of the file; reading it whole into memory "
                "with torch.load", path, why)
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            # a path ending in .safetensors would make torch.load read it as safetensors: pass the file
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise InputError(f"refused: the pickle needs something a weights-only load does not allow, so it "
                                 f"was not loaded and none of its code ran ({_refusal(e)})", path=path) from None
            raise InputError(f"is a damaged PyTorch pickle ({_first_line(e)})", path=path) from None
        except Exception as e:  # noqa: BLE001 - torch raises many kinds (OSError, RuntimeError, EOFError) for a damaged file
            raise InputError(f"cannot be read by torch.load: damaged or not a torch.save checkpoint "
                             f"({type(e).__name__}: {_first_line(e)})", path=path) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _refusal(e: BaseException) -> str:
    """The line of torch's weights-only error that names what the pickle wanted."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if ln.startswith(("WeightsUnpickler error", "Unsupported", "Trying to load"))), None)
    return (why or _first_line(e))[:300]


def open_pickle(path: str | os.PathLike[str], state_dict_key: str | None = None) -> Checkpoint:
    """A PyTorch pickle (`torch.save`, zip or legacy format), served from soupkern's own mapping
    of the file (soupkern.io.torch_pickle); files that reader does not handle (big-endian,
    compressed records, exotic storages) read whole by `torch.load`, with a notice."""
    from soupkern.io import torch_pickle

    p = os.fspath(path)
    try:
        f = torch_pickle.load(p)
    except torch_pickle.Unsupported as why:
        return _open_with_torch_load(p, state_dict_key, why)
    try:
        ck = state_dict_checkpoint(f.obj, p, state_dict_key=state_dict_key, entry=f.entry)
    except torch_pickle.Unsupported as why:
        f.close()
        return _open_with_torch_load(p, state_dict_key, why)
    except BaseException:
        f.close()
        raise
    f.obj = None  # the meta tensors are not needed past here
    ck.files = [f]
    return ck


def _open_with_torch_load(p: str, state_dict_key: str | None, why: object) -> Checkpoint:
    fd = open_regular(p)
    try:
        sig = _signature(os.fstat(fd))
    finally:
        os.close(fd)
    obj = _torch_load(p, why)
    ck = state_dict_checkpoint(obj, p, state_dict_key=state_dict_key)
    for holder, _ in ck.tensors.values():
        holder.path = p
    ck.files = [_PickleFile(p, sig)]  # type: ignore[list-item]
    return ck


def _open_pickle_index(index_path: Path, state_dict_key: str | None) -> Checkpoint:
    """A sharded `pytorch_model.bin.index.json` (transformers' pre-safetensors layout)."""
    from soupkern.io.format import parse_index
    from soupkern.io.reader import _pread

    fd = open_regular(os.fspath(index_path))
    try:
        raw = _pread(fd, os.fstat(fd).st_size, 0, os.fspath(index_path))
    finally:
        os.close(fd)
    weight_map, metadata = parse_index(raw, os.fspath(index_path))
    tensors: dict[str, tuple[Any, TensorInfo]] = {}
    files = []
    for shard in sorted(set(weight_map.values())):
        ck = open_pickle(index_path.parent / shard, state_dict_key)
        files += ck.files
        for name, entry in ck.tensors.items():
            if weight_map.get(name) != shard:
                raise InputError(f"tensor is in this shard but the index places it in '{weight_map.get(name)}'",
                                 path=ck.path, tensor=name)
            tensors[name] = entry
    for name, shard in weight_map.items():
        if name not in tensors:
            raise InputError(f"index lists the tensor in '{shard}', which does not contain it", path=index_path, tensor=name)
    return Checkpoint(os.fspath(index_path), files, tensors, metadata,  # type: ignore[arg-type]
                      key_used=state_dict_key is not None)


# ---------------------------------------------------------------------------------------------
# PyTorch Distributed Checkpoint folders


DCP_BATCH_BYTES = 64 << 20
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


def _dcp_reader(path: str) -> Any:
    """A FileSystemReader whose `.metadata` is unpickled with an allow-list (DCP's own metadata
    classes, torch.Size and dtypes, paths): torch's reader uses plain pickle.load, which would run
    any code a crafted `.metadata` holds, on every load."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if name in _DCP_GLOBALS.get(module, ()):
                return super().find_class(module, name)
            if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                   (torch.dtype, torch.memory_format, torch.layout))):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")

    class SafeReader(FileSystemReader):  # type: ignore[misc]
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = Restricted(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


class _DcpLoader:
    """Reads a DCP folder's tensors by partial `torch.distributed.checkpoint.load` calls with no
    process group (the single-process load). A call costs about 10 ms whatever its size, so a
    tensor not yet read is read together with the next ones in the order the engine consumes
    them (soupkern's output order: item size descending, then name) up to DCP_BATCH_BYTES; each
    is dropped when its last byte is released."""

    def __init__(self, path: str, entries: dict[str, tuple[str, TensorInfo]]):
        self.path = path
        self.order = sorted(entries, key=lambda n: (-_itemsize(entries[n][1].dtype), n))
        self.position = {name: i for i, name in enumerate(self.order)}
        self.entries = entries  # soup name -> (DCP key, info)
        self.cache: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        t = self.cache.get(name)
        if t is None:
            self._load(name)
            t = self.cache[name]
        return t

    def _load(self, first: str) -> None:
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp

        from soupkern.torch_dtypes import TORCH_DTYPES

        held = sum(t.numel() * t.element_size() for t in self.cache.values())
        batch, size = {}, 0
        for name in self.order[self.position[first]:]:
            if name in self.cache:
                continue
            info = self.entries[name][1]
            if batch and (size + info.nbytes > DCP_BATCH_BYTES or held + size > 2 * DCP_BATCH_BYTES):
                break
            batch[name] = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
            size += info.nbytes
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load({self.entries[n][0]: t for n, t in batch.items()},
                         storage_reader=_dcp_reader(self.path), no_dist=True)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
                raise InputError(f"cannot read tensors from the DCP folder ({_first_line(e)})",
                                 path=self.path, tensor=self.entries[first][0]) from None
        self.cache.update(batch)

    def drop(self, name: str) -> None:
        self.cache.pop(name, None)


class DcpTensor(LazyBytes):
    """One tensor of a DCP folder (read through its folder's `_DcpLoader`)."""

    __slots__ = ("name", "info", "loader")

    def __init__(self, loader: _DcpLoader, name: str, info: TensorInfo):
        super().__init__(loader.path)
        self.loader = loader
        self.name = name
        self.info = info

    def _load(self) -> np.ndarray:
        import torch

        return self.loader.get(self.name).reshape(-1).view(torch.uint8).numpy()  # type: ignore[no-any-return]

    def release(self, begin: int, end: int) -> None:
        if end >= self.info.nbytes:
            self._bytes = None
            self.loader.drop(self.name)


class _DcpFolder:
    """A DCP folder's identity: its `.metadata` file's signature."""

    def __init__(self, path: str):
        self.path = path
        self._meta = os.path.join(path, DCP_METADATA)
        self.signature = _signature(os.stat(self._meta))

    def check_unchanged(self) -> None:
        try:
            now = _signature(os.stat(self._meta))
        except OSError as e:
            raise InputError(f"was removed while being read ({e.strerror}); the soup was not written", path=self.path) from None
        if now != self.signature:
            raise InputError("was rewritten by another process while being read; the soup was not written", path=self.path)

    def close(self) -> None:
        pass


def open_dcp(path: str | os.PathLike[str], state_dict_key: str | None = None) -> Checkpoint:
    """A DCP folder (`.metadata` + `__*_*.distcp`): tensor entries only (bytes entries such as
    step counters are not weights). Nested state dicts were flattened by DCP; `state_dict_key`
    (else the first of CONTAINER_KEYS present at the top level) selects one and strips its
    prefix, so torchtitan's {"model": ..., "optimizer": ...} soups the model's weights."""
    import warnings

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    p = os.fspath(path)
    folder = _DcpFolder(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            md = _dcp_reader(p).read_metadata()
    except pickle.UnpicklingError as e:
        raise InputError(f"refused: its {DCP_METADATA} needs something DCP metadata does not hold, so it was not "
                         f"loaded and none of its code ran ({_first_line(e)})", path=p) from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"has a {DCP_METADATA} file that cannot be read as DCP metadata ({_first_line(e)})", path=p) from None
    names = _torch_to_name()
    paths: dict[str, tuple[str, ...]] = dict(md.planner_data or {})
    entries = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    tops = {paths.get(k, (k,))[0] for k in entries if len(paths.get(k, (k,))) > 1}
    prefix = state_dict_key
    top_level = None  # torchtitan: the model's tensors at the top level, optimizer/train_state nested
    if prefix is None:
        prefix = next((c for c in CONTAINER_KEYS if c in tops), None)
        if prefix is None and tops and any(len(paths.get(k, (k,))) == 1 for k in entries):
            top_level = True
            log.warning("%s: souping its top-level tensors; the nested %s are left out (--state-dict-key picks one)",
                        p, ", ".join(f"'{t}'" for t in sorted(tops)))
    elif prefix not in tops:
        raise InputError(f"has no nested state dict '{prefix}' (--state-dict-key); its nested ones are "
                         f"{sorted(tops) or 'none'}", path=p)
    found: dict[str, tuple[str, TensorInfo]] = {}
    for key, meta in entries.items():
        parts = paths.get(key, (key,))
        if prefix is not None:
            if len(parts) < 2 or parts[0] != prefix:
                continue
            name = ".".join(str(x) for x in parts[1:])
        elif top_level and len(parts) > 1:
            continue
        else:
            name = key
        dtype = names.get(meta.properties.dtype)
        if dtype is None:
            raise InputError(f"dtype {meta.properties.dtype} cannot be souped or stored in safetensors", path=p, tensor=key)
        shape = tuple(int(s) for s in meta.size)
        n = 1
        for s in shape:
            n *= s
        found[name] = (key, TensorInfo(name, dtype, shape, 0, n * _itemsize(dtype)))
    loader = _DcpLoader(p, found)
    tensors: dict[str, tuple[Any, TensorInfo]] = {name: (DcpTensor(loader, name, info), info)
                                                  for name, (_, info) in found.items()}
    if not tensors:
        raise InputError("DCP folder holds no tensors" + (f" under '{prefix}'" if prefix else ""), path=p)
    return Checkpoint(p, [folder], tensors, {}, key_used=state_dict_key is not None)  # type: ignore[list-item]


def _itemsize(dtype: str) -> int:
    from soupkern.io.format import dtype_itemsize

    return dtype_itemsize(dtype)


# ---------------------------------------------------------------------------------------------
# format detection


def describe(path: str) -> str:
    """What a file that soupkern cannot read looks like, for the error message."""
    try:
        fd = open_regular(path)
    except InputError:
        return ""
    try:
        return _looks_like(fd)
    finally:
        os.close(fd)


def sniff(path: str) -> str:
    """'safetensors', 'pickle' or 'unknown' from a file's first bytes. A safetensors header (a
    little-endian length that fits the file, then '{') wins: its length bytes can look like a
    pickle's protocol opcode (0x80 0x03 is a 896-byte header)."""
    fd = open_regular(path)
    try:
        head = os.pread(fd, 9, 0)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


def folder_kind(p: Path) -> str | None:
    """'dcp' or 'pickle-index' / 'pickle' for a folder soupkern reads with this module, else None."""
    if (p / DCP_METADATA).is_file() and any(p.glob("*.distcp")):
        return "dcp"
    if (p / TORCH_BIN_INDEX).is_file():
        return "pickle-index"
    if (p / TORCH_BIN_SINGLE).is_file():
        return "pickle"
    return None


def open_folder(p: Path, kind: str, state_dict_key: str | None) -> Checkpoint:
    if kind == "dcp":
        return open_dcp(p, state_dict_key)
    if kind == "pickle-index":
        return _open_pickle_index(p / TORCH_BIN_INDEX, state_dict_key)
    return open_pickle(p / TORCH_BIN_SINGLE, state_dict_key)


class Renamed:
    """An ingredient whose tensor names are renamed by prefix (`soupkern.renamed`)."""

    __slots__ = ("source", "prefixes")

    def __init__(self, source: object, prefixes: Iterable[tuple[str, str]]):
        self.source = source
        self.prefixes = tuple(prefixes)

    def __repr__(self) -> str:
        return f"renamed({self.source!r}, {dict(self.prefixes)!r})"


def renamed(source: object, prefixes: Mapping[str, str]) -> Renamed:
    """`source` (any ingredient) with its tensor names renamed by prefix: a name starting with a
    key starts with its value instead (the first matching key, in order; others unchanged),
    e.g. renamed("ckpt.pt", {"backbone.": "model."}). Two names renamed to one are refused."""
    if not isinstance(prefixes, Mapping) or not prefixes:
        raise InputError("renamed() needs a mapping of old prefix -> new prefix")
    for old, new in prefixes.items():
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise InputError(f"rename rules map non-empty str prefixes to str prefixes, got {old!r}: {new!r}")
    return Renamed(source, prefixes.items())


def apply_renames(ck: Checkpoint, prefixes: Sequence[tuple[str, str]]) -> None:
    """Rename `ck`'s tensors in place by the first matching prefix rule."""
    out: dict[str, tuple[Any, TensorInfo]] = {}
    for name, entry in ck.tensors.items():
        new = next((to + name[len(old):] for old, to in prefixes if name.startswith(old)), name)
        if new in out:
            raise InputError(f"renaming gives two tensors the name '{new}'", path=ck.path, tensor=name)
        out[new] = entry
    ck.tensors = out


def labels(ingredients: Iterable[object]) -> list[str]:
    """How provenance names each ingredient: its absolute path, or "<state dict #i>" / "<Module #i>"."""
    out = []
    for i, x in enumerate(ingredients):
        if isinstance(x, Renamed):
            out.append(labels([x.source])[0])
        elif isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
            out.append(os.path.abspath(os.fsdecode(os.fspath(x))))  # type: ignore[arg-type]
        elif _is_module(x):
            out.append(f"<{type(x).__name__} #{i}>")
        else:
            out.append(f"<state dict #{i}>")
    return out
