"""The streaming writer through the public soup API: output format, provenance, sharding, safety
(never clobber an input, nothing left on failure or interrupt), inputs never modified."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))

import soupkern  # noqa: E402
from soupkern.io import open_checkpoint  # noqa: E402
from helpers_io import fingerprint, listing, random_tensor, raw_bytes, save, sha256, write_raw, write_sharded  # noqa: E402

weighted_mod = importlib.import_module("soupkern.recipes.weighted")
writer_mod = importlib.import_module("soupkern.io.writer")

MismatchError, OutputError, InputError = soupkern.MismatchError, soupkern.OutputError, soupkern.InputError

SPEC = {
    "emb.weight": ((64, 33), "F32"),
    "layer.0.w": ((17, 9), "BF16"),
    "layer.0.b": ((9,), "F16"),
    "layer.1.w": ((5, 4, 3), "F64"),
    "scalar": ((), "F32"),
    "empty": ((3, 0), "F32"),
    "pos_ids": ((1, 50), "I64"),  # non-float: identical in every ingredient, copied
    "mask": ((7,), "BOOL"),
}


def make_ingredients(folder: Path, k: int = 3, spec=SPEC, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    shared = torch.Generator().manual_seed(999)
    fixed = {n: random_tensor(s, d, shared) for n, (s, d) in spec.items() if d not in ("F64", "F32", "F16", "BF16")}
    paths = []
    for i in range(k):
        gen = torch.Generator().manual_seed(seed * 100 + i)
        tensors = {n: fixed[n] if n in fixed else random_tensor(s, d, gen) for n, (s, d) in spec.items()}
        paths.append(save(folder / f"ingredient{i}.safetensors", tensors, metadata={"i": str(i)}))
    return paths


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert raw_bytes(a[name]) == raw_bytes(b[name]), name


def no_temporaries(folder: Path) -> None:
    assert not [n for n in listing(folder) if ".soupkern-" in n], listing(folder)


def record_temp_files(monkeypatch) -> list:
    """Record every temporary file or folder the writer creates (none may be created on a refused soup)."""
    made: list = []
    real = writer_mod.atomic.artifact_path

    def artifact_path(target, kind):
        made.append((target, kind))
        return real(target, kind)

    monkeypatch.setattr(writer_mod.atomic, "artifact_path", artifact_path)
    return made


def load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """What transformers does: read the index, load every shard with safetensors, merge."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wm.values())):
        part = load_file(os.fspath(folder / shard))
        assert {n for n, s in wm.items() if s == shard} == set(part), shard
        assert not set(part) & set(merged)
        merged.update(part)
    assert set(merged) == set(wm)
    return merged


# ---------------------------------------------------------------------------------------------
# 5. output format and provenance

@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_uniform_soup_matches_state_dict(tmp_path, backend):
    if not soupkern.available_backends()[backend].available:
        pytest.skip(soupkern.available_backends()[backend].reason)
    paths = make_ingredients(tmp_path / "in")
    out = tmp_path / "soup.safetensors"
    report = soupkern.uniform_soup(paths, out, backend=backend)
    assert report.paths == (out,)
    assert report.tensors == len(SPEC)
    got = load_file(os.fspath(out))
    assert_same(got, soupkern.uniform_state_dict(paths, backend=backend))
    # the averaged tensors are the mean, and the copied ones the ingredient's
    ins = [load_file(os.fspath(p)) for p in paths]
    for name, ((shape, dtype)) in SPEC.items():
        assert tuple(got[name].shape) == shape
        if dtype in ("I64", "BOOL"):
            assert torch.equal(got[name], ins[0][name])
        else:
            want = sum(x[name].double() for x in ins) / 3
            tol = {"F64": 1e-12, "F32": 1e-6, "F16": 1e-3, "BF16": 1e-2}[dtype]
            torch.testing.assert_close(got[name].double(), want, rtol=tol, atol=tol)
    meta = safe_open(os.fspath(out), "pt").metadata()
    assert meta["format"] == "pt"
    assert meta["soupkern.recipe"] == "uniform"
    assert json.loads(meta["soupkern.ingredients"]) == [os.fspath(p) for p in paths]
    assert json.loads(meta["soupkern.coefficients"]) == [1.0] * 3 and meta["soupkern.divisor"] == "3.0"
    assert meta["soupkern.version"] == soupkern.__version__
    assert meta["soupkern.backend"] == backend
    assert meta["soupkern.keys"] == "same"
    # and the reader reads the writer's output back
    with open_checkpoint(out) as ck:
        assert ck.metadata == meta


