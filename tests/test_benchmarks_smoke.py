"""The benchmark scripts run end to end at a tiny size (the harness, not the figures)."""

from __future__ import annotations

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
