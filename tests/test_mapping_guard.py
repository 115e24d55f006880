"""soupkern._native.Mapping and the SIGBUS guard (csrc/mapping.h) against independent facts: the
bytes written to the file, the page size, /proc/self/maps and /proc/self/fd, the kernel's errnos,
and how a process dies when the guard does not apply (subprocesses)."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from soupkern import _native

PAGE = mmap.PAGESIZE


@pytest.fixture(autouse=True)
def _drain_faults():
    _native.guard_take()  # no fault of another test counts here
    yield


def write_file(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def map_file(path: str, length: int | None = None) -> _native.Mapping:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _native.Mapping(fd, os.fstat(fd).st_size if length is None else length)
    finally:
        os.close(fd)  # a Mapping holds no fd


def known_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()  # no zero byte


def round_up(x: int) -> int:
    return -(-x // PAGE) * PAGE


def mapped_paths() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# --- the mapping itself -------------------------------------------------------------------------

def test_views_read_the_file_bytes(tmp_path):
    data = known_bytes(3 * PAGE + 123)
    path = write_file(tmp_path / "a.bin", data)
    m = map_file(path)
    assert m.length == len(data)
    assert m.address % PAGE == 0 and m.address != 0
    mv = memoryview(m)
    assert (mv.readonly, mv.format, mv.ndim, mv.itemsize, mv.nbytes) == (True, "B", 1, 1, len(data))
    assert bytes(mv) == data
    for offset, count in [(0, len(data)), (1, 10), (PAGE - 3, 7), (len(data) - 5, 5), (len(data), 0)]:
        v = np.frombuffer(m, dtype=np.uint8, count=count, offset=offset)
        assert v.tobytes() == data[offset:offset + count]
        assert not v.flags.writeable
        if count:
            assert v.__array_interface__["data"][0] == m.address + offset  # zero-copy
    with pytest.raises((BufferError, TypeError)):
        memoryview(m).cast("B")[0:1] = b"x"
    assert _native.guard_take() == (0, 0)


def test_zero_length(tmp_path):
    path = write_file(tmp_path / "empty.bin", b"")
    m = map_file(path, 0)
    assert (m.address, m.length) == (0, 0)
    assert bytes(memoryview(m)) == b""
    assert np.frombuffer(m, dtype=np.uint8).size == 0
    m.advise(mmap.MADV_WILLNEED, 0, 100)  # nothing to advise: no error
    assert m.populate(0, 100) == 0
    # a zero-length mapping of a non-empty file, and of an invalid fd (no mmap is made at all)
    assert map_file(write_file(tmp_path / "b.bin", b"abc"), 0).length == 0
    assert _native.Mapping(-1, 0).length == 0


def test_errors_carry_errno(tmp_path):
    with pytest.raises(OSError) as e:
        _native.Mapping(-1, 10)
    assert e.value.errno == errno.EBADF and e.value.strerror == os.strerror(errno.EBADF)
    path = write_file(tmp_path / "w.bin", b"x" * 100)
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(PermissionError) as e:  # a read mapping needs a readable fd
            _native.Mapping(fd, 100)
        assert e.value.errno == errno.EACCES
    finally:
        os.close(fd)
    m = map_file(path)
    with pytest.raises(OSError) as e:
        m.advise(12345, 0, 100)
    assert e.value.errno == errno.EINVAL


def test_advise_and_populate_ranges(tmp_path):
    data = known_bytes(8 * PAGE + 5, seed=1)
    path = write_file(tmp_path / "a.bin", data)
    m = map_file(path)
    for offset, length in [(0, len(data)), (PAGE + 1, 1), (len(data) - 1, 10 ** 12), (len(data), 10), (10 ** 12, 1)]:
        m.advise(mmap.MADV_WILLNEED, offset, length)
        m.advise(mmap.MADV_DONTNEED, offset, length)  # drops the pages of a file mapping, not the data
        r = m.populate(offset, length)
        assert r in (0, errno.EINVAL, errno.ENOSYS), os.strerror(r)
    assert bytes(memoryview(m)) == data


def test_views_keep_the_mapping_alive(tmp_path):
    data = known_bytes(2 * PAGE, seed=2)
    path = write_file(tmp_path / "alive.bin", data)
    m = map_file(path)
    view = np.frombuffer(m, dtype=np.uint8, count=PAGE, offset=PAGE)
    del m
    gc.collect()
    assert path in mapped_paths()
    assert view.tobytes() == data[PAGE:]
    del view
    gc.collect()
    assert path not in mapped_paths()  # unmapped with the last reference


def test_more_mappings_than_open_files_allowed(tmp_path):
    data = known_bytes(PAGE + 17, seed=3)
    path = write_file(tmp_path / "many.bin", data)
    r = run_python(f"""
        import os, resource, numpy as np
        from soupkern import _native
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        data = open({path!r}, "rb").read()
        for round in range(2):  # the second round reuses the slots the first one freed
            maps = []
            for i in range(200):
                fd = os.open({path!r}, os.O_RDONLY)
                maps.append(_native.Mapping(fd, len(data)))
                os.close(fd)
            assert len(os.listdir("/proc/self/fd")) < 64
            assert len({{m.address for m in maps}}) == 200
            assert all(bytes(memoryview(m)) == data for m in maps)
            del maps
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# --- the guard ----------------------------------------------------------------------------------

