"""Filesystem primitives behind the writer's guarantee: an output path holds its previous content
or the complete new soup, never nothing and never a mix, whatever signal arrives and whenever.

- Every artifact of a run that writes output NAME lives beside it, named `.KEY.soupkern-lock`,
  `.KEY.soupkern-tmp-XXXXXXXX` (the new file or folder being written) or `.KEY.soupkern-old-XXXXXXXX`
  (a replaced folder on its way out); KEY is NAME, or a prefix of it plus a hash when NAME is long.
- The run holds an fcntl lock (open-file-description lock; POSIX record lock where those are
  missing) on the lock file for its whole life, so a second run on the same output is refused at
  once and a lock that nobody holds marks artifacts of a run that died (SIGKILL, power loss):
  `sweep` removes those, restoring a replaced folder when the run died between the two renames of
  the fallback swap, and never touches artifacts of a live run, on this host or another.
- Commits are renames: `renameat2(RENAME_NOREPLACE)` without overwrite (two runs can never both
  succeed), `rename` over a file, `renameat2(RENAME_EXCHANGE)` to swap a whole folder in, and a
  two-rename swap (old folder aside, new one in) where the filesystem lacks RENAME_EXCHANGE.
- `signals_deferred` holds SIGINT/SIGTERM/SIGHUP for the few system calls of a commit, so no
  interrupt can land between a rename and the bookkeeping that follows it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from soupkern.libc import libc

log = logging.getLogger("soupkern")

LOCK_SUFFIX = ".soupkern-lock"
ARTIFACT = re.compile(r"^\.(?P<key>.+)\.soupkern-(?:(?P<lock>lock)|(?P<kind>tmp|old)-[0-9a-f]{8})$")
_MAX_KEY_BYTES = 180
HANDLED_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def artifact_key(name: str) -> str:
    """The KEY of an output's artifacts: its name, shortened with a hash so every artifact name
    stays within NAME_MAX (255 bytes) however long the output's name is."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _MAX_KEY_BYTES:
        return name
    import hashlib  # here: loading OpenSSL costs every run's start-up several ms

    head = raw[:120].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:16]}"


def artifact_path(target: Path, kind: str) -> Path:
    """A fresh artifact path beside `target`: kind is 'tmp' or 'old'."""
    return target.parent / f".{artifact_key(target.name)}.soupkern-{kind}-{os.urandom(4).hex()}"


def lock_path(target: Path) -> Path:
    return target.parent / f".{artifact_key(target.name)}{LOCK_SUFFIX}"


# ---------------------------------------------------------------------------------------------
# locks

def _flock_struct(kind: int) -> bytes:
    # struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;}
    return struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, 0, 0, 0)


def _try_lock(fd: int) -> bool:
    """Exclusive non-blocking lock on the whole file; False when another open file holds it."""
    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
                return True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