def test_weighted_soup_matches_state_dict_and_dtype_option(tmp_path):
    paths = make_ingredients(tmp_path / "in")
    coeffs = [0.5, -0.25, 1.5]
    out = tmp_path / "w.safetensors"
    soupkern.weighted_soup(paths, coeffs, out)
    assert_same(load_file(os.fspath(out)), soupkern.weighted_state_dict(paths, coeffs))
    meta = safe_open(os.fspath(out), "pt").metadata()
    assert meta["format"] == "pt"
    assert meta["soupkern.recipe"] == "weighted"
    assert json.loads(meta["soupkern.coefficients"]) == coeffs
    assert json.loads(meta["soupkern.ingredients"]) == [os.fspath(p) for p in paths]
    assert meta["soupkern.version"] == soupkern.__version__

    out16 = tmp_path / "w16.safetensors"
    soupkern.weighted_soup(paths, coeffs, out16, dtype="bf16")
    got = load_file(os.fspath(out16))
    assert_same(got, soupkern.weighted_state_dict(paths, coeffs, dtype="bf16"))
    for name, (_, dtype) in SPEC.items():
        assert got[name].dtype == (torch.bfloat16 if dtype in ("F64", "F32", "F16", "BF16") else load_file(os.fspath(out))[name].dtype)


def test_output_header_is_aligned_and_library_compatible(tmp_path):
    paths = make_ingredients(tmp_path / "in", k=2)
    out = tmp_path / "soup.safetensors"
    soupkern.uniform_soup(paths, out)
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    for name, e in header.items():
        if name != "__metadata__":
            itemsize = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "BOOL": 1}[e["dtype"]]
            assert (8 + n + e["data_offsets"][0]) % itemsize == 0, name
    with safe_open(os.fspath(out), "pt") as lib:  # every tensor readable by the library
        assert set(lib.keys()) == set(SPEC)


def test_chunking_does_not_change_the_result(tmp_path):
    gen = torch.Generator().manual_seed(5)
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [save(folder / f"{i}.safetensors", {"big": random_tensor((1 << 20,), "F32", gen),
                                                 "h": random_tensor((3000, 7), "BF16", gen)}) for i in range(3)]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    soupkern.weighted_soup(paths, [0.2, 0.3, 0.5], a, budget_bytes=1 << 20)
    soupkern.weighted_soup(paths, [0.2, 0.3, 0.5], b)
    assert sha256(a) == sha256(b)


# ---------------------------------------------------------------------------------------------
# 6. sharded output

SHARD_SPEC = {f"block.{i}.w": ((32, 32), "F32") for i in range(6)} | {
    "block.0.b": ((32,), "BF16"), "norm": ((32,), "F32"), "ids": ((16,), "I64"), "scalar": ((), "F16"),
}


