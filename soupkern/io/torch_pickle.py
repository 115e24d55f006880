"""PyTorch pickles (`torch.save`, zip and legacy formats) read through soupkern's own mapping.

The pickle is run through torch's weights-only unpickler (the one `torch.load(weights_only=True)`
uses: no code from the file runs; beyond torch's own globals only `argparse.Namespace` is
allowed), with every storage it names made a meta storage: the object comes back with the
names, shapes, strides and dtypes of its tensors and no data. Each storage's bytes are then
located in the file (a zip record, stored uncompressed; in the legacy format, the records after
the pickle), and tensors are served from one read-only, SIGBUS-guarded mapping of the file, as
safetensors files are: zero-copy, pages released as the engine goes, a file truncated or
rewritten mid-read reported as an InputError. Both formats are read this way, so a legacy
(non-zip) checkpoint costs no more memory than a zip one.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import TYPE_CHECKING, Any

from soupkern.errors import InputError
from soupkern.io.format import TensorInfo, _new_tensor_info
from soupkern.io.reader import MappedFile
from soupkern.io.sources import LazyBytes, _safe_globals

if TYPE_CHECKING:
    import numpy as np
    import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class Unsupported(Exception):
    """A pickle this reader does not handle (torch.load may): the caller falls back."""


class PickleFile(MappedFile):
    """A `torch.save` file: `obj` is the unpickled object with meta tensors; `entry` maps one of
    them to this file's bytes."""

    obj: object

    def _parse(self, fd: int, size: int) -> None:
        import torch

        try:
            from torch._weights_only_unpickler import Unpickler
        except ImportError as e:  # a torch without it: torch.load reads the file instead
            raise Unsupported(str(e)) from None
        self.tensors, self.metadata = {}, {}
        self._storages: dict[int, tuple[str, int, Any]] = {}  # storage cdata -> (key, byte offset, dtype)
        self._keys: dict[str, tuple[Any, int]] = {}  # storage key -> (dtype, numel)
        self._data: dict[str, int] = {}  # storage key -> file offset of its bytes
        with os.fdopen(os.dup(fd), "rb") as f, torch.serialization.safe_globals(_safe_globals()):
            zipped = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            if zipped:
                self._parse_zip(f, size, Unpickler)
            else:
                self._parse_legacy(f, size, Unpickler)

    def _unpickle(self, data: Any, unpickler: Any) -> object:
        up = unpickler(data, encoding="utf-8")
        up.persistent_load = self._persistent_load
        return up.load()

    def _persistent_load(self, pid: Any) -> Any:
        import torch

        if not isinstance(pid, tuple) or len(pid) < 5:
            raise Unsupported(f"persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        key = str(key)
        itemsize = dtype.itemsize
        if self._keys.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise Unsupported(f"storage {key} is named with two dtypes or sizes")
        offset = 0
        if view is not None:  # a view of a storage (legacy files of old torch versions)
            _, offset, numel = view
            offset *= itemsize
        storage = torch.UntypedStorage(numel * itemsize, device="meta")
        self._storages[storage._cdata] = (key, offset, dtype)
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    def _parse_zip(self, f: Any, size: int, unpickler: Any) -> None:
        try:
            z = zipfile.ZipFile(f)
        except zipfile.BadZipFile as e:
            raise InputError(f"is a damaged PyTorch zip checkpoint ({e})", path=self.path) from None
        with z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise InputError("is a zip file but not a torch.save checkpoint (no <name>/data.pkl record)",
                                 path=self.path)
            prefix = pkl[: -len("data.pkl")]
            if (prefix + "byteorder") in z.namelist() and z.read(prefix + "byteorder") != b"little":
                raise Unsupported("big-endian checkpoint")
            with z.open(pkl) as data:
                self.obj = self._unpickle(data, unpickler)
            for key, (dtype, numel) in self._keys.items():
                name = f"{prefix}data/{key}"
                try:
                    info = z.getinfo(name)
                except KeyError:
                    raise InputError(f"has no record '{name}' for a storage its pickle names", path=self.path) from None
                if info.compress_type != zipfile.ZIP_STORED:
                    raise Unsupported(f"record '{name}' is compressed")
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise InputError(f"zip record '{name}' has a damaged local header", path=self.path)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                self._data[key] = self._check_range(key, info.header_offset + 30 + name_len + extra_len,
                                                    numel, dtype, size)

    def _parse_legacy(self, f: Any, size: int, unpickler: Any) -> None:
        if unpickler(f, encoding="utf-8").load() != LEGACY_MAGIC:
            raise Unsupported("not a torch.save legacy file (magic number)")
        if unpickler(f, encoding="utf-8").load() != LEGACY_PROTOCOL:
            raise Unsupported("legacy protocol version")
        sys_info = unpickler(f, encoding="utf-8").load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise Unsupported("big-endian checkpoint")
        self.obj = self._unpickle(f, unpickler)
        keys = unpickler(f, encoding="utf-8").load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(self._keys):
            raise InputError("its storage records do not match the storages its pickle names", path=self.path)
        offset = f.tell()
        for key in map(str, keys):
            dtype, numel = self._keys[key]
            f.seek(offset)
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"is truncated: storage {key} is missing", path=self.path)
            (stored,) = struct.unpack("<q", head)
            if stored != numel:
                raise InputError(f"storage {key} records {stored} elements, its pickle {numel}", path=self.path)
            self._data[key] = self._check_range(key, offset + 8, numel, dtype, size)
            offset = self._data[key] + numel * _itemsize(dtype)

    def _check_range(self, key: str, begin: int, numel: int, dtype: Any, size: int) -> int:
        if begin + numel * _itemsize(dtype) > size:
            raise InputError(f"is truncated: storage {key} ends past the end of the {size}-byte file", path=self.path)
        return begin

    def entry(self, name: str, t: torch.Tensor, dtype_name: str) -> tuple[Any, TensorInfo]:
        """(holder, info) for meta tensor `t` of `obj`: this file's bytes when contiguous, else a
        `_Strided` holder that gathers it from the mapping when first read."""
        found = self._storages.get(t.untyped_storage()._cdata)
        if found is None:
            raise InputError("is a tensor this reader cannot place in the file", path=self.path, tensor=name)
        key, offset, dtype = found
        if dtype != t.dtype:  # a storage viewed with another dtype
            raise Unsupported(f"tensor {name} views a {dtype} storage as {t.dtype}")
        itemsize = t.element_size()
        begin = self._data[key] + offset + t.storage_offset() * itemsize
        nbytes = t.numel() * itemsize
        if t.is_contiguous() or t.numel() <= 1:
            return self, _new_tensor_info(name, dtype_name, tuple(t.shape), begin, begin + nbytes)
        _, numel = self._keys[key]
        base = self._data[key] + offset
        storage = _new_tensor_info("", "U8", (numel * itemsize,), base, base + numel * itemsize)
        return _Strided(self, storage, t), _new_tensor_info(name, dtype_name, tuple(t.shape), 0, nbytes)