def truncated_mapping(tmp_path, size: int, cut: int, seed: int = 4, data: bytes | None = None):
    """A mapping of `size` known bytes, read once in full (page tables filled), then the file
    truncated to `cut` bytes."""
    data = known_bytes(size, seed) if data is None else data
    path = write_file(tmp_path / "trunc.bin", data)
    m = map_file(path)
    assert bytes(memoryview(m)) == data
    os.truncate(path, cut)
    return m, data


def check_faults(m, size: int, cut: int, exact: bool) -> None:
    count, first = _native.guard_take()
    lost = round_up(size) // PAGE - round_up(cut) // PAGE  # pages wholly past the new end
    assert count == lost if exact else count >= lost, (count, lost)
    assert m.address + round_up(cut) <= first < m.address + size, (hex(first), hex(m.address))
    assert _native.guard_take() == (0, 0)


def test_truncated_file_read_through_numpy(tmp_path):
    size, cut = 16 * PAGE + 100, 7 * PAGE + 1000
    m, data = truncated_mapping(tmp_path, size, cut)
    got = bytes(memoryview(m))  # must not kill the process
    assert got[:cut] == data[:cut]
    assert got[cut:] == bytes(size - cut)  # the tail of the last page (kernel) and lost pages (guard) read zeros
    check_faults(m, size, cut, exact=True)
    # the repaired pages stay zero and do not fault again
    v = np.frombuffer(m, dtype=np.uint8)
    assert int(v[cut:].sum()) == 0 and _native.guard_take() == (0, 0)


def test_truncated_file_read_through_the_kernel(tmp_path):
    n = 1 << 20  # F32 elements: enough for the OpenMP path, so the faults happen in worker threads
    size = 4 * n
    cut = size // 2 + 3 * PAGE + 8
    values = np.random.default_rng(5).standard_normal(n).astype(np.float32)  # finite: 1 * x == x bit for bit
    m, data = truncated_mapping(tmp_path, size, cut, data=values.tobytes())
    out = np.full(n, 7.0, dtype=np.float32)
    _native.weighted_sum(out, "F32", [m], ["F32"], [1.0], n)
    expected = np.frombuffer(data[:cut] + bytes(size - cut), dtype=np.float32)
    assert out.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()  # w = 1: exact
    check_faults(m, size, cut, exact=False)  # two threads may fault on one page