def test_sharded_output(tmp_path):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    single = tmp_path / "single.safetensors"
    soupkern.uniform_soup(paths, single)
    out = tmp_path / "sharded"
    out.mkdir()
    report = soupkern.uniform_soup(paths, out, max_shard_size=9000)
    files = listing(out)
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert files == sorted(shards + ["model.safetensors.index.json"])
    assert set(report.paths) == {out / f for f in files}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHARD_SPEC)
    assert set(index["weight_map"].values()) == set(shards)
    ref = load_file(os.fspath(single))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    for shard in shards:
        size = sum(t.numel() * t.element_size() for t in load_file(os.fspath(out / shard)).values())
        assert size <= 9000 or len(load_file(os.fspath(out / shard))) == 1
        meta = safe_open(os.fspath(out / shard), "pt").metadata()
        assert meta["format"] == "pt" and meta["soupkern.recipe"] == "uniform"
    assert_same(load_sharded(out), ref)
    # soupkern reads its own sharded output (folder and index)
    with open_checkpoint(out) as ck:
        assert set(ck.tensors) == set(SHARD_SPEC)
        for name, (f, info) in ck.tensors.items():
            assert f.view(info).tobytes() == raw_bytes(ref[name])


def test_sharded_output_that_fits_in_one_shard(tmp_path):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "one"
    out.mkdir()
    report = soupkern.uniform_soup(paths, out, max_shard_size=10 << 20)
    assert listing(out) == ["model.safetensors"]
    assert report.paths == (out / "model.safetensors",)
    assert_same(load_file(os.fspath(out / "model.safetensors")), soupkern.uniform_state_dict(paths))