class OutputLock:
    """The lock file of one output, held from `acquire` to `release` (which removes the file)."""

    def __init__(self, target: Path):
        self.target = target
        self.path = lock_path(target)
        self.fd: int | None = None

    def acquire(self, create: bool = True, wait_s: float = 1.0) -> bool:
        """Take the lock; False if a live run holds it (after retrying for `wait_s`: another run's
        sweep may hold it for a moment). Safe against a holder removing the file: after locking,
        the path must still name the locked inode, else try again. `create=False`: only an
        existing lock file (a sweep must not create lock files for other outputs)."""
        deadline = time.monotonic() + wait_s
        for _ in range(10_000):
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:
                if create:  # the folder itself is missing
                    raise
                return False
            try:
                if not _try_lock(fd):
                    os.close(fd)
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.05)
                    continue
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    self.fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the previous holder removed it between our open and our lock
            if not create:
                return False
        return False

    def take(self) -> OutputLock:
        """Acquire and record the owner, or raise OutputError saying who holds the lock."""
        from soupkern.errors import OutputError

        try:
            got = self.acquire()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create the output's lock file ({e.strerror})") from None
        if not got:
            raise OutputError(f"{self.target}: another soupkern run ({self.owner()}) is writing this output; "
                              f"wait for it to finish or choose another output path")
        self.write_owner()
        return self

    def write_owner(self) -> None:
        assert self.fd is not None
        info = {"output": self.target.name, "pid": os.getpid(), "host": os.uname().nodename, "started": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def owner(self) -> str:
        """Who holds it, for messages: 'pid P on host H'."""
        try:
            info = json.loads(self.path.read_bytes() or b"{}")
            return f"pid {info['pid']} on host {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self, remove: bool = True) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


_HELD: dict[Path, OutputLock] = {}


@contextlib.contextmanager
def output_reserved(target: Path) -> Iterator[OutputLock | None]:
    """Hold `target`'s output lock for a whole recipe (greedy, learned: evaluations before the
    write), so a concurrent run on the same output is refused before it does any work; the
    writer inside reuses this lock instead of taking its own."""
    if target in _HELD or not target.parent.is_dir():  # a missing folder is reported by the output checks
        yield _HELD.get(target)  # type: ignore[misc]
        return
    lock = OutputLock(target).take()
    _HELD[target] = lock
    try:
        yield lock
    finally:
        _HELD.pop(target, None)
        lock.release(remove=True)


def held_lock(target: Path) -> OutputLock | None:
    """The lock `output_reserved` holds for `target` in this process, if any."""
    return _HELD.get(target)


def _owner_name(lock_file: Path, key: str) -> str | None:
    """The output name a lock file guards (its content, else the key when the key is the name)."""
    try:
        name = json.loads(lock_file.read_bytes() or b"{}").get("output")
        if isinstance(name, str) and artifact_key(name) == key:
            return name
    except (OSError, ValueError, AttributeError):
        pass
    return key if artifact_key(key) == key else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def repair(folder: Path, key: str, target_name: str | None,
           is_complete: Callable[[Path], bool] = lambda p: True) -> list[str]:
    """Undo what a dead run left for KEY in `folder` (its lock must be held by the caller): put a
    replaced folder back when the run died between the two renames of a fallback swap; delete
    temporaries; delete a moved-aside old folder only once the target holds a complete new output
    (`is_complete`), otherwise keep it and say where it is. Returns what was done, for notices."""
    done: list[str] = []
    tmps, olds = [], []
    for entry in os.listdir(folder):
        m = ARTIFACT.match(entry)
        if m and m.group("key") == key and not m.group("lock"):
            (olds if m.group("kind") == "old" else tmps).append(folder / entry)
    target = folder / target_name if target_name is not None else None
    if olds and target is not None and not os.path.lexists(target):
        keep = max(olds, key=lambda p: p.stat(follow_symlinks=False).st_mtime_ns)
        os.rename(keep, target)
        olds.remove(keep)
        done.append(f"restored {target} from {keep.name}, which an interrupted swap had moved aside")
    for p in tmps:
        _remove(p)
        done.append(f"removed {p}, left by an interrupted soupkern run")
    for p in olds:
        if target is not None and is_complete(target):
            _remove(p)
            done.append(f"removed {p}, the previous output an interrupted run had replaced")
        else:
            done.append(f"kept {p}: the previous output, moved aside by an interrupted run; "
                        f"{target or 'its target'} now holds something else, so move it back yourself")
    return done


def sweep(folder: Path, own: OutputLock | None = None,
          is_complete: Callable[[Path], bool] = lambda p: True) -> list[str]:
    """Remove artifacts of dead runs in `folder` (those whose lock file exists and nobody holds);
    repair `own.target`'s artifacts under the lock the caller holds. Returns notices."""
    notices: list[str] = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return notices
    keys: dict[str, bool] = {}
    for entry in entries:
        m = ARTIFACT.match(entry)
        if m:
            keys[m.group("key")] = keys.get(m.group("key"), False) or bool(m.group("lock"))
    for key in sorted(keys):
        lock_file = folder / f".{key}{LOCK_SUFFIX}"
        if own is not None and own.path == lock_file:
            notices += repair(folder, key, own.target.name, is_complete)
            continue
        target_name = _owner_name(lock_file, key)
        other = OutputLock(folder / (target_name or key))
        other.path = lock_file
        try:
            if not other.acquire(create=False, wait_s=0.0):
                continue  # a live run, here or on another host (or no lock file: leave it alone)
        except OSError:
            continue
        try:
            notices += repair(folder, key, target_name, is_complete)
        finally:
            other.release(remove=True)
    return notices


# ---------------------------------------------------------------------------------------------
# renames

def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(2) through libc; OSError(ENOSYS/EINVAL) where the kernel, libc or filesystem lacks it."""
    fn = getattr(libc(), "renameat2", None)
    if fn is None or os.environ.get("SOUPKERN_TEST_NO_RENAMEAT2"):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    r = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(src), None, os.fspath(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move src to dst only if dst does not exist (FileExistsError otherwise), atomically where the
    filesystem allows (renameat2 NOREPLACE, else link + unlink for files)."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    if not src.is_dir():
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst)) from None
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):  # no atomic primitive here: the output lock is what serializes runs
        raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        _renameat2(a, b, _RENAME_EXCHANGE)
        return True
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# signals

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _is_default(signum: int, handler: object) -> bool:
    if signum == signal.SIGINT:
        return handler is signal.default_int_handler
    return handler == signal.SIG_DFL


@contextlib.contextmanager
def signals_raise(make_exc: Callable[[int], BaseException]) -> Iterator[None]:
    """While inside: the first SIGINT, SIGTERM or SIGHUP raises `make_exc(signum)` in the main
    thread, so the writer's cleanup runs (by default SIGTERM and SIGHUP kill without any cleanup);
    signals after the first are ignored until the block ends, so a second Ctrl-C cannot cut the
    cleanup short. Handlers a user installed (and ignored signals, e.g. SIGHUP under nohup) are
    left alone."""
    if not _in_main_thread():
        yield
        return
    old: dict[int, object] = {}
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise make_exc(signum)

    handler._soupkern = True  # type: ignore[attr-defined]
    try:
        for s in HANDLED_SIGNALS:
            current = signal.getsignal(s)
            if _is_default(s, current) or getattr(current, "_soupkern", False):
                old[s] = signal.signal(s, handler)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]


_CANCELLED: dict[int, int] = {}  # thread ident -> the signal that asked its writers to stop


def cancel_thread(ident: int | None, signum: int) -> None:
    """Ask the writers of thread `ident` (a torchrun rank's work under the heartbeat,
    soupkern/distributed.py), which signals do not reach, to stop at their next chunk as one in
    the main thread would: `check_cancelled` then raises Interrupted(signum) there, and the
    writer's cleanup runs in that thread. The thread ends the request (`clear_cancelled`)."""
    if ident is not None:
        _CANCELLED[ident] = signum


def clear_cancelled() -> None:
    """End a stop request for the calling thread."""
    _CANCELLED.pop(threading.get_ident(), None)


def check_cancelled() -> None:
    """Raise Interrupted in the calling thread when `cancel_thread` asked it to stop."""
    signum = _CANCELLED.get(threading.get_ident())
    if signum is not None:
        from soupkern.errors import Interrupted

        raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM/SIGHUP for the body (a few system calls), then deliver them to the
    handlers that were in place. Yields the list of signals that arrived (tests poll it)."""
    if not _in_main_thread():
        yield []
        return
    pending: list[int] = []
    old: dict[int, object] = {}
    try:
        for s in HANDLED_SIGNALS:
            old[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
    for s in dict.fromkeys(pending):
        h = old.get(s)
        if callable(h):
            h(s, None)
        elif h == signal.SIG_DFL:
            os.kill(os.getpid(), s)


# ---------------------------------------------------------------------------------------------
# the private test hook

def pause_point(point: str, pending: list[int] | None = None) -> None:
    """Pause at a named point when $SOUPKERN_TEST_PAUSE_AT names it (comma-separated): announce it
    on stderr and wait (up to 60 s) until a signal arrives or the file $SOUPKERN_TEST_RESUME
    exists, so tests can act at exactly that point. Does nothing otherwise."""
    points = os.environ.get("SOUPKERN_TEST_PAUSE_AT")
    if not points or point not in points.split(","):
        return
    print(f"soupkern-test-pause {point}", file=sys.stderr, flush=True)
    resume = os.environ.get("SOUPKERN_TEST_RESUME")
    deadline = time.monotonic() + 60
    while (time.monotonic() < deadline and not pending and threading.get_ident() not in _CANCELLED
           and not (resume and os.path.exists(resume))):
        time.sleep(0.005)  # a raising signal handler interrupts this
