"""Validating, zero-copy reader of safetensors files and sharded checkpoints over mmap."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import stat
import struct
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from soupkern.errors import HeaderError, InputError
from soupkern.libc import function
from soupkern.io.buffers import count_odd
from soupkern.io.format import MAX_HEADER_BYTES, TensorInfo, parse_header, parse_index

if TYPE_CHECKING:
    from soupkern.io.buffers import Bytes

log = logging.getLogger("soupkern")
PAGE = mmap.PAGESIZE
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    # not ctime: chmod, chown or a new hard link change it without touching the bytes
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


_KIND_NAMES = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")]


def open_regular(path: str) -> int:
    """Open a regular file for reading without ever blocking: stat first (a FIFO's open would wait
    for a writer forever), then open with O_NONBLOCK and check it is still the same regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot open ({e.strerror})", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KIND_NAMES if test(st.st_mode)), "not a regular file")
        raise InputError(f"is {kind}, not a regular file; soupkern reads only regular files", path=path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        hint = " (too many open files: raise `ulimit -n`)" if e.errno == errno.EMFILE else ""
        raise InputError(f"cannot open ({e.strerror}){hint}", path=path) from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise InputError("was replaced while being opened", path=path)
    return fd


def _pread(fd: int, n: int, offset: int, path: str) -> bytes:
    try:
        data = os.pread(fd, n, offset)
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror})", path=path) from None
    if len(data) != n:
        raise InputError(f"file shrank while being read ({len(data)} of {n} bytes at offset {offset})", path=path)
    return data


def _looks_like(fd: int) -> str:
    """A hint for a file that is not safetensors: what its first bytes say it is."""
    try:
        head = os.pread(fd, 8, 0)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return " (the file is a zip archive: a PyTorch torch.save checkpoint, not safetensors)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return " (the file is a Python pickle: a legacy torch.save checkpoint, not safetensors)"
    if head.startswith(b"\x93NUMPY"):
        return " (the file is a numpy .npy array, not safetensors)"
    if head[:1] in (b"{", b"["):
        return " (the file looks like JSON, not safetensors)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f" (the file is {what}, not a checkpoint soupkern reads)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f" (the file starts with the text {head.decode()!r}: neither safetensors nor a PyTorch pickle)"
    return f" (the file starts with the bytes {head.hex(' ')}: neither safetensors nor a PyTorch pickle)"


_MAGIC = ((b"\x89HDF", "an HDF5 file (Keras .h5?)"), (b"\x1f\x8b", "gzip-compressed"),
          (b"GGUF", "a GGUF file (llama.cpp)"), (b"\x08", "possibly a protobuf (ONNX / TensorFlow?)"))


_REMOVED = "was removed or became unreadable while being read ({}); the soup was not written"
_TRUNCATED = ("was truncated by another process while being read; the soup was not written "
              "(rerun once the file is stable)")


class _PyMapping:
    """Python's mmap behind the native Mapping's interface (advise, populate, address, buffer),
    for a build without the extension: it holds a file descriptor and is not SIGBUS-guarded."""

    address = None

    def __init__(self, fd: int):
        self.buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    def advise(self, advice: int, offset: int, length: int) -> None:
        self.buffer.madvise(advice, offset, length)

    def populate(self, offset: int, length: int) -> int:
        try:
            self.buffer.madvise(_MADV_POPULATE_READ, offset, length)
        except OSError as e:
            return e.errno or errno.EINVAL
        return 0

    def close(self) -> None:
        try:
            self.buffer.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the last one
            pass


def _map(fd: int, size: int) -> tuple[object, object]:
    """(mapping, buffer): a read-only shared mapping of the whole file. The native one holds no
    file descriptor (so any number of inputs fit under `ulimit -n`) and is guarded: a page lost
    to a truncation by another process reads as zeros and is recorded, instead of killing the
    process with SIGBUS. Views keep it alive; it is unmapped with the last of them."""
    try:
        from soupkern import _native
    except ImportError:  # built without the extension
        m = _PyMapping(fd)
        return m, m.buffer
    m = _native.Mapping(fd, size)
    return m, m


