"""benchmarks/bench_soup_linear.py runs end to end at a tiny size (the harness, not the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_soup_linear.py"


def test_bench_soup_linear_smoke_cpu(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--results-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "soup_linear_cpu.md").read_text()
    assert "| fp32 | 1 |" in table and "| fp32 | 2 |" in table
    data = json.loads((tmp_path / "soup_linear_cpu.json").read_text())
    assert data["measured"] and len(data["results"]) == 2
    for entry in data["results"]:
        # fp32 results of both methods agree with the fp64 reference to a few fp32 ulps
        assert entry["rel_error"]["fused"] < 1e-5 and entry["rel_error"]["materialize"] < 1e-5
        assert set(entry["median_s"]) == {"fused", "materialize", "matmul_floor"}


def test_bench_soup_linear_cuda_without_gpu_is_marked_unmeasured(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():  # then the GPU path runs for real: check it measured
        args = [sys.executable, str(SCRIPT), "--smoke", "--device", "cuda", "--results-dir", str(tmp_path)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((tmp_path / "soup_linear_cuda.json").read_text())["measured"]
        return
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cuda", "--results-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((tmp_path / "soup_linear_cuda.json").read_text())
    assert data["measured"] is False and data["results"] == []
    assert "unmeasured" in (tmp_path / "soup_linear_cuda.md").read_text()