class _Strided(LazyBytes):
    """A non-contiguous tensor of a pickle (a transposed view, saved with its whole storage):
    gathered from the file's mapping into a contiguous copy when first viewed, dropped once its
    last byte is released. `layout` is the meta tensor (shape, strides, offset in the storage)."""

    __slots__ = ("file", "storage", "layout")

    def __init__(self, file: PickleFile, storage: TensorInfo, layout: torch.Tensor):
        super().__init__(file.path)
        self.file, self.storage, self.layout = file, storage, layout

    def _load(self) -> np.ndarray:
        import torch

        from soupkern.torch_dtypes import byte_tensor

        t = self.layout
        values = byte_tensor(self.file.view(self.storage)).view(t.dtype)  # read, never written
        dense = values.as_strided(tuple(t.shape), t.stride(), t.storage_offset()).contiguous()
        self.file.release(self.storage.begin, self.storage.end)
        return dense.reshape(-1).view(torch.uint8).numpy()

    def check_unchanged(self) -> None:
        self.file.check_unchanged()


def _itemsize(dtype: Any) -> int:
    return int(dtype.itemsize)


def load(path: str) -> PickleFile:
    """Parse and map a torch.save file. Raises InputError (refused or damaged files, naming the
    file) or Unsupported (files torch.load should read instead)."""
    try:
        return PickleFile(path)
    except (InputError, Unsupported):
        raise
    except pickle.UnpicklingError as e:
        raise InputError(f"refused: the pickle needs something a weights-only load does not allow, so it was not "
                         f"loaded and none of its code ran ({str(e).strip().splitlines()[0][:300]})", path=path) from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything (EOFError, ValueError, struct.error)
        raise InputError(f"is a damaged PyTorch pickle ({type(e).__name__}: {str(e)[:300]})", path=path) from None