def _meminfo(key: bytes) -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory_bytes() -> int | None:
    """MemFree of /proc/meminfo (memory that takes a new page without evicting one), or None."""
    return _meminfo(b"MemFree:")


_WATERMARK: list[int] = []


def reclaim_watermark_bytes() -> int:
    """The sum of every zone's high watermark (/proc/zoneinfo; 0 where unknown): below it, new
    pages come from reclaim (kswapd frees pages until free memory is back above it)."""
    if not _WATERMARK:
        pages = 0
        try:
            with open("/proc/zoneinfo", "rb") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == b"high":
                        pages += int(parts[1])
        except (OSError, ValueError):
            pages = 0
        _WATERMARK.append(pages * PAGE)
    return _WATERMARK[0]


def memory_cgroup_limit(membership: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The smallest memory limit on this process's cgroup and its ancestors (cgroup v1 memory
    controller, or v2 memory.max, mounted under `root`) below the machine's memory, or None
    (also when the files say something unexpected)."""
    total = _meminfo(b"MemTotal:")
    try:
        with open(membership, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if "memory" in controllers.split(","):
            candidates.append((os.path.join(root, "memory"), path, "memory.limit_in_bytes"))
        elif controllers == "":
            candidates += [(r, path, "memory.max") for r in (root, os.path.join(root, "unified"))]
    limits = []
    for base, path, name in candidates:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], name), "rb") as f:
                    text = f.read().strip()
                if text.isdigit():  # bytes.isdigit: ASCII digits only
                    limits.append(int(text))
            except (OSError, ValueError):
                continue
    finite = [x for x in limits if total is None or x < total]
    return min(finite) if finite else None


def reads_may_evict(needs: Mapping[MappedFile, int]) -> bool:
    """Whether reading `needs[f]` bytes of each mapped file f in one streaming pass may have to
    evict page-cache pages: the part of them not in the page cache (each file's resident share,
    sampled) exceeds the free memory above the reclaim watermark. False under a memory cgroup
    limit: there, mapped reads measured as fast or faster than copies (768 MiB: 4 x ViT-L/14
    0.91-0.97x the floor mapped, 1.08x copied; 8 x ViT-G/14 even; README)."""
    free = free_memory_bytes()
    if free is None or not needs or memory_cgroup_limit() is not None:
        return False
    room = max(free - reclaim_watermark_bytes(), 0)
    missing = 0.0
    for f, need in needs.items():
        resident = f.resident_bytes()
        if resident is None:
            return False
        missing += need * (1 - resident / f.size) if f.size else 0
        if missing > room:
            return True
    return False


_LIVE: weakref.WeakSet[MappedFile] = weakref.WeakSet()
# (path, begin, end) of every byte range of a mapped input that is viewed, addressed or
# prefetched, when a test sets it to a list (tests/test_distributed.py: what each rank reads)
ACCESS_LOG: list[tuple[str, int, int]] | None = None


def check_guard() -> None:
    """Raise InputError naming the file if a mapped input lost pages to a truncation since the
    last call (the guarded mappings then read zeros there)."""
    try:
        from soupkern import _native
    except ImportError:
        return
    count, address = _native.guard_take()
    if count:
        owner = next((f for f in list(_LIVE) if f.owns(address)), None)
        raise InputError(_TRUNCATED, path=owner.path if owner else "an input")


class MappedFile:
    """A whole file behind a read-only, shared, guarded mapping with zero-copy byte views;
    `tensors` (name -> TensorInfo with absolute byte offsets) come from the subclass's `_parse`,
    run on the open descriptor before the file is mapped.

    The file is never modified. `release` drops mapped pages from this process (they stay in
    the page cache) so resident memory stays bounded.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        fd = open_regular(self.path)
        try:
            st = os.fstat(fd)
            self.signature = _signature(st)
            self.size = st.st_size
            self._parse(fd, self.size)
            try:
                self._mm, self._buffer = _map(fd, self.size)
            except OSError as e:
                raise InputError(f"cannot map the file ({e.strerror})", path=self.path) from None
        finally:
            os.close(fd)
        self._advise(mmap.MADV_SEQUENTIAL, 0, self.size)
        self._can_populate = True
        _LIVE.add(self)

    def _parse(self, fd: int, size: int) -> None:
        self.tensors, self.metadata = {}, {}

    def _advise(self, advice: int, begin: int, length: int) -> None:
        if length:
            self._mm.advise(advice, begin, length)

    def owns(self, address: int) -> bool:
        """Whether `address` lies in this file's mapping (to attribute a guarded fault)."""
        base = getattr(self._mm, "address", None)
        return base is not None and base <= address < base + self.size

    def check_unchanged(self) -> None:
        """Raise InputError if the file changed since it was opened (size, mtime, inode):
        best effort against a rewrite in place, which no reader can fully detect."""
        check_guard()
        try:
            now = _signature(os.stat(self.path))
        except OSError as e:
            raise InputError(_REMOVED.format(e.strerror), path=self.path) from None
        self._check_signature(now)

    def _check_signature(self, now: tuple[int, int, int, int]) -> None:
        if now != self.signature:
            raise InputError(_TRUNCATED if now[0] < self.signature[0] else _TRUNCATED.replace("truncated", "modified"),
                             path=self.path)

    def view(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> memoryview:
        """Read-only uint8 memoryview of bytes [start, stop) of a tensor's data; no copy."""
        stop = info.nbytes if stop is None else stop
        if ACCESS_LOG is not None:
            ACCESS_LOG.append((self.path, info.begin + start, info.begin + stop))
        return memoryview(self._buffer)[info.begin + start:info.begin + stop]

    def address(self, info: TensorInfo) -> int | None:
        """The address of a tensor's bytes in this process (None without the native mapping)."""
        base = getattr(self._mm, "address", None)
        if ACCESS_LOG is not None and base is not None:
            ACCESS_LOG.append((self.path, info.begin, info.end))
        return None if base is None else base + info.begin

    def prefetch(self, begin: int, end: int) -> None:
        """Map the pages of file bytes [begin, end) in one call instead of one fault per 64 KiB."""
        if ACCESS_LOG is not None and end > begin:
            ACCESS_LOG.append((self.path, begin, end))
        if end <= begin or not self._can_populate:
            return
        b = begin - begin % PAGE
        err = self._mm.populate(b, end - b)
        if err == errno.EFAULT:  # pages past the end of the file: it was truncated under us
            raise InputError(_TRUNCATED, path=self.path)
        if err:  # kernel without MADV_POPULATE_READ: fall back to ordinary faults
            self._can_populate = False

    def open_for_reads(self) -> int:
        """A new read-only descriptor of this file for `read_into` (the caller closes it), checked
        to be the file that was opened; InputError naming the file otherwise."""
        try:
            fd = open_regular(self.path)
        except InputError:
            try:
                os.stat(self.path)
                reason = "it cannot be opened now"
            except OSError as e:
                reason = e.strerror
            raise InputError(_REMOVED.format(reason), path=self.path) from None
        try:
            self._check_signature(_signature(os.fstat(fd)))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_into(self, begin: int, out: Bytes, fd: int | None = None) -> None:
        """Copy file bytes [begin, begin + out.nbytes) into `out` (writable bytes) with
        pread, through `fd` (from `open_for_reads`) or else a descriptor opened for this call;
        thread-safe. Raises InputError, naming the file, when it was replaced, modified, removed
        or truncated since it was opened."""
        n = out.nbytes
        if ACCESS_LOG is not None and n:
            ACCESS_LOG.append((self.path, begin, begin + n))
        own = fd is None
        if own:
            fd = self.open_for_reads()
        try:
            done = 0
            while done < n:
                try:
                    got = os.preadv(fd, [out[done:]], begin + done)
                except OSError as e:
                    raise InputError(f"cannot read ({e.strerror})", path=self.path) from None
                if got == 0:
                    raise InputError(_TRUNCATED, path=self.path)
                done += got
        finally:
            if own:
                os.close(fd)

    def resident_bytes(self) -> int | None:
        """About how many of this file's bytes are in the page cache: mincore over the first
        256 KiB of every 4 MiB (page cache fills and empties in runs of pages, so the sample
        reads 1/16 of the pages for a close estimate); None without the native mapping."""
        base = getattr(self._mm, "address", None)
        mincore = function("mincore", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p))
        if base is None or mincore is None or self.size == 0:
            return None
        window, stride = 256 << 10, 4 << 20
        vec = ctypes.create_string_buffer(window // PAGE)
        resident = sampled = 0
        for off in range(0, self.size, stride):
            n = min(window, self.size - off)
            pages = -(-n // PAGE)
            if mincore(base + off, n, ctypes.addressof(vec)) != 0:
                return None
            resident += count_odd(vec.raw[:pages])
            sampled += pages
        return round(self.size * resident / sampled)

    def release(self, begin: int, end: int) -> None:
        """Unmap the pages covering file bytes [begin, end) from this process."""
        b = begin - begin % PAGE
        e = min(-(-end // PAGE) * PAGE, self.size)
        if e > b:
            self._advise(mmap.MADV_DONTNEED, b, e - b)

    def close(self) -> None:
        """Drop this file's mapping; views still held keep it alive until they go."""
        _LIVE.discard(self)
        if isinstance(self._mm, _PyMapping):
            self._mm.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self.tensors)} tensors)"


class SafetensorsFile(MappedFile):
    """One safetensors file: validated header, then a MappedFile."""

    def _parse(self, fd: int, size: int) -> None:
        if size < 8:
            raise HeaderError(f"file has {size} bytes, fewer than the 8-byte header length", path=self.path)
        (n,) = struct.unpack("<Q", _pread(fd, 8, 0, self.path))
        if n > MAX_HEADER_BYTES:
            raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit{_looks_like(fd)}",
                              path=self.path)
        if 8 + n > size:
            raise HeaderError(f"header length {n} runs past the end of the {size}-byte file{_looks_like(fd)}",
                              path=self.path)
        raw = _pread(fd, n, 8, self.path)
        self.tensors, self.metadata = parse_header(raw, size - 8 - n, self.path)


