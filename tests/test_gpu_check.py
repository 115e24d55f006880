"""benchmarks/gpu_check.py (`make gpu-check`) end to end on a machine without a GPU, quickly: the GPU
stages say "skipped: no GPU" (not failed), the run exits 0 and leaves one tarball with the summary
in $OUT; a stage that runs out of time is recorded, the others still run, and the tarball is
still written. The install stage is skipped here (--skip install: it rebuilds the extensions);
on a GPU machine --no-gpu makes the run the same."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
GPU_STAGES = ["gpu_tests", "bench_gpu", "bench_soup_linear", "bench_greedy"]


def run_check(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    out, work, results = tmp_path / "out", tmp_path / "work", tmp_path / "results"
    results.mkdir(exist_ok=True)
    earlier = results / "soup_linear_cuda.md"
    earlier.write_text("# an earlier result\n")  # packed, marked as not from this run
    os.utime(earlier, (1e9, 1e9))
    (results / "kernel_cpu.md").write_text("# not a GPU result\n")  # not packed
    args = [sys.executable, str(SCRIPT), "--skip", "install", "--work-dir", str(work), "--results-dir", str(results),
            "--bench-workdir", str(tmp_path / "bench"), *extra]
    if torch.cuda.is_available():
        args.append("--no-gpu")
    env = {**os.environ, "OUT": str(out)}
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    return r, out, work


def members(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_without_gpu_runs_end_to_end_and_packs(tmp_path: Path) -> None:
    r, out, work = run_check(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert summary["ok"] and summary["gpu"] is False
    assert stages["env"]["status"] == "ok" and stages["env"]["gpu"] is False
    assert stages["install"]["label"] == "skipped: --skip"
    assert stages["backends"]["status"] == "ok" and stages["backends"]["backends"]["cpp"]["available"]
    for name in GPU_STAGES:
        assert stages[name]["status"] == "skipped" and stages[name]["reason"] == "no GPU", stages[name]
        assert stages[name]["label"] == "skipped: no GPU"
    assert stages["pack"]["status"] == "ok"
    env = summary["environment"]
    assert env["python"] and env["torch"] == torch.__version__ and "triton" in env
    md = (out / "gpu_check.md").read_text()
    assert "| gpu_tests | skipped: no GPU |" in md and "| bench_gpu | skipped: no GPU |" in md
    assert "skipped: no GPU" in r.stdout

    # $OUT as the device tool brings it back: at most 8 plain files, plain names, under 16 MiB each
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "gpu_check.tar.gz"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).stat().st_size < 16 << 20 for f in files)
    got = members(out / "gpu_check.tar.gz")
    assert got["gpu_check/gpu_check.md"].decode() == md
    assert json.loads(got["gpu_check/gpu_check.json"])["stages"][-1]["name"] == "pack"
    assert any(n.startswith("gpu_check/logs/") and n.endswith("_backends.log") for n in got)
    assert "gpu_check/results/soup_linear_cuda.md" in got and "gpu_check/results/kernel_cpu.md" not in got
    assert summary["results"] == [{"file": "soup_linear_cuda.md", "written_in_this_run": False}]
    log = (out / "gpu_check.log").read_text()
    assert log.index("env: ok") < log.index("backends: ok") < log.index("bench_greedy: skipped: no GPU")
    assert not (work / "gpu_check.tar.gz").exists()  # with $OUT set the tarball goes there only


def test_a_stage_out_of_time_is_recorded_and_the_rest_still_runs(tmp_path: Path) -> None:
    r, out, _ = run_check(tmp_path, "--stage-timeout", "backends=0.2")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert not summary["ok"] and summary["failed"] == ["backends"]
    assert stages["backends"]["status"] == "timeout" and stages["backends"]["returncode"] is None
    assert [stages[n]["label"] for n in GPU_STAGES] == ["skipped: no GPU"] * len(GPU_STAGES)
    assert stages["pack"]["status"] == "ok"
    got = members(out / "gpu_check.tar.gz")
    backends_log = next(v for n, v in got.items() if n.endswith("_backends.log")).decode()
    assert "killed after" in backends_log


def test_make_target_does_not_install() -> None:
    make = (ROOT / "Makefile").read_text()
    m = re.search(r"^gpu-check:(.*)$", make, re.MULTILINE)
    assert m and m.group(1).strip() == "", "gpu-check must not depend on install (it runs on a machine without network)"
    assert re.search(r"^\.PHONY:.*\bgpu-check\b", make, re.MULTILINE)
    assert "benchmarks/gpu_check.py" in make.split("gpu-check:", 1)[1].split("\n\n")[0]