def test_truncation_to_zero_and_two_mappings(tmp_path):
    a = write_file(tmp_path / "a.bin", known_bytes(4 * PAGE, seed=6))
    b = write_file(tmp_path / "b.bin", known_bytes(4 * PAGE, seed=7))
    ma, mb = map_file(a), map_file(b)
    os.truncate(b, 0)
    assert bytes(memoryview(ma)) == open(a, "rb").read()
    assert _native.guard_take() == (0, 0)
    assert bytes(memoryview(mb)) == bytes(4 * PAGE)
    count, first = _native.guard_take()
    assert count == 4 and first == mb.address  # read in order: the first page faults first


def test_populate_reports_efault_past_the_end(tmp_path):
    size, cut = 8 * PAGE, 3 * PAGE
    data = known_bytes(size, seed=8)
    path = write_file(tmp_path / "p.bin", data)
    m = map_file(path)
    r = m.populate(0, size)
    if r in (errno.EINVAL, errno.ENOSYS):
        pytest.skip(f"this kernel has no MADV_POPULATE_READ ({os.strerror(r)})")
    assert r == 0
    os.truncate(path, cut)
    assert m.populate(0, cut) == 0
    assert m.populate(0, size) == errno.EFAULT
    assert m.populate(cut, PAGE) == errno.EFAULT
    assert _native.guard_take() == (0, 0)  # populate raises no SIGBUS
    assert bytes(memoryview(m))[:cut] == data[:cut]
    assert _native.guard_take()[0] == (size - cut) // PAGE


# --- SIGBUS outside guarded mappings still kills ------------------------------------------------

UNGUARDED = """
    import faulthandler, mmap, os, sys
    from soupkern import _native
    def mapping(path, size):
        with open(path, "wb") as f:
            f.write(b"x" * size)
        fd = os.open(path, os.O_RDONLY)
        m = _native.Mapping(fd, size)
        os.close(fd)
        return m
    d = {tmp!r}
    {setup}
    # a guarded fault is repaired ...
    g = mapping(os.path.join(d, "guarded.bin"), 4 * mmap.PAGESIZE)
    os.truncate(os.path.join(d, "guarded.bin"), 0)
    assert bytes(memoryview(g)) == bytes(4 * mmap.PAGESIZE), "guarded read"
    print("guarded", _native.guard_take()[0], flush=True)
    {after}
    # ... one in Python's own mmap is not
    p = os.path.join(d, "plain.bin")
    with open(p, "wb") as f:
        f.write(b"y" * 4 * mmap.PAGESIZE)
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(p, 0)
    print("reading", flush=True)
    mm[2 * mmap.PAGESIZE]
    print("survived", flush=True)
"""


@pytest.mark.parametrize("case,setup,after", [
    ("plain", "", ""),
    ("faulthandler first", "faulthandler.enable()", ""),
    # faulthandler replaces the guard, the next Mapping puts it back on top: a cycle of handlers
    ("faulthandler between", "mapping(os.path.join(d, 'first.bin'), 100); faulthandler.enable()", ""),
    ("faulthandler last", "", "faulthandler.enable()"),
])
def test_unguarded_sigbus_still_kills(tmp_path, case, setup, after):
    code = UNGUARDED.format(tmp=str(tmp_path), setup=setup, after=after)
    r = run_python(code, timeout=60)  # a handler loop would hang: the timeout fails the test
    assert r.returncode == -signal.SIGBUS, (case, r.returncode, r.stdout, r.stderr)
    assert r.stdout.split() == ["guarded", "4", "reading"], (case, r.stdout, r.stderr)
    if "faulthandler" in case:
        assert "Fatal Python error: Bus error" in r.stderr, (case, r.stderr)


def test_sigbus_sent_by_kill_still_kills(tmp_path):
    path = write_file(tmp_path / "k.bin", b"k" * PAGE)
    r = run_python(f"""
        import os, signal
        from soupkern import _native
        fd = os.open({path!r}, os.O_RDONLY)
        m = _native.Mapping(fd, {PAGE})
        os.close(fd)
        os.kill(os.getpid(), signal.SIGBUS)
        print("survived")
    """)
    assert r.returncode == -signal.SIGBUS and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)
