"""Validating, zero-copy reader of safetensors files and sharded checkpoints over mmap."""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soupkern.errors import HeaderError, InputError
from soupkern.io.format import MAX_HEADER_BYTES, TensorInfo, parse_header

PAGE = mmap.PAGESIZE
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


class SafetensorsFile:
    """One safetensors file: validated header, read-only mmap, zero-copy byte views.

    The mapping is read-only and shared: the file is never modified. `release` drops mapped
    pages from this process (they stay in the page cache) so resident memory stays bounded.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"cannot open ({e.strerror})", path=self.path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError("not a regular file", path=self.path)
            size = st.st_size
            if size < 8:
                raise HeaderError(f"file has {size} bytes, fewer than the 8-byte header length", path=self.path)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", path=self.path)
            if 8 + n > size:
                raise HeaderError(f"header length {n} runs past the end of the {size}-byte file", path=self.path)
            raw = os.pread(fd, n, 8)
            self.tensors, self.metadata = parse_header(raw, size - 8 - n, self.path)
            self.size = size
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._mm.madvise(mmap.MADV_SEQUENTIAL)
        self._can_populate = True

    def view(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read-only uint8 view of bytes [start, stop) of a tensor's data; no copy."""
        stop = info.nbytes if stop is None else stop
        return np.frombuffer(self._mm, dtype=np.uint8, count=stop - start, offset=info.begin + start)

    def prefetch(self, begin: int, end: int) -> None:
        """Map the pages of file bytes [begin, end) in one call instead of one fault per 64 KiB."""
        if end <= begin or not self._can_populate:
            return
        b = begin - begin % PAGE
        try:
            self._mm.madvise(_MADV_POPULATE_READ, b, end - b)
        except OSError:  # kernel without MADV_POPULATE_READ: fall back to ordinary faults
            self._can_populate = False

    def release(self, begin: int, end: int) -> None:
        """Unmap the pages covering file bytes [begin, end) from this process."""
        b = begin - begin % PAGE
        e = min(-(-end // PAGE) * PAGE, len(self._mm))
        if e > b:
            self._mm.madvise(mmap.MADV_DONTNEED, b, e - b)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the last one
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors)"


@dataclass
class Checkpoint:
    """A single file or a sharded checkpoint: tensor name -> (file, tensor info)."""

    path: str
    files: list[SafetensorsFile]
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_index(index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read sharded-checkpoint index ({e})", path=index_path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError("index has no 'weight_map' of tensor name -> shard file", path=index_path)
    files: dict[str, SafetensorsFile] = {}
    try:
        for shard in sorted(set(weight_map.values())):
            shard_path = index_path.parent / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise InputError(f"shard '{shard}' is outside the checkpoint folder", path=index_path)
            files[shard] = SafetensorsFile(shard_path)
        tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        for shard, f in files.items():
            for name, info in f.tensors.items():
                listed = weight_map.get(name)
                if listed is None:
                    raise InputError("tensor is in the shard but not in the index's weight_map", path=f.path, tensor=name)
                if listed != shard:
                    raise InputError(f"tensor is in this shard but the index places it in '{listed}'", path=f.path, tensor=name)
                tensors[name] = (f, info)
        for name, shard in weight_map.items():
            if name not in tensors:
                raise InputError(f"index lists the tensor in '{shard}', which does not contain it", path=index_path, tensor=name)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    metadata = {str(k): str(v) for k, v in meta.items()}
    return Checkpoint(os.fspath(index_path), list(files.values()), tensors, metadata)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding either."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return _open_index(p / INDEX_NAME)
        if (p / SINGLE_NAME).is_file():
            p = p / SINGLE_NAME
        else:
            found = sorted(f for f in p.glob("*.safetensors") if f.is_file())
            if len(found) != 1:
                raise InputError(
                    f"folder has no {INDEX_NAME} or {SINGLE_NAME} and {len(found)} *.safetensors files", path=p
                )
            m = SHARD_NAME.match(found[0].name)
            if m and m.group(2) != "00001":
                raise InputError(f"'{found[0].name}' is one shard of a sharded checkpoint whose {INDEX_NAME} is missing", path=p)
            p = found[0]
    elif p.name.endswith(".index.json"):
        return _open_index(p)
    elif not p.exists():
        raise InputError("no such file or folder", path=p)
    f = SafetensorsFile(p)
    return Checkpoint(os.fspath(p), [f], {name: (f, info) for name, info in f.tensors.items()}, dict(f.metadata))