@dataclass
class Checkpoint:
    """A single file or a sharded checkpoint: tensor name -> (file, tensor info)."""

    path: str
    files: list[SafetensorsFile]
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    key_used: bool = False  # whether a state_dict_key picked this checkpoint's tensors

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def check_unchanged(self) -> None:
        """Raise InputError naming the file if any of its files changed since it was opened."""
        for f in self.files:
            f.check_unchanged()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_index(index_path: Path) -> Checkpoint:
    fd = open_regular(os.fspath(index_path))
    try:
        size = os.fstat(fd).st_size
        if size > MAX_HEADER_BYTES:
            raise InputError(f"index file of {size} bytes exceeds the {MAX_HEADER_BYTES}-byte limit", path=index_path)
        raw = _pread(fd, size, 0, os.fspath(index_path))
    finally:
        os.close(fd)
    weight_map, metadata = parse_index(raw, os.fspath(index_path))
    files: dict[str, SafetensorsFile] = {}
    try:
        for shard in sorted(set(weight_map.values())):
            files[shard] = SafetensorsFile(index_path.parent / shard)
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
    return Checkpoint(os.fspath(index_path), list(files.values()), tensors, metadata)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def open_checkpoint(source: object, *, state_dict_key: str | None = None, label: str | None = None,
                    strip_wrappers: bool = True) -> Checkpoint:
    """Open any tensor source: a `.safetensors` file, a `model.safetensors.index.json`, a folder
    holding either; a PyTorch pickle (`.pt`, `.pth`, `.bin`, ...) or a folder with
    `pytorch_model.bin` (or its index); a DCP folder (`.metadata` + `*.distcp`); or, in memory, a
    state dict or nn.Module (named `label` in messages). `state_dict_key` picks the state dict
    inside a pickle, DCP folder or in-memory container (soupkern/io/sources.py).

    `strip_wrappers`: when every tensor name starts with `module.` (saved from DDP) or
    `_orig_mod.` (from a torch.compile'd module), the prefix is dropped, with a notice, so such
    an ingredient matches the others and the model."""
    from soupkern.io.sources import Renamed, apply_renames

    if isinstance(source, Renamed):
        ck = open_checkpoint(source.source, state_dict_key=state_dict_key, label=label, strip_wrappers=strip_wrappers)
        try:
            apply_renames(ck, source.prefixes)
        except BaseException:
            ck.close()
            raise
        return ck
    ck = _open_any(source, state_dict_key, label)
    if strip_wrappers:
        _strip_wrappers(ck)
    return ck


