"""The `soupkern` command and engine-level properties (chunking, budgets, import cost)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkern
from soupkern.cli import main, parse_size


def _ingredients(tmp_path: Path, k: int = 3, seed: int = 0) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(300, 257, generator=g).bfloat16(),
        "b": torch.randn(257, generator=g),
        "scalar": torch.randn((), generator=g),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "ids": torch.arange(7),
    }
    paths = []
    for i in range(k):
        sd = {n: (t + 0.01 * torch.randn(t.shape, generator=g).to(t.dtype)) if t.is_floating_point() else t.clone() for n, t in base.items()}
        p = tmp_path / f"ing{i}.safetensors"
        save_file(sd, str(p), metadata={"format": "pt"})
        paths.append(p)
    return paths


def test_budget_and_threads_do_not_change_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _ingredients(tmp_path)
    soupkern.uniform_soup(paths, tmp_path / "a.safetensors")
    soupkern.uniform_soup(paths, tmp_path / "b.safetensors", budget_bytes=1 << 20)  # many chunks
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    from soupkern.backends import _cache

    _cache["cpp"].threads = 1
    try:
        soupkern.uniform_soup(paths, tmp_path / "c.safetensors", budget_bytes=1 << 20)
    finally:
        _cache["cpp"].threads = 0
    assert a == (tmp_path / "c.safetensors").read_bytes()


def test_weighted_cli_matches_api_and_reference(tmp_path: Path) -> None:
    paths = _ingredients(tmp_path)
    rc = main(["weighted", f"{paths[0]}:0.5", f"{paths[1]}:-0.25", f"{paths[2]}:0.75", "-o", str(tmp_path / "w.safetensors"), "-q", "--dtype", "fp32"])
    assert rc == 0
    out = load_file(str(tmp_path / "w.safetensors"))
    sds = [load_file(str(p)) for p in paths]
    ref = 0.5 * sds[0]["w"].double() - 0.25 * sds[1]["w"].double() + 0.75 * sds[2]["w"].double()
    assert out["w"].dtype == torch.float32
    # fp32 accumulation of 3 terms: |err| <= 4 * 3 * 2^-24 * sum|w x| (see reference.accumulation_bound)
    mag = sum(abs(c) * sd["w"].double().abs() for c, sd in zip((0.5, 0.25, 0.75), sds))
    assert ((out["w"].double() - ref).abs() <= 12 * 2**-24 * mag + 1e-44).all()
    assert out["ids"].equal(sds[0]["ids"]) and out["empty"].shape == (0, 4)
    assert out["scalar"].shape == ()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    paths = _ingredients(tmp_path, k=2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", str(paths[0]), str(bad), "-o", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "bad.safetensors" in r.stderr and "JSON" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "soupkern", "weighted", f"{paths[0]}", "-o", "x.safetensors"], capture_output=True, text=True)
    assert r.returncode == 2 and "PATH:COEFFICIENT" in r.stderr
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *map(str, paths), "-o", str(paths[0])], capture_output=True, text=True)
    assert r.returncode == 2 and "one of the inputs" in r.stderr


def test_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _ingredients(tmp_path, k=1)
    assert main(["inspect", str(paths[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {t["name"]: t for t in info["tensors"]}
    assert names["w"] == {"name": "w", "dtype": "BF16", "shape": [300, 257], "nbytes": 300 * 257 * 2}
    assert info["metadata"] == {"format": "pt"}
    assert main(["inspect", str(paths[0])]) == 0
    assert "5 tensors in 1 file(s)" in capsys.readouterr().out


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(Exception):
        parse_size("five")


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    status = soupkern.available_backends()
    assert status["cpp"].available and status["torch"].available
    with pytest.raises(soupkern.BackendUnavailableError, match="unknown backend 'cuda-nope'"):
        soupkern.get_backend("cuda-nope")
    monkeypatch.setenv("SOUPKERN_BACKEND", "torch")
    assert soupkern.get_backend().name == "torch"
    monkeypatch.setattr("soupkern.backends._MODULES", {**soupkern.backends._MODULES, "cpp": "soupkern.no_such_module"})
    monkeypatch.setattr("soupkern.backends._cache", {})
    monkeypatch.delenv("SOUPKERN_BACKEND")
    with pytest.raises(soupkern.BackendUnavailableError, match="backend 'cpp' cannot run here"):
        soupkern.get_backend("cpp")
    assert soupkern.get_backend().name == "torch"  # automatic choice falls back


def test_backends_agree_within_contract(tmp_path: Path) -> None:
    """cpp (fma, 1 rounding a term) and torch (2 roundings a term) each lie within their
    accumulation bound of the exact sum, so they differ by at most the sum of the two bounds."""
    paths = _ingredients(tmp_path)
    a = soupkern.uniform_state_dict(paths, backend="cpp", dtype="fp32")
    b = soupkern.uniform_state_dict(paths, backend="torch", dtype="fp32")
    sds = [load_file(str(p)) for p in paths]
    k, u = len(paths), 2.0**-24
    for name in a:
        if not a[name].is_floating_point():
            assert a[name].equal(b[name])
            continue
        mag = sum(sd[name].double().abs() / k for sd in sds)
        bound = ((1 + 1) * k + (1 + 2) * k) * u * mag + 2 * k * 2.0**-149
        assert ((a[name].double() - b[name].double()).abs() <= bound).all(), name


def test_import_is_cheap() -> None:
    code = "import sys, soupkern; bad = [m for m in ('torch', 'triton', 'cupy') if m in sys.modules]; print(bad)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"



def test_per_tensor_coefficients(tmp_path: Path) -> None:
    """A mapping of coefficients: each named tensor gets its own vector, the others `default`;
    each tensor must equal the single-vector soup with its coefficients, bit for bit."""
    paths = _ingredients(tmp_path)
    per = {"w": [0.5, 0.25, 0.25], "scalar": [2.0, -1.0, 0.0]}
    default = [0.2, 0.3, 0.5]
    soupkern.weighted_soup(paths, per, tmp_path / "per.safetensors", default=default)
    got = load_file(str(tmp_path / "per.safetensors"))
    for name in got:
        coeffs = per.get(name, default)
        soupkern.weighted_soup(paths, coeffs, tmp_path / "one.safetensors", overwrite=True)
        ref = load_file(str(tmp_path / "one.safetensors"))[name]
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), name
    from safetensors import safe_open

    with safe_open(str(tmp_path / "per.safetensors"), framework="pt") as f:
        recorded = json.loads(f.metadata()["soupkern.coefficients"])
    assert recorded["w"] == per["w"] and recorded["b"] == default
    state = soupkern.weighted_state_dict(paths, per, default=default)
    assert all(torch.equal(state[n], got[n]) for n in got)
    with pytest.raises(soupkern.InputError, match="nope"):
        soupkern.weighted_soup(paths, {"nope": [1, 0, 0]}, tmp_path / "bad.safetensors")
    with pytest.raises(soupkern.InputError, match="'w'|w"):
        soupkern.weighted_soup(paths, {"w": [1, 0]}, tmp_path / "bad.safetensors")
    with pytest.raises(soupkern.InputError, match="default"):
        soupkern.weighted_soup(paths, [1, 0, 0], tmp_path / "bad.safetensors", default=[1, 0, 0])
    assert not (tmp_path / "bad.safetensors").exists()


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar is drawn when stderr is a terminal, and not otherwise (no carriage returns in
    logs; tqdm is then not even imported: test_api_validation checks that)."""
    import io
    from contextlib import nullcontext

    from tqdm import tqdm

    from soupkern.recipes.weighted import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with _progress_bar(1000, True) as bar:
        assert isinstance(bar, tqdm)
        bar.update(1000)
    assert "soup" in sys.stderr.getvalue()
    assert isinstance(_progress_bar(1000, False), nullcontext)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(_progress_bar(1000, True), nullcontext)
