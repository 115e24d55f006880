"""Streaming safetensors writer: pre-computed headers, pre-sized temporary files, atomic commit.

Output bytes go through one reusable staging window (`reserve`) that maps onto a contiguous
range of an output file; the window is written with pwrite when the next reservation does not
continue it.

Nothing lost (soupkern/io/atomic.py has the primitives): an output path holds its previous
content or the complete new soup, never nothing and never a mix. A file output is written as a
temporary file beside it and renamed into place (without `overwrite`: a no-replace rename, so
of two runs only one can succeed). A folder output (sharded, or `out/`) is built whole as a
temporary folder beside the target and swapped in with one RENAME_EXCHANGE (two renames where
the filesystem lacks it; the next run repairs an interruption between them). A lock file held
for the writer's whole life refuses a second run on the same output and tells live artifacts
from those of a killed run, which the next run into the folder removes. SIGINT, SIGTERM and
SIGHUP raise `Interrupted` so cleanup runs, and are held back during the commit's renames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from soupkern.errors import InputError, Interrupted, OutputError
from soupkern.io import atomic
from soupkern.io.buffers import aligned_bytes
from soupkern.options import check_shard_size
from soupkern.io.format import DTYPES, MAX_HEADER_BYTES, METADATA_KEY, parse_index
from soupkern.io.reader import INDEX_NAME, SINGLE_NAME, SafetensorsFile, open_regular

log = logging.getLogger("soupkern")
ADAPTER_NAME = "adapter_model.safetensors"  # a PEFT adapter soup's weights (soupkern.lora)
PROVENANCE_NAME = "soupkern_provenance.json"  # a DCP soup folder's record: metadata and files
FILES_KEY = "soupkern.files"  # metadata: the names of every file soupkern wrote into a folder output


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    path: Path
    header: bytes  # 8-byte length + JSON padded with spaces to a multiple of 8
    size: int
    placements: dict[str, tuple[int, int]]  # name -> absolute [begin, end) in this file


@dataclass
class OutputLayout:
    """Where every output tensor goes: shard files (and an index when there are several).

    `target` is what appears at the end: the output file, or the output folder (`folder` True)."""

    shards: list[Shard]
    index_path: Path | None
    where: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (shard, begin, end)
    target: Path = Path()
    folder: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards] + ([self.index_path] if self.index_path else [])

    def file_names(self) -> list[str]:
        return [p.name for p in self.paths]


def output_path(out: object) -> str:
    """The output argument as text: str, bytes or os.PathLike; anything else is refused."""
    if isinstance(out, (str, bytes)) or hasattr(out, "__fspath__"):
        text = os.fsdecode(os.fspath(out))  # type: ignore[arg-type]
        if not text or "\0" in text:
            raise InputError(f"output path {out!r} is empty or holds a NUL byte")
        return text
    raise InputError(f"output path must be a str or os.PathLike, got {type(out).__name__} {out!r}")


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`__metadata__` must map strings to strings (the safetensors format); refuse anything else."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InputError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InputError(f"metadata must map str to str (the safetensors format); entry {k!r}: {v!r} is not")
        if k == METADATA_KEY:
            raise InputError(f"metadata key {k!r} is reserved")
    return dict(metadata)


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    entries: dict[str, object] = {METADATA_KEY: metadata}
    rel: dict[str, tuple[int, int]] = {}
    cursor = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        rel[t.name] = (cursor, cursor + t.nbytes)
        cursor += t.nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {k: (base + b, base + e) for k, (b, e) in rel.items()}


def output_target(out: object) -> Path:
    """The absolute path an output argument names under plan_output's rules (file or folder)."""
    return Path(os.path.abspath(output_path(out)))