def _strip_wrappers(ck: Checkpoint) -> None:
    names = list(ck.tensors)
    dropped = ""
    while names:
        prefix = next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) and len(n) > len(p) for n in names)), None)
        if prefix is None:
            break
        dropped += prefix
        names = [n[len(prefix):] for n in names]
    if dropped:
        log.warning("%s: every tensor name starts with '%s' (a DDP or torch.compile wrapper); souping them without it",
                    ck.path, dropped)
        ck.tensors = dict(zip(names, ck.tensors.values()))


def _open_any(source: object, state_dict_key: str | None, label: str | None) -> Checkpoint:
    from soupkern.io import sources

    if sources.is_in_memory(source):
        return sources.state_dict_checkpoint(source, label or "<state dict>", state_dict_key=state_dict_key)
    if not os.fspath(source):  # type: ignore[call-overload]
        raise InputError("an empty path names no checkpoint")
    p = Path(source)  # type: ignore[arg-type]
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return _open_index(p / INDEX_NAME)
        if (p / SINGLE_NAME).is_file():
            p = p / SINGLE_NAME
        elif (kind := sources.folder_kind(p)) is not None:
            return sources.open_folder(p, kind, state_dict_key)
        else:
            found = sorted(f for f in p.glob("*.safetensors") if f.is_file())
            if len(found) != 1:
                raise InputError(
                    f"folder has no {INDEX_NAME}, {SINGLE_NAME}, {sources.TORCH_BIN_SINGLE} or DCP "
                    f"{sources.DCP_METADATA}, and {len(found)} *.safetensors files", path=p
                )
            m = SHARD_NAME.match(found[0].name)
            if m and m.group(2) != "00001":
                raise InputError(f"'{found[0].name}' is one shard of a sharded checkpoint whose {INDEX_NAME} is missing", path=p)
            p = found[0]
    elif p.name.endswith(".bin.index.json"):
        return sources.open_folder(p.parent, "pickle-index", state_dict_key) if p.name == sources.TORCH_BIN_INDEX \
            else sources._open_pickle_index(p, state_dict_key)
    elif p.name.endswith(".index.json"):
        return _open_index(p)
    elif not p.exists():
        raise InputError("no such file or folder", path=p)
    elif sources.sniff(os.fspath(p)) == "pickle":
        return sources.open_pickle(p, state_dict_key)
    f = SafetensorsFile(p)
    return Checkpoint(os.fspath(p), [f], {name: (f, info) for name, info in f.tensors.items()}, dict(f.metadata))
