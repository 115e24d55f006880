"""The greedy benchmark runs end to end at a tiny size (the harness and its pick check, not the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_greedy_smoke(tmp_path: Path) -> None:
    r = subprocess.run(
        # one intra-op thread: the smoke run checks the harness, and stays fast on a busy 2-core machine
        [sys.executable, str(ROOT / "benchmarks" / "bench_greedy.py"), "--smoke", "--threads", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "results" / "greedy_digits_cpu_smoke.md").read_text()
    for method in ("model_soups_loop", "soupkern_sequential", "soupkern_speculative_2", "soupkern_speculative_4"):
        assert f"| {method} |" in table
    result = json.loads((tmp_path / "results" / "greedy_digits_cpu_smoke.json").read_text())
    for run in result["runs"].values():
        # every method ran and (the script exits non-zero otherwise) picked what the reference loop picked
        assert len(run["greedy"]["rows"]) == 4 and run["greedy"]["kept"]
        assert [row["S"] for row in run["batched_eval"]] == [1, 2]
        assert all(row["max_score_diff"] < 1e-6 for row in run["batched_eval"])
