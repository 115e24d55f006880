"""Streaming safetensors writer: pre-computed headers, pre-sized temporary files, atomic rename.

Output bytes go through one reusable staging window (`reserve`) that maps onto a contiguous
range of an output file; the window is written with pwrite when the next reservation does not
continue it. Nothing appears at an output path until `commit` renames complete files into place;
on any failure or interrupt the temporary files are removed.

A sharded output is a folder (created if missing). Several files cannot be renamed atomically,
so `commit` orders its steps so that no interrupted state reads back as a valid checkpoint: the
old index goes first, then the shards are renamed in (and removed again if the commit is cut
short), the index comes last, and only then are stale shards of an earlier soup removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from soupkern.errors import OutputError
from soupkern.io.format import DTYPES, METADATA_KEY
from soupkern.io.reader import INDEX_NAME, SHARD_NAME, SINGLE_NAME


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
    """Where every output tensor goes: shard files (and an index when there are several)."""

    shards: list[Shard]
    index_path: Path | None
    where: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (shard, begin, end)
    folder: Path | None = None  # set for a sharded (folder) output

    def stale(self) -> list[Path]:
        """Checkpoint files of an earlier soup in the output folder that this one does not write."""
        if self.folder is None or not self.folder.is_dir():
            return []
        mine = {p.name for p in self.paths}
        return sorted(
            f for f in self.folder.iterdir()
            if f.name not in mine and (f.name in (INDEX_NAME, SINGLE_NAME) or SHARD_NAME.match(f.name))
        )

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards] + ([self.index_path] if self.index_path else [])


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


def plan_output(
    tensors: Iterable[OutputTensor],
    out: str | os.PathLike[str],
    metadata: dict[str, str],
    max_shard_size: int | None = None,
) -> OutputLayout:
    """Lay out the output: tensors sorted by (item size descending, name), so every tensor is
    aligned to its item size; one file at `out`, or with `max_shard_size` HF-style shards
    `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` in the folder `out`
    (a single `model.safetensors` when everything fits in one shard)."""
    order = sorted(tensors, key=lambda t: (-DTYPES[t.dtype], t.name))
    meta = {"format": "pt", **metadata}
    out = Path(out)
    if max_shard_size is None:
        if out.is_dir():
            raise OutputError(f"{out}: is a folder; give a file path, or a max shard size for a sharded output")
        groups = [order]
    else:
        if max_shard_size <= 0:
            raise OutputError(f"max shard size must be positive, got {max_shard_size}")
        groups, size = [[]], 0
        for t in order:
            if groups[-1] and size + t.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
    layout = OutputLayout([], None, folder=None if max_shard_size is None else out)
    n = len(groups)
    for i, group in enumerate(groups):
        if max_shard_size is None:
            path = out
        elif n == 1:
            path = out / SINGLE_NAME
        else:
            path = out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, placements = _header(group, meta)
        size = len(header) + sum(t.nbytes for t in group)
        layout.shards.append(Shard(path, header, size, placements))
        for name, (b, e) in placements.items():
            layout.where[name] = (i, b, e)
    if n > 1:
        layout.index_path = out / INDEX_NAME
    return layout


def _same_file(a: Path, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class SoupWriter:
    """Writes an OutputLayout. Use as a context manager and call `commit()` at the end;
    leaving the block without committing (an exception, Ctrl-C) removes every temporary file."""

    def __init__(
        self,
        layout: OutputLayout,
        *,
        inputs: Iterable[str] = (),
        staging_bytes: int = 8 << 20,
        overwrite: bool = False,
        fsync: bool = False,
    ):
        self.layout = layout
        self._inputs = list(inputs)
        self._overwrite = overwrite
        self._fsync = fsync
        self._staging = np.empty(max(staging_bytes, 1), dtype=np.uint8)
        self._staging.fill(0)  # fault the pages in once, here, not in the hot loop
        self._fds: list[int] = []
        self._tmp: list[str] = []
        self._win: tuple[int, int, int] | None = None  # (shard, file offset of window start, used bytes)
        self._placed: list[Path] = []  # files renamed into place by an unfinished commit
        self._made_folder = False
        self._committed = False
        self.bytes_written = 0

    @property
    def staging_bytes(self) -> int:
        return len(self._staging)

    def check(self) -> None:
        """Refuse an output that is an input or exists (without overwrite), or a too-small disk."""
        for p in self.layout.paths:
            for src in self._inputs:
                if _same_file(p, src):
                    raise OutputError(f"{p}: output path is one of the inputs ({src}); choose another output path")
            if p.exists() and not self._overwrite:
                raise OutputError(f"{p}: already exists; pass overwrite=True (--force) to replace it")
            if p.exists() and p.is_dir():
                raise OutputError(f"{p}: is a folder")
        for p in self.layout.stale():
            for src in self._inputs:
                if _same_file(p, src):
                    raise OutputError(f"{p}: the output folder holds an input ({src}); choose another output folder")
            if not self._overwrite:
                raise OutputError(f"{p}: the output folder already holds a checkpoint; pass overwrite=True (--force) to replace it")
        folder = self.layout.shards[0].path.parent
        if not folder.is_dir() and not (self.layout.folder is not None and folder.parent.is_dir()):
            raise OutputError(f"{folder}: output folder does not exist")
        free = shutil.disk_usage(folder if folder.is_dir() else folder.parent).free
        need = self.layout.total_bytes
        if free < need:
            raise OutputError(f"{folder}: {need / 1e9:.2f} GB needed for the output but only {free / 1e9:.2f} GB free")

    def __enter__(self) -> SoupWriter:
        self.check()
        try:
            if self.layout.folder is not None and not self.layout.folder.exists():
                self.layout.folder.mkdir()
                self._made_folder = True
            mask = os.umask(0)
            os.umask(mask)
            for shard in self.layout.shards:
                fd, tmp = tempfile.mkstemp(prefix=f".{shard.path.name}.", suffix=".soupkern-tmp", dir=shard.path.parent)
                self._fds.append(fd)
                self._tmp.append(tmp)
                os.fchmod(fd, 0o666 & ~mask)
                os.ftruncate(fd, shard.size)
                self._pwrite(fd, memoryview(shard.header), 0)
        except BaseException:
            self._abort()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._committed:
            self._abort()

    def reserve(self, name: str, start: int, nbytes: int) -> np.ndarray:
        """Writable view for bytes [start, start + nbytes) of tensor `name`'s data.

        Valid until the next `reserve`/`flush`; nbytes must not exceed `staging_bytes`.
        """
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
            self._pwrite(self._fds[shard], self._staging.data[:used], wstart)
            self.bytes_written += used

    @staticmethod
    def _pwrite(fd: int, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n

    def commit(self) -> list[Path]:
        """Flush, close and rename every file into place (index last). Returns the paths written."""
        self.flush()
        for fd in self._fds:
            if self._fsync:
                os.fsync(fd)
            os.close(fd)
        self._fds = []
        stale = self.layout.stale()
        old_index = self.layout.folder / INDEX_NAME if self.layout.folder is not None else None
        if old_index is not None and old_index.exists():
            os.unlink(old_index)  # first, so no index ever points at a mix of old and new shards
        for tmp, shard in zip(self._tmp, self.layout.shards):
            self._placed.append(shard.path)
            os.replace(tmp, shard.path)
        self._tmp = []
        if self.layout.index_path is not None:
            index = {
                "metadata": {"total_size": sum(s.size - len(s.header) for s in self.layout.shards)},
                "weight_map": {
                    name: self.layout.shards[i].path.name for name, (i, _, _) in sorted(self.layout.where.items())
                },
            }
            fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_NAME}.", suffix=".soupkern-tmp", dir=self.layout.index_path.parent)
            self._tmp.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, self.layout.index_path)
            self._tmp = []
        self._committed = True
        self._placed = []
        for old in stale:
            if old.exists() and old.name != INDEX_NAME:
                os.unlink(old)
        return self.layout.paths

    def _abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for tmp in self._tmp + self._placed:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._fds, self._tmp, self._placed = [], [], []
        if self._made_folder:
            try:
                self.layout.folder.rmdir()  # type: ignore[union-attr]
            except OSError:
                pass
