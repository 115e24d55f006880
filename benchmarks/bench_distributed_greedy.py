"""Data-parallel greedy soup under torchrun: time against world size on digits ingredients.

Ingredients: `soupkern.examples.digits.make_ingredients` (cached under --workdir). Held-out data:
the digits val split repeated --tile times (`digits.tiled(..., noise=0)`: exact copies, so every
score and pick is the val split's own while a pass does --tile times the work), in batches of
--batch-size. Each world size W runs the same command as one torchrun job,

    torchrun --standalone --nproc-per-node W -m soupkern greedy ING... --model H:model --data H:data -o OUT -q

(W = 1 as a plain process: `python -m soupkern greedy ...`), whole processes, median of --repeats
interleaved runs after one warm-up each. Every run must write the same soup (file bytes compared:
the picks and scores are those of one process); a mismatch fails the benchmark. Rank r scores
batches r, r + W, ... of every candidate; the per-batch sums are gathered and added in batch
order. On this 2-core machine W > 2 only adds processes.

    python benchmarks/bench_distributed_greedy.py              # 8 ingredients, tile 64, W = 1, 2, 4
    python benchmarks/bench_distributed_greedy.py --smoke --workdir /tmp/x
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, fmt, import_soupkern, write_results  # noqa: E402

HOOKS = """
from soupkern.examples import digits
def model():
    return digits.make_model()
def data():
    val = digits.make_splits({seed}).val
    return digits.batches(digits.tiled(val, {tile}, noise=0.0), {batch})
"""


def command(world: int, ingredients: list[Path], hooks: Path, out: Path) -> list[str]:
    args = ["greedy", *map(str, ingredients), "--model", f"{hooks}:model", "--data", f"{hooks}:data",
            "-o", str(out), "--force", "-q"]
    if world == 1:
        return [sys.executable, "-m", "soupkern", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
            "-m", "soupkern", *args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=8, help="ingredients")
    ap.add_argument("--tile", type=int, default=64, help="copies of the val split in the held-out data")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/soupkern-bench/digits")
    ap.add_argument("--smoke", action="store_true", help="4 ingredients, tile 2, W = 1, 2, one repeat")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.tile, args.worlds, args.repeats = 4, 2, "1,2", 1
    worlds = [int(w) for w in args.worlds.split(",")]
    import_soupkern()
    from soupkern.examples import digits

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ingredients = digits.make_ingredients(work, args.n, 0)
    hooks = work / f"greedy_hooks_t{args.tile}_b{args.batch_size}.py"
    hooks.write_text(HOOKS.format(seed=0, tile=args.tile, batch=args.batch_size))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it per rank; W = 1 alike
    times: dict[int, list[float]] = {w: [] for w in worlds}
    soups: dict[int, bytes] = {}
    for r in range(args.repeats + 1):
        for w in worlds:
            out = work / f"greedy_w{w}.safetensors"
            t0 = time.perf_counter()
            p = subprocess.run(command(w, ingredients, hooks, out), capture_output=True, text=True, env=env)
            dt = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"world size {w} failed:\n{p.stderr[-3000:]}")
            soups[w] = out.read_bytes()
            if r:
                times[w].append(dt)
    if len(set(soups.values())) != 1:
        raise SystemExit("the world sizes wrote different soups")
    with open(work / f"greedy_w{worlds[0]}.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    kept = json.loads(header["__metadata__"]["soupkern.greedy.kept"])
    samples = 359 * args.tile
    base = statistics.median(times[worlds[0]])
    rows, records = [], []
    for w in worlds:
        med = statistics.median(times[w])
        rows.append((str(w), fmt(med, 2), fmt(base / med, 2), f"{samples // w:,}"))
        records.append({"world_size": w, "median_s": med, "samples": times[w]})
    name = args.out or str(RESULTS_DIR / f"distributed_greedy_digits_n{args.n}_t{args.tile}")
    write_results(name, f"# Data-parallel greedy soup: {args.n} digits ingredients, {samples:,} held-out samples\n\n"
                  f"`python benchmarks/bench_distributed_greedy.py -n {args.n} --tile {args.tile} --batch-size "
                  f"{args.batch_size} --worlds {args.worlds} --repeats {args.repeats}`: whole processes (torchrun for "
                  f"W > 1, OMP_NUM_THREADS=1 per process), median of {args.repeats} after a warm-up; every world size "
                  f"wrote the same soup file, {len(kept)} of {args.n} ingredients kept.\n\n",
                  ["world size", "median s", "speed-up vs W=1", "held-out samples per rank"], rows,
                  {"results": records, "kept": kept})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