def plan_output(
    tensors: Iterable[OutputTensor],
    out: str | os.PathLike[str],
    metadata: Mapping[str, str] | None,
    max_shard_size: int | None = None,
    extra_names: Sequence[str] = (),
    single_name: str = SINGLE_NAME,
) -> OutputLayout:
    """Lay out the output: tensors sorted by (item size descending, name), so every tensor is
    aligned to its item size.

    Output path rules: `out` names a file, unless it ends with a path separator, is an existing
    folder, or `max_shard_size` is given: then it names a folder that receives HF-style shards
    `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` (a single
    `model.safetensors` when everything fits in one shard, or without `max_shard_size`). A folder
    output whose name ends in `.safetensors` is refused (it reads like a file name). `extra_names`:
    the other files the writer puts into a folder output (recorded as soupkern's); `single_name`:
    the file name of a one-shard folder (PEFT reads `adapter_model.safetensors`)."""
    text = output_path(out)
    meta = {"format": "pt", **check_metadata(metadata)}
    order = sorted(tensors, key=lambda t: (-DTYPES[t.dtype], t.name))
    target = Path(os.path.abspath(text))
    folder = max_shard_size is not None or text.endswith(("/", os.sep)) or target.is_dir()
    check_shard_size(max_shard_size)
    if folder and target.name.endswith(".safetensors") and not target.is_dir():
        raise InputError(f"{text}: a sharded or folder output is a folder, but this name ends in .safetensors; "
                         f"give a folder path (e.g. '{text[: -len('.safetensors')]}/') or drop --max-shard-size")
    if folder and target.parent == target:
        raise InputError(f"{text}: the root folder cannot be an output folder")
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in order:
        if max_shard_size is not None and groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    layout = OutputLayout([], None, target=target, folder=folder)
    n = len(groups)
    names = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if folder:
        meta[FILES_KEY] = json.dumps(names + ([INDEX_NAME] if n > 1 else []) + sorted(extra_names))
    for i, group in enumerate(groups):
        path = target / names[i] if folder else target
        header, placements = _header(group, meta)
        layout.shards.append(Shard(path, header, len(header) + sum(t.nbytes for t in group), placements))
        for name, (b, e) in placements.items():
            layout.where[name] = (i, b, e)
    if n > 1:
        layout.index_path = target / INDEX_NAME
    return layout


def _same_file(a: Path | str, b: Path | str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


_KINDS = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder")]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _header_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a valid safetensors file at `path` (not a symlink), else None."""
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        f = SafetensorsFile(path)
    except (InputError, OSError):
        return None
    f.close()
    return f.metadata


def soupkern_files(folder: Path) -> set[str] | None:
    """The files of `folder` that a soupkern soup consists of (its index, the shards the index
    names, and what its provenance lists), or None when the folder holds no soupkern checkpoint."""
    files: set[str] = set()
    provenance = folder / PROVENANCE_NAME
    if provenance.is_file() and not provenance.is_symlink():  # a DCP soup folder
        try:
            with open(provenance, "rb") as f:
                data = json.loads(f.read(MAX_HEADER_BYTES))
            listed = data["files"] if "soupkern.version" in data.get("metadata", {}) else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            return None
        return {*listed, PROVENANCE_NAME}
    index = folder / INDEX_NAME
    if os.path.lexists(index):
        try:
            fd = open_regular(os.fspath(index))
            try:
                size = os.fstat(fd).st_size
                raw = os.pread(fd, size, 0) if size <= MAX_HEADER_BYTES else b""
            finally:
                os.close(fd)
            weight_map, _ = parse_index(raw, os.fspath(index))
        except (InputError, OSError):
            return None
        shards = sorted(set(weight_map.values()))
        files.add(INDEX_NAME)
    else:
        shards = [SINGLE_NAME] if os.path.lexists(folder / SINGLE_NAME) or not os.path.lexists(
            folder / ADAPTER_NAME) else [ADAPTER_NAME]
    for shard in shards:
        meta = _header_metadata(folder / shard)
        if meta is None or "soupkern.version" not in meta:
            return None
        files.add(shard)
        try:
            listed = json.loads(meta.get(FILES_KEY, "[]"))
            files.update(n for n in listed if isinstance(n, str))
        except ValueError:
            pass
    return files


class StagedWriter:
    """Tensor bytes into shard files through one reusable staging window: consecutive
    reservations fill the window, which goes out by one pwrite when the next reservation is not
    contiguous or on `flush`. Subclasses own the files (`_fds[shard]`) and `target`."""

    layout: OutputLayout
    _staging: memoryview
    _fds: Any
    _win: tuple[int, int, int] | None
    bytes_written: int

    @property
    def target(self) -> Path:
        return self.layout.target

    @property
    def staging_bytes(self) -> int:
        return len(self._staging)

    def reserve(self, name: str, start: int, nbytes: int) -> memoryview:
        """Writable view for bytes [start, start + nbytes) of tensor `name`'s data.

        Valid until the next `reserve`/`flush`; nbytes must not exceed `staging_bytes`.
        """
        atomic.check_cancelled()
        shard, begin, end = self.layout.where[name]
        off = begin + start
        if nbytes > len(self._staging) or off + nbytes > end:
            raise ValueError(f"bad reservation of {nbytes} bytes at {start} of '{name}'")
        if self._win is not None:
            wshard, wstart, used = self._win
            if wshard == shard and wstart + used == off and used + nbytes <= len(self._staging):
                self._win = (shard, wstart, used + nbytes)
                return self._staging[used : used + nbytes]
            self.flush()
        self._win = (shard, off, nbytes)
        return self._staging[:nbytes]

    def flush(self) -> None:
        if self._win is not None:
            shard, wstart, used = self._win
            self._win = None
            self._pwrite(self._fds[shard], self._staging[:used], wstart)
            self.bytes_written += used

    def _guard_io(self, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except OSError as e:  # ENOSPC, EIO, EDQUOT...: name the output, keep errno
            err = OutputError(f"{self.target}: writing the output failed ({e.strerror}); nothing was replaced")
            err.errno = e.errno
            raise err from None

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        while len(data):
            n = self._guard_io(os.pwrite, fd, data, offset)
            data, offset = data[n:], offset + n  # type: ignore[operator]



class ShardWriter(StagedWriter):
    """Writes the tensor data of some shards of a layout into shard files that another process
    created with their headers (rank 0's SoupWriter, in its temporary folder): a distributed
    soup's other ranks. Never creates, renames or removes a file."""

    def __init__(self, layout: OutputLayout, stage: Path, shards: Iterable[int], staging_bytes: int = 8 << 20):
        self.layout = layout
        self._staging = aligned_bytes(max(staging_bytes, 1))
        self._win = None
        self.bytes_written = 0
        self._fds: dict[int, int] = {}
        try:
            for i in shards:
                self._fds[i] = os.open(stage / layout.shards[i].path.name, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise OutputError(f"{self.target}: cannot open a shard in the temporary folder {stage} ({e.strerror})") from None

    def close(self, fsync: bool = False) -> None:
        """Flush, optionally fsync, and close every shard file."""
        try:
            if self._fds:
                self.flush()
                if fsync:
                    for fd in self._fds.values():
                        self._guard_io(os.fsync, fd)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}


def _foreign_files(folder: Path, mine: set[str]) -> list[str]:
    """The paths under `folder` (relative, POSIX) that are not regular files its soup provenance
    lists (subfolders' files included: a sentence-transformers module's `1_Pooling/config.json`);
    symbolic links and special files are always foreign."""
    out = []
    for here, dirs, files in os.walk(folder):  # does not follow symbolic links to folders
        rel = Path(here).relative_to(folder)
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(here, d))):
            path = (rel / name).as_posix()
            full = Path(here) / name
            if path not in mine or full.is_symlink() or not full.is_file():
                out.append(path)
    return out


