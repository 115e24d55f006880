"""benchmarks/bench_gpu.py runs end to end at a tiny size (the harness, not the figures): on a
machine without a GPU with the torch device kernels on CPU, saying that no GPU figure was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = next((tmp_path / "results").glob("gpu_*.md")).read_text()
    data = json.loads(next((tmp_path / "results").glob("gpu_*.json")).read_text())
    methods = {row["method"] for row in data["kernels"]}
    assert {"copy", "torch naive"} <= methods
    assert {row["what"] for row in data["end_to_end"]} == {"pinned H2D", "file -> device", "file -> file"}
    if torch.cuda.is_available():
        assert {"cuda multi-tensor", "triton multi-tensor"} <= methods
    else:
        assert "no GPU figure is measured" in r.stdout
        assert "cpu (smoke, no GPU)" in md and "| file -> file | cpp |" in md
    assert not list((ROOT / "benchmarks" / "results").glob("gpu_cpu*"))  # smoke output stays in the workdir


def test_bench_gpu_refuses_without_gpu_or_smoke(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full benchmark would run")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr
