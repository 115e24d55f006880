"""SPMD souping under torchrun: wall time and the bytes each rank reads, for world sizes 1, 2, 4.

The ingredients are vit.py's synthetic checkpoints; the soup is a sharded folder
(`--max-shard-size`), since ranks split the work by output shard. Each world size runs
`torchrun --standalone --nproc-per-node W -m soupkern uniform ... --force -q` as a whole process
(rendezvous, imports and the process group included), page cache warm (one untimed run first),
median of --repeats, world sizes interleaved. Bytes per rank: the input and output bytes of the
shards `soupkern.distributed.assign` gives each rank (what each rank maps and reads; nothing
else is touched). On this 2-core machine processes beyond 2 share the cores, so the time shows
the cost of coordination more than any speed-up; what scales with the number of nodes is the
bytes per rank, and with it each rank's memory (peak RSS of the largest process, /usr/bin/time).

    python benchmarks/bench_distributed.py --model vit_l14 --dtype bf16 -n 4 --max-shard-size 200000000
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def shares(paths: list[str], max_shard_size: int, world: int) -> list[tuple[int, int]]:
    """(input bytes, output bytes) each rank reads and writes."""
    from contextlib import ExitStack

    from soupkern.distributed import assign
    from soupkern.io import open_checkpoint, plan_output
    from soupkern.plan import build_plan

    with ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p)) for p in paths]
        plan = build_plan(cks, [1.0] * len(cks), divisor=len(cks))
        layout = plan_output([tp.out for tp in plan.tensors], "/nonexistent/out/", {}, max_shard_size)
        owner = assign([s.size for s in layout.shards], world)
        out = [(0, 0)] * world
        for tp in plan.tensors:
            r = owner[layout.where[tp.out.name][0]]
            read, written = out[r]
            out[r] = (read + sum(i.nbytes for _, i in tp.sources), written + tp.out.nbytes)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_l14")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--max-shard-size", type=int, default=200_000_000)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/soupkern-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from common import RESULTS_DIR, fmt, write_results
    from vit import generate_ingredients, get_config

    paths = [os.fspath(p) for p in generate_ingredients(get_config(args.model), args.dtype, args.n, args.cache)]
    worlds = [int(w) for w in args.worlds.split(",")]
    work = tempfile.mkdtemp(dir=args.cache)
    out = os.path.join(work, "soup") + "/"
    times: dict[int, list[float]] = {w: [] for w in worlds}
    rss: dict[int, list[int]] = {w: [] for w in worlds}  # peak RSS of the largest process (a rank or the agent)
    for r in range(args.repeats + 1):
        for w in worlds:
            cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
                   "-m", "soupkern", "uniform", *paths, "-o", out, "--max-shard-size", str(args.max_shard_size),
                   "--force", "-q"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            if r:
                times[w].append(time.perf_counter() - t0)
                rss[w].append(int(proc.stderr.strip().splitlines()[-1]) * 1024)
    rows, records = [], []
    for w in worlds:
        per_rank = shares(paths, args.max_shard_size, w)
        med = statistics.median(times[w])
        reads = [b for b, _ in per_rank]
        rows.append((w, fmt(med, 2), fmt(max(reads) / 1e9, 3), fmt(min(reads) / 1e9, 3),
                     fmt(sum(reads) / 1e9, 3), f"{max(reads) / sum(reads):.2f}", fmt(max(rss[w]) / 2**30, 2)))
        records.append({"world_size": w, "median_s": med, "samples": times[w], "per_rank_read_write_bytes": per_rank,
                        "peak_rss_bytes": rss[w]})
    gb = sum(os.path.getsize(p) for p in paths) / 1e9
    name = args.out or str(RESULTS_DIR / f"distributed_{args.model}_{args.dtype}_n{args.n}")
    write_results(name, f"# SPMD uniform soup under torchrun: {args.n} x {args.model} {args.dtype} ({gb:.2f} GB), "
                  f"shards of at most {args.max_shard_size / 1e6:.0f} MB\n\n"
                  f"`python benchmarks/bench_distributed.py --model {args.model} --dtype {args.dtype} -n {args.n} "
                  f"--max-shard-size {args.max_shard_size} --repeats {args.repeats}`: whole torchrun runs (gloo, "
                  f"OMP_NUM_THREADS=1 per rank), page cache warm, median of {args.repeats}; 2 cores here. Peak RSS: "
                  f"/usr/bin/time's maximum resident set of the largest process (a rank or torchrun's agent), the "
                  f"largest of the repeats.\n\n",
                  ["world size", "median s", "max GB read by a rank", "min GB read by a rank", "GB read in all",
                   "largest share", "peak RSS of a process, GiB"], rows, {"results": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