class SoupWriter(StagedWriter):
    """Writes an OutputLayout. Use as a context manager and call `commit()` at the end; leaving
    the block without committing (an exception, a signal) removes every temporary file.

    `verify` runs just before the commit (e.g. checks that no input changed while it was read);
    its exception aborts the commit. `extra_files` (name -> bytes) go into a folder output."""

    def __init__(
        self,
        layout: OutputLayout,
        *,
        inputs: Iterable[str] = (),
        staging_bytes: int = 8 << 20,
        overwrite: bool = False,
        fsync: bool = False,
        verify: Callable[[], None] | None = None,
        extra_files: Mapping[str, bytes] | None = None,
    ):
        self.layout = layout
        self._inputs = [os.fspath(p) for p in inputs]
        self._overwrite = overwrite
        self._fsync = fsync
        self._verify = verify
        self._extra = dict(extra_files or {})
        if self._extra and not layout.folder:
            raise InputError("extra files need a folder output")
        self._staging = aligned_bytes(max(staging_bytes, 1))
        self._staging[:] = bytes(len(self._staging))  # fault the pages in once, here, not in the hot loop
        self._fds: list[int] = []
        self._stage: Path | None = None  # the temporary file, or the temporary folder
        self._lock: atomic.OutputLock | None = None
        self._own_lock = True
        self._exits = contextlib.ExitStack()
        self._win: tuple[int, int, int] | None = None  # (shard, file offset of window start, used bytes)
        self._committed = False
        self.bytes_written = 0
        self.notices: list[str] = []

    def add_file(self, name: str, data: bytes) -> None:
        """One more companion file of a folder output, written into it at commit (a record of
        files another library wrote into `stage_folder`)."""
        assert self.layout.folder, "add_file on a file output"
        self._extra[name] = data

    @property
    def stage_folder(self) -> Path:
        """The temporary folder a folder output is built in (inside the `with` block), for files
        written by another library (a DCP save); they are swapped in with the rest at commit."""
        assert self._stage is not None and self.layout.folder, "stage_folder of a file output or outside the block"
        return self._stage

    # -- checks -------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse, before anything is written: an output that is (or holds) an input; an existing
        output without overwrite; a non-regular output (FIFO, device, symlink), ever; a folder
        holding files soupkern did not write, ever; a missing parent folder; a too-small disk."""
        target = self.target
        for src in self._inputs:
            if _same_file(target, src) or any(_same_file(p, src) for p in self.layout.paths):
                raise OutputError(f"{target}: output path is one of the inputs ({src}); choose another output path")
        try:
            st = os.stat(target, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OutputError(f"{target}: cannot check the output path ({e.strerror})") from None
        if st is not None:
            self._check_existing(st)
        parent = target.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: output folder does not exist")
        free = shutil.disk_usage(parent).free
        need = self.layout.total_bytes
        if free < need:
            raise OutputError(f"{parent}: {_size(need)} needed for the output but only {_size(free)} free")

    def _check_existing(self, st: os.stat_result) -> None:
        target = self.target
        if not self.layout.folder:
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{target}: is {_kind(st.st_mode)}, not a regular file; soupkern never replaces it")
            if not self._overwrite:
                raise OutputError(f"{target}: already exists; pass overwrite=True (--force) to replace it")
            return
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{target}: is {_kind(st.st_mode)}, not a folder; a folder output "
                              f"(sharded or ending in '/') replaces only a folder")
        if os.path.ismount(target):
            raise OutputError(f"{target}: is a mount point; a folder output is built beside its target and swapped "
                              f"in whole, which a mount point cannot be: give a folder inside it, e.g. {target / 'soup'}/")
        entries = sorted(os.listdir(target))
        for src in self._inputs:
            if _same_file(target, os.path.dirname(os.path.abspath(src))) or any(
                    _same_file(target / entry, src) for entry in entries):
                raise OutputError(f"{target}: the output folder holds an input ({src}); choose another output folder")
        if not entries:
            return
        foreign = _foreign_files(target, soupkern_files(target) or set())
        if not self._overwrite and not foreign:
            raise OutputError(f"{target}: already exists and holds a soup ({_some(entries)}); "
                              f"pass overwrite=True (--force) to replace it")
        if foreign:
            raise OutputError(f"{target}: holds {len(foreign)} file(s) soupkern did not write ({_some(foreign)}); "
                              f"replacing the folder would lose them, so it is refused: choose another output folder")

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> SoupWriter:
        self.check()
        try:
            self._exits.enter_context(atomic.signals_raise(self._interrupted))
            lock = atomic.held_lock(self.target)
            self._own_lock = lock is None
            if lock is None:
                lock = atomic.OutputLock(self.target).take()
            self._lock = lock
            self.notices = atomic.sweep(self.target.parent, own=lock, is_complete=_is_complete_output)
            for notice in self.notices:
                log.warning(notice)
            self.check()  # a repair may have put a previous output back
            self._create()
        except BaseException:
            try:
                self._abort()
            finally:
                self._exits.close()
            raise
        return self

    def _create(self) -> None:
        mask = os.umask(0)
        os.umask(mask)
        try:
            previous: os.stat_result | None = os.stat(self.target, follow_symlinks=False)
        except OSError:
            previous = None
        self._stage = atomic.artifact_path(self.target, "tmp")
        try:
            if self.layout.folder:
                os.mkdir(self._stage, 0o777)
                _keep_mode(self._stage, previous, None)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot create a temporary folder beside it ({e.strerror})") from None
        for shard in self.layout.shards:
            path = self._stage / shard.path.name if self.layout.folder else self._stage
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 & ~mask)
            except OSError as e:
                raise OutputError(f"{self.target}: cannot create a temporary file beside it ({e.strerror})") from None
            self._fds.append(fd)
            if not self.layout.folder:
                _keep_mode(path, previous, fd)
            self._guard_io(os.ftruncate, fd, shard.size)
            self._pwrite(fd, memoryview(shard.header), 0)
        atomic.pause_point("writing")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if not self._committed:
                self._abort()
        finally:
            self._exits.close()

    def _interrupted(self, signum: int) -> Interrupted:
        return Interrupted(signum, tuple(self.layout.paths) if self._committed else ())

    # -- writing ------------------------------------------------------------------------------

    # -- commit -------------------------------------------------------------------------------

    def commit(self) -> list[Path]:
        """Flush, close, verify the inputs and put the output in place. Returns the paths written."""
        assert self._stage is not None and self._lock is not None, "commit() outside the with block"
        self.flush()
        for fd in self._fds:
            if self._fsync:
                self._guard_io(os.fsync, fd)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.layout.folder:
            self._write_folder_files()
        if self._verify is not None:
            self._verify()
        atomic.pause_point("before-commit")
        with atomic.signals_deferred() as pending:
            atomic.pause_point("commit", pending)
            self._place(pending)
            if self._own_lock:
                self._lock.release(remove=True)
            self._lock = None
        return self.layout.paths + [self.target / name for name in sorted(self._extra)]

    def _write_folder_files(self) -> None:
        assert self._stage is not None
        files = dict(self._extra)
        if self.layout.index_path is not None:
            index = {
                "metadata": {"total_size": sum(s.size - len(s.header) for s in self.layout.shards),
                             FILES_KEY: self.layout.file_names() + sorted(self._extra)},
                "weight_map": {
                    name: self.layout.shards[i].path.name for name, (i, _, _) in sorted(self.layout.where.items())
                },
            }
            files[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()
        mask = os.umask(0)
        os.umask(mask)
        subfolders = sorted({(self._stage / name).parent for name in files} - {self._stage})
        for folder in subfolders:  # a sentence-transformers module's files (1_Pooling/config.json)
            folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            fd = os.open(self._stage / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 & ~mask)
            try:
                self._pwrite(fd, memoryview(data), 0)
                if self._fsync:
                    self._guard_io(os.fsync, fd)
            finally:
                os.close(fd)
        if self._fsync:
            for folder in subfolders:
                atomic.fsync_dir(folder)
            atomic.fsync_dir(self._stage)

    def _place(self, pending: list[int]) -> None:
        """The renames; runs with signals held. Sets `_committed` the moment the new output is in."""
        assert self._stage is not None
        target, stage = self.target, self._stage
        try:
            st = os.stat(target, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            self._check_existing(st)  # again: the path may have changed since the run began
        old: Path | None = None
        try:
            if st is None or not self._overwrite and not self.layout.folder:
                atomic.rename_noreplace(stage, target)
            elif not self.layout.folder:
                os.replace(stage, target)
            elif atomic.exchange(stage, target):
                old = stage  # the exchange left the previous folder at the temporary name
            else:
                old = atomic.artifact_path(target, "old")
                os.rename(target, old)
                atomic.pause_point("moved-aside", pending)
                try:
                    os.rename(stage, target)
                except OSError as e:
                    try:
                        os.rename(old, target)  # put the previous output back
                    except OSError:
                        raise OutputError(f"{target}: could not be swapped in ({e.strerror}: the path was changed "
                                          f"during the commit); the previous output is kept at {old}") from None
                    raise
        except FileExistsError:
            raise OutputError(f"{target}: appeared while the soup was being written (another process?); "
                              f"it was not replaced") from None
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            raise OutputError(f"{target}: could not be put in place ({e.strerror}); nothing was replaced") from None
        self._committed = True
        self._stage = None
        atomic.pause_point("committed", pending)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if self._fsync:
            try:
                atomic.fsync_dir(target.parent)
            except OSError as e:  # the soup is in place; only the rename's durability is in doubt
                log.warning("%s is complete, but syncing its folder failed (%s): a power loss now could undo the rename",
                            target, e.strerror)

    def _abort(self) -> None:
        with atomic.signals_deferred():
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds = []
            if self._stage is not None:
                if self._stage.is_dir():
                    shutil.rmtree(self._stage, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(self._stage)
                self._stage = None
            if self._lock is not None:
                if self._own_lock:
                    self._lock.release(remove=True)
                self._lock = None


def _is_complete_output(target: Path) -> bool:
    """Whether `target` holds a complete soupkern output (a file, or a folder of its checkpoint)."""
    try:
        st = os.stat(target, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) or (stat.S_ISDIR(st.st_mode) and soupkern_files(target) is not None)


def _keep_mode(path: Path, previous: os.stat_result | None, fd: int | None) -> None:
    """Give a replacement the permission bits (and owner, where allowed) of what it replaces."""
    if previous is None:
        return
    try:
        if fd is not None:
            os.fchmod(fd, stat.S_IMODE(previous.st_mode))
        else:
            os.chmod(path, stat.S_IMODE(previous.st_mode))
        if (previous.st_uid, previous.st_gid) != (os.geteuid(), os.getegid()):
            if fd is not None:
                os.fchown(fd, previous.st_uid, previous.st_gid)
            else:
                os.chown(path, previous.st_uid, previous.st_gid)
    except OSError:  # not ours to change (not root): the permission bits are what matters
        pass


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _some(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown if len(names) <= n else f"{shown} and {len(names) - n} more"


def folder_layout(out: str | os.PathLike[str]) -> OutputLayout:
    """The layout of a folder output whose files another library writes (no safetensors shards)."""
    target = output_target(out)
    if target.parent == target:
        raise InputError(f"{target}: the root folder cannot be an output folder")
    return OutputLayout([], None, target=target, folder=True)