def test_sharded_input_to_sharded_output(tmp_path):
    gen = torch.Generator().manual_seed(8)
    ins = []
    for i in range(2):
        s1 = {"a": random_tensor((40, 40), "F32", gen), "b": random_tensor((10,), "F32", gen)}
        s2 = {"c": random_tensor((30, 30), "BF16", gen)}
        write_sharded(tmp_path / f"ck{i}", {"model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2})
        ins.append(tmp_path / f"ck{i}")
    out = tmp_path / "out"
    out.mkdir()
    soupkern.uniform_soup(ins, out, max_shard_size=4000)
    assert_same(load_sharded(out), soupkern.uniform_state_dict(ins))


def test_resharding_with_overwrite_reads_back_the_new_soup(tmp_path):
    """A soup written into a folder with overwrite=True is what soupkern (and transformers)
    read back from that folder: no index of an earlier sharded soup may shadow it."""
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "out"
    out.mkdir()
    soupkern.uniform_soup(paths, out, max_shard_size=9000)
    assert (out / "model.safetensors.index.json").exists()
    coeffs = [1.0, 0.0, 0.0]
    soupkern.weighted_soup(paths, coeffs, out, max_shard_size=10 << 20, overwrite=True)
    assert (out / "model.safetensors").exists()
    want = soupkern.weighted_state_dict(paths, coeffs)
    with open_checkpoint(out) as ck:
        assert ck.path == os.fspath(out / "model.safetensors"), f"an earlier soup's index shadows the new soup: {listing(out)}"
        got = {n: f.view(i).tobytes() for n, (f, i) in ck.tensors.items()}
    assert got == {n: raw_bytes(t) for n, t in want.items()}


# ---------------------------------------------------------------------------------------------
# 7. safety: never an input, never clobber, refuse mismatches before writing, disk space

def _same_input_spellings(tmp_path: Path, p: Path) -> list[Path]:
    (p.parent / "x").mkdir(exist_ok=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(p)
    hard = tmp_path / "hard.safetensors"
    os.link(p, hard)
    return [p, p.parent / "." / p.name, p.parent / "x" / ".." / p.name, link, hard]


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_is_an_input(tmp_path, monkeypatch, overwrite):
    paths = make_ingredients(tmp_path / "in", k=2)
    made = record_temp_files(monkeypatch)
    before = [fingerprint(p) for p in paths]
    for spelling in _same_input_spellings(tmp_path, paths[1]):
        with pytest.raises(OutputError) as ei:
            soupkern.uniform_soup(paths, spelling, overwrite=overwrite)
        assert "is one of the inputs" in str(ei.value), str(ei.value)
        assert [fingerprint(p) for p in paths] == before
        no_temporaries(tmp_path / "in")
        no_temporaries(tmp_path)
    assert (tmp_path / "link.safetensors").is_symlink()
    assert made == []


def test_output_is_an_input_relative_path(tmp_path, monkeypatch):
    paths = make_ingredients(tmp_path / "in", k=2)
    before = sha256(paths[0])
    monkeypatch.chdir(tmp_path / "in")
    with pytest.raises(OutputError):
        soupkern.uniform_soup([paths[0], "ingredient1.safetensors"], "ingredient0.safetensors", overwrite=True)
    assert sha256(paths[0]) == before
    no_temporaries(tmp_path / "in")


def test_sharded_output_onto_input_folder(tmp_path):
    # a folder holding model.safetensors, souped into itself with everything in one shard
    folder = tmp_path / "ck"
    folder.mkdir()
    p = save(folder / "model.safetensors", {"a": torch.ones(8), "b": torch.zeros(4)})
    q = save(tmp_path / "other.safetensors", {"a": torch.zeros(8), "b": torch.ones(4)})
    before = sha256(p)
    with pytest.raises(OutputError):
        soupkern.uniform_soup([folder, q], folder, max_shard_size=1 << 20, overwrite=True)
    assert sha256(p) == before
    assert listing(folder) == ["model.safetensors"]
    # a sharded checkpoint souped into its own folder with the same shard names
    gen = torch.Generator().manual_seed(2)
    shards = {"model-00001-of-00002.safetensors": {"a": random_tensor((64,), "F32", gen)},
              "model-00002-of-00002.safetensors": {"b": random_tensor((64,), "F32", gen)}}
    index = write_sharded(tmp_path / "sh", shards)
    files = {f: fingerprint(tmp_path / "sh" / f) for f in listing(tmp_path / "sh")}
    with pytest.raises(OutputError):
        soupkern.uniform_soup([tmp_path / "sh", tmp_path / "sh"], tmp_path / "sh", max_shard_size=300, overwrite=True)
    assert {f: fingerprint(tmp_path / "sh" / f) for f in listing(tmp_path / "sh")} == files
    assert index.exists()


def test_existing_output_needs_overwrite(tmp_path):
    paths = make_ingredients(tmp_path / "in", k=2)
    out = tmp_path / "out" / "soup.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    with pytest.raises(OutputError) as ei:
        soupkern.uniform_soup(paths, out)
    assert "already exists" in str(ei.value)
    assert out.read_bytes() == b"precious"
    assert listing(out.parent) == ["soup.safetensors"]
    soupkern.uniform_soup(paths, out, overwrite=True)
    assert_same(load_file(os.fspath(out)), soupkern.uniform_state_dict(paths))
    assert listing(out.parent) == ["soup.safetensors"]


def test_existing_sharded_output_needs_overwrite(tmp_path):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "out"
    out.mkdir()
    soupkern.uniform_soup(paths, out, max_shard_size=9000)
    before = {f: fingerprint(out / f) for f in listing(out)}
    with pytest.raises(OutputError) as ei:
        soupkern.weighted_soup(paths, [1, 0, 0], out, max_shard_size=9000)
    assert "already exists" in str(ei.value)
    assert {f: fingerprint(out / f) for f in listing(out)} == before
    soupkern.weighted_soup(paths, [1, 0, 0], out, max_shard_size=9000, overwrite=True)
    assert set(listing(out)) == set(before)
    assert_same(load_sharded(out), soupkern.weighted_state_dict(paths, [1, 0, 0]))


def _mismatch_case(tmp_path: Path, case: str) -> tuple[list[Path], str, str]:
    """Ingredients that cannot be souped; returns (paths, offending path, offending tensor)."""
    gen = torch.Generator().manual_seed(11)
    folder = tmp_path / "in"
    folder.mkdir()
    base = {"w": random_tensor((3, 4), "F32", gen), "ids": random_tensor((6,), "I64", gen), "b": random_tensor((4,), "F16", gen)}
    other = {k: v.clone() for k, v in base.items()}
    if case == "names":
        other["c"] = other.pop("b")
        tensor = "b"
    elif case == "shape":
        other["w"] = random_tensor((4, 3), "F32", gen)
        tensor = "w"
    elif case == "int-values":
        other["ids"] = other["ids"] + 1
        tensor = "ids"
    elif case == "float-vs-int":
        other["w"] = random_tensor((3, 4), "I32", gen)
        tensor = "w"
    elif case == "int-dtypes":
        other["ids"] = other["ids"].to(torch.int32)
        tensor = "ids"
    else:
        raise AssertionError(case)
    a = save(folder / "a.safetensors", base)
    b = save(folder / "b.safetensors", {k: (v + 1 if v.is_floating_point() and k != tensor else v) for k, v in base.items()})
    c = save(folder / "c.safetensors", other)
    return [a, b, c], os.fspath(c), tensor


@pytest.mark.parametrize("case", ["names", "shape", "int-values", "float-vs-int", "int-dtypes"])
@pytest.mark.parametrize("sharded", [False, True])
def test_mismatch_refused_before_any_output(tmp_path, monkeypatch, case, sharded):
    paths, bad, tensor = _mismatch_case(tmp_path, case)
    made = record_temp_files(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    target, kw = (out, {"max_shard_size": 64}) if sharded else (out / "soup.safetensors", {})
    before = [fingerprint(p) for p in paths]
    with pytest.raises(MismatchError) as ei:
        soupkern.uniform_soup(paths, target, **kw)
    assert listing(out) == []
    assert made == []
    assert ei.value.path == bad and bad in str(ei.value)
    assert ei.value.tensor == tensor and f"'{tensor}'" in str(ei.value)
    assert [fingerprint(p) for p in paths] == before
    no_temporaries(tmp_path / "in")
    with pytest.raises(MismatchError):
        soupkern.uniform_state_dict(paths)


def test_bad_header_refused_before_any_output(tmp_path, monkeypatch):
    made = record_temp_files(monkeypatch)
    paths = make_ingredients(tmp_path / "in", k=2)
    bad = write_raw(tmp_path / "in" / "bad.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(soupkern.HeaderError) as ei:
        soupkern.uniform_soup(paths + [bad], out / "soup.safetensors")
    assert ei.value.path == os.fspath(bad)
    assert listing(out) == []
    assert made == []


def test_keys_intersection(tmp_path):
    gen = torch.Generator().manual_seed(4)
    folder = tmp_path / "in"
    folder.mkdir()
    a = save(folder / "a.safetensors", {"x": random_tensor((5,), "F32", gen), "y": random_tensor((2, 2), "BF16", gen),
                                        "only_a": random_tensor((3,), "F32", gen)})
    b = save(folder / "b.safetensors", {"x": random_tensor((5,), "F32", gen), "y": random_tensor((2, 2), "BF16", gen),
                                        "only_b": random_tensor((3,), "F32", gen)})
    out = tmp_path / "soup.safetensors"
    with pytest.raises(MismatchError) as ei:
        soupkern.uniform_soup([a, b], out)
    assert "intersection" in str(ei.value)
    assert not out.exists()
    soupkern.uniform_soup([a, b], out, keys="intersection")
    got = load_file(os.fspath(out))
    assert set(got) == {"x", "y"}
    assert_same(got, soupkern.uniform_state_dict([a, b], keys="intersection"))
    la, lb = load_file(os.fspath(a)), load_file(os.fspath(b))
    torch.testing.assert_close(got["x"], (la["x"] + lb["x"]) / 2)
    assert safe_open(os.fspath(out), "pt").metadata()["soupkern.keys"] == "intersection"
    # nothing shared at all
    c = save(folder / "c.safetensors", {"z": torch.ones(1)})
    with pytest.raises(MismatchError):
        soupkern.uniform_soup([a, c], tmp_path / "none.safetensors", keys="intersection")
    assert not (tmp_path / "none.safetensors").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_disk_space_check(tmp_path, monkeypatch, sharded):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "out"
    out.mkdir()
    calls = []

    def tiny_disk(path):
        calls.append(os.fspath(path))
        return shutil._ntuple_diskusage(1 << 40, (1 << 40) - 100, 100)

    monkeypatch.setattr(writer_mod.shutil, "disk_usage", tiny_disk)
    made = record_temp_files(monkeypatch)
    target, kw = (out, {"max_shard_size": 9000}) if sharded else (out / "soup.safetensors", {})
    with pytest.raises(OutputError) as ei:
        soupkern.uniform_soup(paths, target, **kw)
    assert "free" in str(ei.value)
    assert calls
    assert listing(out) == []
    assert made == []


# ---------------------------------------------------------------------------------------------
# 8. interrupted writes leave nothing

class FailingBackend:
    """Wraps the real backend; raises `exc` on the `at`-th weighted_sum call."""

    def __init__(self, at: int, exc: BaseException, folder: Path):
        self.real = soupkern.get_backend()
        self.name = self.real.name
        self.at, self.exc, self.folder = at, exc, folder
        self.calls = 0
        self.seen: list[str] = []

    def weighted_sum(self, *args):
        self.calls += 1
        if self.calls == self.at:
            self.seen = listing(self.folder)
            raise self.exc
        return self.real.weighted_sum(*args)


def _big_ingredients(tmp_path: Path, names: list[str]) -> list[Path]:
    gen = torch.Generator().manual_seed(6)
    folder = tmp_path / "in"
    folder.mkdir()
    return [save(folder / f"{i}.safetensors", {n: random_tensor((1 << 20,), "F32", gen) for n in names}) for i in range(2)]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom"), MemoryError()], ids=lambda e: type(e).__name__)
def test_interrupted_single_file_leaves_nothing(tmp_path, monkeypatch, exc):
    paths = _big_ingredients(tmp_path, ["big", "small"])
    before = [fingerprint(p) for p in paths]
    out = tmp_path / "out"
    out.mkdir()
    fb = FailingBackend(3, exc, out)
    monkeypatch.setattr(weighted_mod, "get_backend", lambda name=None: fb)
    with pytest.raises(type(exc)):
        soupkern.uniform_soup(paths, out / "soup.safetensors", budget_bytes=1 << 20)
    assert fb.calls == 3
    assert any(".soupkern-tmp-" in n for n in fb.seen), fb.seen  # it was mid-write
    assert not (out / "soup.safetensors").exists()
    assert listing(out) == []
    assert [fingerprint(p) for p in paths] == before


def test_interrupted_overwrite_keeps_old_output(tmp_path, monkeypatch):
    paths = _big_ingredients(tmp_path, ["big"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "soup.safetensors").write_bytes(b"old soup")
    fb = FailingBackend(2, KeyboardInterrupt(), out)
    monkeypatch.setattr(weighted_mod, "get_backend", lambda name=None: fb)
    with pytest.raises(KeyboardInterrupt):
        soupkern.uniform_soup(paths, out / "soup.safetensors", budget_bytes=1 << 20, overwrite=True)
    assert listing(out) == ["soup.safetensors"]
    assert (out / "soup.safetensors").read_bytes() == b"old soup"


@pytest.mark.parametrize("at", [2, 20, 40])
def test_interrupted_sharded_leaves_nothing(tmp_path, monkeypatch, at):
    paths = _big_ingredients(tmp_path, ["a", "b", "c"])
    out = tmp_path / "out"
    out.mkdir()
    fb = FailingBackend(at, KeyboardInterrupt(), tmp_path)
    monkeypatch.setattr(weighted_mod, "get_backend", lambda name=None: fb)
    with pytest.raises(KeyboardInterrupt):
        soupkern.uniform_soup(paths, out, max_shard_size=(4 << 20) + 1024, budget_bytes=1 << 20)
    assert fb.calls == at
    assert len([n for n in fb.seen if n.startswith(".out.soupkern-tmp-")]) == 1, fb.seen  # the folder being built
    assert listing(out) == []
    no_temporaries(tmp_path)


def test_interrupted_commit_leaves_no_partial_sharded_output(tmp_path, monkeypatch):
    """An exception at the moment the new folder is to be put in place leaves the old folder (here
    an earlier soup) exactly as it was, and no temporary folder."""
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "out"
    soupkern.uniform_soup(paths, out, max_shard_size=9000)
    before = {f: sha256(out / f) for f in listing(out)}

    def failing(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod.atomic, "exchange", failing)
    with pytest.raises(KeyboardInterrupt):
        soupkern.weighted_soup(paths, [1, 0, 0], out, max_shard_size=9000, overwrite=True)
    monkeypatch.undo()
    assert {f: sha256(out / f) for f in listing(out)} == before
    no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# 9. inputs are never modified

def test_inputs_never_modified(tmp_path):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    gen = torch.Generator().manual_seed(12)
    sh = write_sharded(tmp_path / "sh", {
        "model-00001-of-00002.safetensors": {n: random_tensor(s, d, gen) for n, (s, d) in list(SHARD_SPEC.items())[:5]},
        "model-00002-of-00002.safetensors": {n: random_tensor(s, d, gen) for n, (s, d) in list(SHARD_SPEC.items())[5:]},
    })
    # the sharded ingredient must carry the same non-float tensors
    ids = load_file(os.fspath(paths[0]))["ids"]
    for f in sorted((tmp_path / "sh").glob("*.safetensors")):
        part = load_file(os.fspath(f))
        if "ids" in part:
            part["ids"] = ids
            save(f, part)
    everything = paths + sorted((tmp_path / "sh").glob("*"))
    before = {p: fingerprint(p) for p in everything}
    ingredients = paths + [sh]
    (tmp_path / "o").mkdir()
    soupkern.uniform_soup(ingredients, tmp_path / "o" / "u.safetensors")
    soupkern.weighted_soup(ingredients, [0.1, 0.2, 0.3, 0.4], tmp_path / "o" / "w.safetensors", dtype="fp16", budget_bytes=1 << 20)
    (tmp_path / "o" / "sharded").mkdir()
    soupkern.uniform_soup(ingredients, tmp_path / "o" / "sharded", max_shard_size=9000)
    soupkern.uniform_state_dict(ingredients)
    soupkern.weighted_state_dict(ingredients, [1, -1, 1, -1])
    with pytest.raises(MismatchError):
        soupkern.uniform_soup(paths + [tmp_path / "o" / "u.safetensors", tmp_path / "o" / "sharded"]
                              + [save(tmp_path / "mis.safetensors", {"x": torch.ones(1)})], tmp_path / "o" / "x.safetensors")
    assert {p: fingerprint(p) for p in everything} == before


def test_sharded_output_folder_is_created_and_removed_on_failure(tmp_path, monkeypatch):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "new_folder"
    soupkern.uniform_soup(paths, out, max_shard_size=9000)
    assert (out / "model.safetensors.index.json").exists()

    from soupkern.backends import get_backend

    backend = get_backend()
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return type(backend).weighted_sum(backend, *args, **kwargs)

    monkeypatch.setattr(backend, "weighted_sum", failing)
    with pytest.raises(RuntimeError, match="boom"):
        soupkern.uniform_soup(paths, tmp_path / "other_folder", max_shard_size=9000)
    assert not (tmp_path / "other_folder").exists()


def test_old_checkpoint_in_output_folder_needs_overwrite(tmp_path):
    paths = make_ingredients(tmp_path / "in", spec=SHARD_SPEC)
    out = tmp_path / "out"
    soupkern.uniform_soup(paths, out, max_shard_size=9000)
    before = listing(out)
    with pytest.raises(soupkern.OutputError, match="already"):
        soupkern.uniform_soup(paths, out, max_shard_size=10 << 20)  # would write model.safetensors
    assert listing(out) == before
    soupkern.uniform_soup(paths, out, max_shard_size=10 << 20, overwrite=True)
    assert listing(out) == ["model.safetensors"]
