"""The benchmark scripts run end to end at a tiny size (the harness, not the figures)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_soup_smoke(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_soup.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = next((tmp_path / "results").glob("soup_*.md")).read_text()
    for method in ("io_floor", "soupkern", "naive_safetensors", "model_soups_reference"):
        assert f"| {method} |" in table
    soupkern_row = next(line for line in table.splitlines() if line.startswith("| soupkern |"))
    assert "✗" not in soupkern_row  # soupkern's output passed the fp64 check


def test_bench_kernel_smoke(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernel.py"), "--size-mib", "2", "--repeats", "2",
         "--ks", "2", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "weighted_sum" in (tmp_path / "kernel_cpu.md").read_text()


def test_bench_peers_smoke(tmp_path: Path) -> None:
    """Every peer runs (or says why not) and is checked against round(fp64 mean); plots written."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--smoke", "--dtypes", "bf16",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = tmp_path / "results"
    data = json.loads((res / "peers_cpu.json").read_text())
    assert sorted(data["configs"]) == ["tiny/bf16/n2", "tiny/bf16/n3"]
    have_mergekit = importlib.util.find_spec("mergekit") is not None
    for key, rec in data["configs"].items():
        for m in ("io_floor", "soupkern", "naive_safetensors", "model_soups_reference"):
            assert rec["summary"][m]["runs"] == 1, (key, m)
        # fp32 accumulation, one rounding: within the bound, mostly bit-identical to round(fp64 mean)
        for m in ("soupkern", "naive_safetensors"):
            assert rec["checks"][m]["ok"] and rec["checks"][m]["max_ulp"] <= 1, (key, m, rec["checks"][m])
        if have_mergekit:
            assert rec["summary"]["mergekit_linear"]["runs"] == 1, key
            assert rec["checks"]["mergekit_linear"]["elements_checked"] > 0, key
        else:
            assert "mergekit is not installed" in rec["skipped"]["mergekit_linear"], key
    md = (res / "peers_cpu.md").read_text()
    assert "| tiny/bf16/n3 | mergekit_linear |" in md
    for name in ("peers_scaling_size.png", "peers_scaling_n.png"):
        assert (res / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_peers_skips_with_reasons(tmp_path: Path, monkeypatch) -> None:
    """Missing package, memory and disk limits skip a method with its reason (never silently)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mergekit" else real_find_spec(name, *a))
    methods = ["io_floor", "soupkern", "naive_safetensors", "mergekit_linear"]
    run, skipped, fits = bench_peers.plan_methods(methods, 1000, 2, 2, tmp_path, 0, 0)
    assert fits and run == ["io_floor", "soupkern", "naive_safetensors"]
    assert skipped == {"mergekit_linear": "not run: mergekit is not installed "
                                          "(pip install -c constraints.txt mergekit)"}
    # 10^12 bf16 parameters: naive needs an fp32 copy (4 TB) -> memory; 2 TB inputs -> disk
    run, skipped, fits = bench_peers.plan_methods(methods[:3], 10**12, 2, 2, tmp_path, 0, 0)
    assert not fits and run == []
    assert skipped["naive_safetensors"].startswith("out of memory, not run: needs ~")
    assert "of disk" in skipped["soupkern"] and "of disk" in skipped["io_floor"]


def test_bench_distributed_greedy_smoke(tmp_path: Path) -> None:
    """World sizes 1 and 2 on 4 digits ingredients: the run fails unless both write the same soup."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_distributed_greedy.py"), "--smoke", "--workdir",
         str(tmp_path), "--out", str(tmp_path / "res")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "res.md").read_text()
    assert "| 1 |" in table and "| 2 |" in table and "same soup file" in table


def test_bench_io_regimes_smoke(tmp_path: Path) -> None:
    """Whole-process soupkern vs the I/O floor, alternating (the regimes needing root are left out)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_io_regimes.py"), "--model", "tiny", "-n", "2",
         "--regimes", "warm,alternating", "--repeats", "1", "--cache", str(tmp_path), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [row["regime"] for row in rows] == ["warm", "alternating"]
    assert all(len(row["ratios"]) == 1 and row["ratios"][0] > 0 for row in rows)
