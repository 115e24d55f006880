"""The engine's work-item protocol: items cover every element once whatever the step or budget,
the executor maps, views and releases exactly an item's bytes, stops early on request, and a soup
is the same bytes whatever the budget."""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkern
from soupkern.engine import (MIN_BUDGET_BYTES, CopyReader, WorkItem, _write_step, plan_items, run, staging_bytes_for,
                             tensor_items)
from soupkern.io import OutputTensor, TensorInfo, dtype_itemsize
from soupkern.io.reader import SafetensorsFile
from soupkern.plan import ArrayHolder, SoupPlan, TensorPlan


def address(buf: object) -> int:
    """Where a host buffer (memoryview or array) starts in memory."""
    return int(np.frombuffer(buf, np.uint8).ctypes.data)  # type: ignore[call-overload]


NUMELS = (0, 1, 7, 1023, 1024, 1025, 4099, 65537)
AWKWARD_BUDGETS = (MIN_BUDGET_BYTES, MIN_BUDGET_BYTES + 12345, (3 << 20) + 7, 64 << 20)


class Recording(ArrayHolder):
    """An in-memory holder that logs the engine's calls on it."""

    __slots__ = ("calls",)

    def __init__(self, data: np.ndarray, path: str):
        super().__init__(data, path)
        self.calls: list[tuple[str, int, int]] = []

    def view(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        self.calls.append(("view", start, info.nbytes if stop is None else stop))
        return super().view(info, start, stop)

    def prefetch(self, begin: int, end: int) -> None:
        self.calls.append(("prefetch", begin, end))

    def release(self, begin: int, end: int) -> None:
        self.calls.append(("release", begin, end))


def tensor_plan(shape: tuple[int, ...], dtypes: tuple[str, ...] = ("F32", "BF16"), out: str = "F32",
                average: bool = True, name: str = "t") -> TensorPlan:
    numel = math.prod(shape)
    sources = []
    for i, dt in enumerate(dtypes):
        size = dtype_itemsize(dt)
        data = np.arange(numel * size, dtype=np.uint8) + i
        sources.append((Recording(data, f"in{i}"), TensorInfo(name, dt, shape, 0, numel * size)))
    return TensorPlan(OutputTensor(name, out, shape), tuple(sources), average)


def check_cover(items: list[WorkItem], numel: int, step: int) -> None:
    assert [it.start for it in items] == list(range(0, numel, step))
    assert all(1 <= it.count <= step for it in items) and all(it.count == step for it in items[:-1])
    assert sum(it.count for it in items) == numel


@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("step", [1, 3, 1000, 1024, 65536, 1 << 30])
def test_tensor_items_cover_every_element_once(numel: int, step: int) -> None:
    tp = tensor_plan((numel,))
    items = list(tensor_items(tp, step, coefficients=(0.5, 0.25), divisor=3.0))
    check_cover(items, numel, step)
    assert all(it.sources == tp.sources and it.coefficients == (0.5, 0.25) and it.divisor == 3.0 for it in items)


def test_a_copied_tensor_reads_its_first_source_only() -> None:
    tp = tensor_plan((10,), dtypes=("I64", "I64"), out="I64", average=False)
    assert [it.sources for it in tensor_items(tp, 4)] == [tp.sources[:1]] * 3


@pytest.mark.parametrize("budget", AWKWARD_BUDGETS)
def test_write_items_cover_every_element_once_within_the_budget(budget: int) -> None:
    staging = staging_bytes_for(budget)
    tensors = [tensor_plan(shape, dtypes, out, average, f"t{i}")
               for i, (shape, dtypes, out, average) in enumerate([
                   ((), ("F32",), "F32", True), ((0, 3), ("F16", "F16"), "BF16", True),
                   ((1,), ("BF16", "F64", "F16"), "F16", True), ((1_000_003,), ("F32", "F32"), "BF16", True),
                   ((333, 1025), ("F64", "BF16"), "F64", True), ((100_001,), ("I64", "I64"), "I64", False),
                   ((77_777,), ("BOOL",), "BOOL", False)])]
    plan = SoupPlan(tuple(tensors), (1.0, 2.0), {"t3": (0.25, 0.75)}, divisor=3.0)
    items = list(plan_items(plan, lambda tp: _write_step(tp, budget, staging), reversed(plan.tensors)))
    by_tensor: dict[str, list[WorkItem]] = {}
    for it in items:
        by_tensor.setdefault(it.tensor.out.name, []).append(it)
        assert it.count * dtype_itemsize(it.tensor.out.dtype) <= staging
        assert it.nbytes_read <= budget - staging
        assert (it.coefficients, it.divisor) == (((0.25, 0.75), 1.0) if it.tensor.out.name == "t3" else ((1.0, 2.0), 3.0))
    assert [n for n in dict.fromkeys(it.tensor.out.name for it in items)] == \
        [tp.out.name for tp in reversed(plan.tensors) if tp.numel]
    for tp in tensors:
        check_cover(by_tensor.get(tp.out.name, []), tp.numel, _write_step(tp, budget, staging))


def test_run_maps_views_and_releases_each_items_bytes() -> None:
    tp = tensor_plan((2500,))
    seen: list[list[np.ndarray]] = []
    done: list[WorkItem] = []

    def op(item: WorkItem, views: list[np.ndarray]) -> None:
        seen.append([np.frombuffer(v, np.uint8).copy() for v in views])

    assert run(tensor_items(tp, 1000), op, done.append) is True
    assert [it.start for it in done] == [0, 1000, 2000]
    for (f, info), i in zip(tp.sources, range(2)):
        size = dtype_itemsize(info.dtype)
        spans = [(s * size, (s + c) * size) for s, c in ((0, 1000), (1000, 1000), (2000, 500))]
        assert f.calls == [c for lo, hi in spans for c in (("prefetch", lo, hi), ("view", lo, hi), ("release", lo, hi))]
        whole = np.frombuffer(f.view(info), np.uint8)
        assert np.array_equal(np.concatenate([views[i] for views in seen]), whole)


def test_run_stops_at_the_first_op_returning_false() -> None:
    tp = tensor_plan((10,))
    calls = []

    def op(item: WorkItem, views: list[np.ndarray]) -> bool:
        calls.append(item.start)
        return item.start < 3

    assert run(tensor_items(tp, 3), op) is False
    assert calls == [0, 3]
    f = tp.sources[0][0]
    assert f.calls[-1] == ("release", 12, 24)  # the stopping item's pages are released too


def test_identical_compares_bytes_with_an_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    from soupkern import plan as plan_mod

    monkeypatch.setattr(plan_mod, "_COMPARE_BLOCK", 64)  # 16 elements
    info = TensorInfo("t", "I32", (100,), 0, 400)
    data = np.arange(100, dtype=np.int32)
    changed = data.copy()
    changed[20] = -1
    first, same, other = (Recording(x, p) for x, p in ((data, "first"), (data, "same"), (changed, "other")))
    assert plan_mod._identical((first, info), (same, info))
    assert not plan_mod._identical((first, info), (other, info))
    assert [c for c in other.calls if c[0] == "view"] == [("view", 0, 64), ("view", 64, 128)]  # not past the block


def save_ingredients(folder: Path) -> list[Path]:
    """Three ingredients of mixed dtypes, tensors several work items long at the smallest budget,
    one element, empty, 0-dim and copied integer tensors."""
    g = torch.Generator().manual_seed(7)
    shapes = {"big": (300_007,), "mat": (513, 1023), "one": (1,), "empty": (0, 5), "scalar": ()}
    paths = []
    for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        tensors = {n: torch.randn(s, generator=g).to(dt) for n, s in shapes.items()}
        tensors["ids"] = torch.arange(70_001)
        paths.append(folder / f"m{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_a_soup_is_the_same_bytes_whatever_the_budget(tmp_path: Path, backend: str) -> None:
    paths = save_ingredients(tmp_path)
    outs = []
    for budget in (MIN_BUDGET_BYTES, MIN_BUDGET_BYTES + 12345, 1 << 30):
        outs.append(tmp_path / f"soup_{budget}.safetensors")
        soupkern.weighted_soup(paths, [0.2, 0.3, 0.5], outs[-1], dtype="bf16", budget_bytes=budget, backend=backend)
    first = outs[0].read_bytes()
    assert all(o.read_bytes() == first for o in outs[1:])


# ---------------------------------------------------------------------------------------------
# copied reads (pread) instead of mapped views

@pytest.mark.parametrize("budget", [MIN_BUDGET_BYTES, MIN_BUDGET_BYTES + 12345, 1 << 30])
def test_copied_reads_are_the_same_soup_as_mapped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       budget: int) -> None:
    """safetensors, a .pt (served from its mapping, so copied too) and an in-memory state dict
    (viewed, never copied) in one soup: the same bytes whichever way the files are read."""
    paths: list[object] = list(save_ingredients(tmp_path))
    pt = tmp_path / "m1.pt"
    torch.save(load_file(str(paths[1])), pt)
    state = load_file(str(paths[2]))
    ingredients = [paths[0], pt, state]
    outs = {}
    for mode in ("map", "copy", "auto"):
        monkeypatch.setenv("SOUPKERN_READS", mode)
        outs[mode] = tmp_path / f"soup_{mode}.safetensors"
        soupkern.weighted_soup(ingredients, [0.2, 0.3, 0.5], outs[mode], dtype="bf16", budget_bytes=budget)
    assert outs["copy"].read_bytes() == outs["map"].read_bytes() == outs["auto"].read_bytes()


def test_a_copied_soup_reads_every_file_byte_through_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soupkern import engine

    paths = save_ingredients(tmp_path)
    readers: list[CopyReader] = []
    real = engine.CopyReader.__init__
    opened: list[str] = []
    real_open = SafetensorsFile.open_for_reads
    monkeypatch.setattr(engine.CopyReader, "__init__", lambda self, *a, **k: readers.append(self) or real(self, *a, **k))
    monkeypatch.setattr(SafetensorsFile, "open_for_reads", lambda self: opened.append(self.path) or real_open(self))
    monkeypatch.setenv("SOUPKERN_READS", "copy")
    report = soupkern.weighted_soup(paths, [0.2, 0.3, 0.5], tmp_path / "o.safetensors", budget_bytes=MIN_BUDGET_BYTES)
    assert len(readers) == 1 and readers[0].copied == report.bytes_read  # no byte came from a mapped view
    assert sorted(opened) == sorted(map(str, paths))  # one descriptor per file, kept for the run


def one_tensor_file(folder: Path, numel: int) -> tuple[SafetensorsFile, TensorInfo, np.ndarray]:
    """A safetensors file holding x = arange(numel) in fp32, opened."""
    path = folder / "f.safetensors"
    data = np.arange(numel, dtype=np.float32)
    save_file({"x": torch.from_numpy(data)}, str(path))
    f = SafetensorsFile(path)
    return f, f.tensors["x"], data


def test_copy_reader_copies_files_and_leaves_other_sources_to_views(tmp_path: Path) -> None:
    f, info, data = one_tensor_file(tmp_path, 5000)
    mem = Recording(data, "mem")
    ranges = [(mem, info, 40, 400), (f, info, 4, 4000), (f, info, 0, 20000)]
    with CopyReader(2) as reader:
        got = reader.read(ranges)
        assert sorted(got) == [1, 2]
        assert bytes(got[1]) == data.tobytes()[4:4000] and bytes(got[2]) == data.tobytes()
        assert all(address(a) % CopyReader.ALIGN == 0 for a in got.values())
        other = reader.start(ranges[1:2])  # the next item's read goes to the other arena ...
        assert address(got[1]) != address(other()[0]) and bytes(got[1]) == data.tobytes()[4:4000]
        again = reader.read(ranges[1:2])  # ... and the one after reuses the first
        assert address(again[0]) == address(got[1])
        assert reader.copied == 3996 * 3 + 20000
    assert mem.calls == []  # not read by the reader: the executor views it
    f.close()


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_resident_bytes_and_the_automatic_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soupkern.io import reader as reader_mod

    path = tmp_path / "f.safetensors"
    save_file({"x": torch.zeros(3 << 20)}, str(path))  # 12 MiB: 3 sampled windows
    path.read_bytes()
    f = SafetensorsFile(path)
    if f.resident_bytes() is None:
        pytest.skip("no mincore through the native mapping on this platform")
    assert f.resident_bytes() == f.size
    _evict(path)
    if f.resident_bytes() > f.size // 2:
        pytest.skip("the file system keeps pages that POSIX_FADV_DONTNEED asks to drop")
    assert f.resident_bytes() == 0
    f.read_into(4 << 20, np.empty(256 << 10, np.uint8))  # one sampled window of 256 KiB back
    sampled = sum(-(-min(256 << 10, f.size - off) // mmap.PAGESIZE) for off in range(0, f.size, 4 << 20))
    assert f.resident_bytes() == round(f.size * ((256 << 10) // mmap.PAGESIZE) / sampled)
    _evict(path)
    watermark = reader_mod.reclaim_watermark_bytes()
    monkeypatch.setattr(reader_mod, "memory_cgroup_limit", lambda: None)
    monkeypatch.setattr(reader_mod, "free_memory_bytes", lambda: watermark + f.size - 1)
    assert reader_mod.reads_may_evict({f: f.size})  # every page to read evicts another
    assert not reader_mod.reads_may_evict({f: f.size // 2})  # the plan reads half of it: that fits
    monkeypatch.setattr(reader_mod, "memory_cgroup_limit", lambda: 768 << 20)
    assert not reader_mod.reads_may_evict({f: f.size})  # under a cgroup limit mapped reads are faster
    monkeypatch.setattr(reader_mod, "memory_cgroup_limit", lambda: None)
    monkeypatch.setattr(reader_mod, "free_memory_bytes", lambda: watermark + f.size)
    assert not reader_mod.reads_may_evict({f: f.size})  # they fit in free memory
    monkeypatch.setattr(reader_mod, "free_memory_bytes", lambda: 0)
    f.read_into(0, np.empty(f.size, np.uint8))
    assert f.resident_bytes() == f.size and not reader_mod.reads_may_evict({f: f.size})  # page-cached: mapped
    monkeypatch.setattr(reader_mod, "free_memory_bytes", lambda: None)
    assert not reader_mod.reads_may_evict({f: f.size})  # unknown free memory: mapped, as before
    f.close()


@pytest.mark.parametrize("version", [1, 2])
def test_memory_cgroup_limit_reads_v1_and_v2(tmp_path: Path, version: int) -> None:
    from soupkern.io.reader import memory_cgroup_limit

    membership = tmp_path / "cgroup"
    if version == 1:
        membership.write_text("4:memory:/jobs/a\n3:cpuset:/\n0::/\n")
        folder, name = tmp_path / "memory", "memory.limit_in_bytes"
        unlimited = "9223372036854771712"
    else:
        membership.write_text("0::/jobs/a\n")
        folder, name = tmp_path, "memory.max"
        unlimited = "max"
    (folder / "jobs" / "a").mkdir(parents=True)
    (folder / name).write_text(unlimited + "\n")
    (folder / "jobs" / "a" / name).write_text(unlimited + "\n")
    assert memory_cgroup_limit(str(membership), str(tmp_path)) is None
    (folder / "jobs" / name).write_text(f"{768 << 20}\n")  # a parent's limit binds its children
    assert memory_cgroup_limit(str(membership), str(tmp_path)) == 768 << 20
    (folder / "jobs" / "a" / name).write_text(f"{512 << 20}\n")
    assert memory_cgroup_limit(str(membership), str(tmp_path)) == 512 << 20
    assert memory_cgroup_limit(str(tmp_path / "absent"), str(tmp_path)) is None
    (folder / "jobs" / "a" / name).write_text("\u00b2\n")  # str.isdigit() says yes, int() says no
    assert memory_cgroup_limit(str(membership), str(tmp_path)) == 768 << 20
    membership.write_bytes(membership.read_bytes().replace(b"/jobs/a", b"/jobs/\xff\xfe"))  # not UTF-8
    assert memory_cgroup_limit(str(membership), str(tmp_path)) == 768 << 20  # its parent's limit still binds


def test_auto_copies_exactly_when_reads_may_evict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soupkern import engine

    paths = save_ingredients(tmp_path)
    made = []
    monkeypatch.setattr(engine.CopyReader, "start", lambda self, ranges, real=engine.CopyReader.start:
                        made.append(1) or real(self, ranges))
    for evict in (False, True):
        made.clear()
        monkeypatch.setattr(engine, "reads_may_evict", lambda files: evict)
        soupkern.uniform_soup(paths, tmp_path / f"o{evict}.safetensors")
        assert bool(made) == evict
    monkeypatch.setenv("SOUPKERN_READS", "copy")
    made.clear()
    soupkern.uniform_soup(paths, tmp_path / "copied.safetensors")
    assert made
    monkeypatch.setenv("SOUPKERN_READS", "map")
    made.clear()
    soupkern.uniform_soup(paths, tmp_path / "forced.safetensors")
    assert not made
    first = (tmp_path / "oFalse.safetensors").read_bytes()
    assert all((tmp_path / n).read_bytes() == first for n in ("oTrue.safetensors", "copied.safetensors",
                                                               "forced.safetensors"))


def test_run_with_a_reader_reads_one_item_ahead_and_stops_early(tmp_path: Path) -> None:
    f, info, data = one_tensor_file(tmp_path, 10_000)
    tp = TensorPlan(OutputTensor("x", "F32", (10_000,)), ((f, info),), True)
    seen, starts = [], []
    with CopyReader(2) as reader:
        real = reader.start
        reader.start = lambda ranges: starts.append(ranges[0][2]) or real(ranges)  # type: ignore[method-assign]

        def op(item: WorkItem, views: list[np.ndarray]) -> bool:
            assert starts[-1] == min(item.start + 3000, 9000) * 4  # the next item is already being read
            assert not views[0].readonly  # the reader's buffer, not the (read-only) mapping
            seen.append(np.frombuffer(views[0], np.float32).copy())
            return item.start < 6000
        assert run(tensor_items(tp, 3000), op, reader=reader) is False
    assert starts == [0, 12000, 24000, 36000]  # stopped at item 3 (start 6000) after reading item 4 ahead
    assert np.array_equal(np.concatenate(seen), data[:9000])
    f.close()


def test_a_bad_reads_setting_is_refused_before_any_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = save_ingredients(tmp_path)
    monkeypatch.setenv("SOUPKERN_READS", "mmap")
    out = tmp_path / "o.safetensors"
    with pytest.raises(soupkern.InputError, match="SOUPKERN_READS must be one of auto, map, copy, got 'mmap'"):
        soupkern.uniform_soup(paths, out)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if ".soupkern-" in n]
    from soupkern.recipes.weighted import check_soup_output

    with pytest.raises(soupkern.InputError, match="SOUPKERN_READS must be one of"):
        check_soup_output(paths, out)  # what greedy, learned and interpolate check before their long work


@pytest.mark.parametrize("change", ["truncated", "rewritten", "replaced"])
def test_a_copied_read_of_a_changed_file_names_it(tmp_path: Path, change: str) -> None:
    path = tmp_path / "f.safetensors"
    save_file({"x": torch.arange(100_000, dtype=torch.float32)}, str(path))
    f = SafetensorsFile(path)
    info = f.tensors["x"]
    if change == "truncated":
        os.truncate(path, 4096)
    elif change == "rewritten":
        os.utime(path, ns=(0, 12345))
    else:
        other = tmp_path / "other"
        save_file({"x": torch.arange(100_000, dtype=torch.float32)}, str(other))
        os.replace(other, path)
    what = "truncated" if change == "truncated" else "modified"
    with pytest.raises(soupkern.InputError, match=f"^{path}: was {what} by another process while being read"):
        f.read_into(info.begin, np.empty(1000, np.uint8))
    f.close()


def test_a_reader_reused_after_an_early_stop_gets_no_stale_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read ahead of a run that stopped early must not land in a buffer the next run uses."""
    import time

    zeros, ones = tmp_path / "z.safetensors", tmp_path / "o.safetensors"
    save_file({"x": torch.zeros(4096)}, str(zeros))
    save_file({"x": torch.ones(4096)}, str(ones))
    z, o = SafetensorsFile(zeros), SafetensorsFile(ones)
    real = SafetensorsFile.read_into

    def slow(self, begin, out, fd=None):  # type: ignore[no-untyped-def]
        if self is z:
            time.sleep(0.3)
        return real(self, begin, out, fd)

    monkeypatch.setattr(SafetensorsFile, "read_into", slow)

    def plan_of(f: SafetensorsFile) -> TensorPlan:
        return TensorPlan(OutputTensor("x", "F32", (4096,)), ((f, f.tensors["x"]),), True)

    with CopyReader(2) as reader:
        assert run(tensor_items(plan_of(z), 1024), lambda item, views: False, reader=reader) is False
        seen = []
        run(tensor_items(plan_of(o), 1024), lambda item, views: seen.append(np.frombuffer(views[0], np.float32).copy()), reader=reader)
    assert np.array_equal(np.concatenate(seen), np.ones(4096, np.float32))
    z.close()
    o.close()


def test_a_file_truncated_during_copied_reads_names_it_and_writes_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    paths = save_ingredients(tmp_path)
    real = SafetensorsFile.read_into
    calls = []

    def truncating(self, begin, out, fd=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 4:
            os.truncate(paths[1], 4096)
        return real(self, begin, out, fd)

    monkeypatch.setattr(SafetensorsFile, "read_into", truncating)
    monkeypatch.setenv("SOUPKERN_READS", "copy")
    out = tmp_path / "o.safetensors"
    with pytest.raises(soupkern.InputError, match=f"^{paths[1]}: was truncated by another process while being read"):
        soupkern.uniform_soup(paths, out, budget_bytes=MIN_BUDGET_BYTES)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".soupkern-" in n]


def test_a_reader_keeps_at_most_max_open_descriptors(tmp_path: Path) -> None:
    files, data = [], []
    for i in range(3):
        path = tmp_path / f"f{i}.safetensors"
        data.append(np.full(1000, i, np.float32))
        save_file({"x": torch.from_numpy(data[-1])}, str(path))
        files.append(SafetensorsFile(path))
    ranges = [(f, f.tensors["x"], 0, 4000) for f in files]
    with CopyReader(2, max_open=1) as reader:
        for chosen in (ranges, ranges[1:], ranges[::-1]):
            got = reader.read(chosen)
            assert [bytes(got[i]) for i in range(len(chosen))] == [data[files.index(r[0])].tobytes() for r in chosen]
            assert len(reader._fds) == 1
    assert not reader._fds
    for f in files:
        f.close()
