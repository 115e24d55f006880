"""Whole-process file-to-file uniform soup against the I/O floor, in the page-cache regimes users meet.

Each run is a whole process started from the shell's point of view (interpreter start and imports
included): `python -m soupkern uniform IN... -o OUT -q --force` against the floor,
`python bench_io_regimes.py --floor OUT IN...` (no math, no torch: read every input byte once,
one file after another, with 32 MiB `readinto`, then write one output file of the soup's size).
The two alternate, A B A B ..., and each regime reports medians and the median of the per-pair
ratios soupkern / floor:

- `warm`: inputs read once before the runs (only when they fit in RAM);
- `cold`: `echo 3 > /proc/sys/vm/drop_caches` before every run (needs root);
- `alternating`: nothing between runs: each run starts from the page cache the previous run
  (of the other method) left, as back-to-back jobs on one machine do; the case of inputs larger
  than RAM;
- `capped`: cold, and the run inside a cgroup (v1 memory controller) limited to 768 MiB, page
  cache included (needs root).

soupkern's modules are byte-compiled once before the runs (`compileall`), as a wheel install
(or `make install`) leaves them: where PYTHONDONTWRITEBYTECODE=1 is set, as on the machines these
results come from, an editable install never caches bytecode and every run would compile
soupkern's sources again (about 50 ms).

    python benchmarks/bench_io_regimes.py --model vit_g14 --dtype bf16 -n 8 --regimes alternating,cold
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BLOCK = 32 << 20
CGROUP = Path("/sys/fs/cgroup/memory/soupkern_bench")


def floor(out: str, inputs: list[str]) -> None:
    """The I/O floor: every input byte read once, in file order; one output of the soup's size written."""
    buf = bytearray(BLOCK)
    size = os.path.getsize(inputs[0])
    for p in inputs:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    with open(out, "wb", buffering=0) as f:
        left = size
        while left:
            left -= f.write(memoryview(buf)[:min(left, BLOCK)])


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cap(limit: int) -> list[str]:
    """A command prefix that runs its command inside the memory cgroup limited to `limit` bytes."""
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh"]


def _disk_reads() -> int:
    """Bytes the system has read from block devices so far (/proc/vmstat pgpgin, KiB), or 0."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("pgpgin "):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, dict[str, float]]:
    """Wall seconds, peak RSS (KiB) and {user s, system s, disk GB read system-wide} of `cmd` as a
    whole process (/usr/bin/time; /proc/vmstat around it)."""
    before = _disk_reads()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", *cmd], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    user, system, peak = proc.stderr.strip().splitlines()[-1].split()
    return seconds, int(peak), {"user_s": float(user), "system_s": float(system),
                                "disk_read_gb": (_disk_reads() - before) / 1e9}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--floor":
        floor(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b32")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--regimes", default="warm,cold,alternating,capped")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap-bytes", type=int, default=768 << 20)
    ap.add_argument("--cache", default="/tmp/soupkern-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in soupkern's environment (e.g. SOUPKERN_READS=map); repeatable")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS_DIR, fmt, meminfo_kib, write_results
    from vit import generate_ingredients, get_config

    paths = [os.fspath(p) for p in generate_ingredients(get_config(args.model), args.dtype, args.n, args.cache)]
    package = importlib.util.find_spec("soupkern").submodule_search_locations[0]  # type: ignore[union-attr,index]
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True, stdout=subprocess.DEVNULL)
    inputs_gb = sum(os.path.getsize(p) for p in paths) / 1e9
    out = os.path.join(args.cache, f"regimes_{args.model}_{args.dtype}.safetensors")
    commands = {
        "floor": [sys.executable, os.path.abspath(__file__), "--floor", out, *paths],
        "soupkern": [sys.executable, "-m", "soupkern", "uniform", *paths, "-o", out, "-q", "--force"],
    }
    env = dict(kv.split("=", 1) for kv in args.env)
    fits = inputs_gb * 1e9 < 0.8 * meminfo_kib()["MemTotal"] * 1024
    rows, records = [], []
    for regime in args.regimes.split(","):
        if regime == "warm" and not fits:
            continue
        times: dict[str, list[float]] = {m: [] for m in commands}
        rss: dict[str, list[int]] = {m: [] for m in commands}
        cpu_io: dict[str, list[dict[str, float]]] = {m: [] for m in commands}
        if regime == "warm":
            floor(out, paths)
        for _ in range(args.repeats):
            for method, cmd in commands.items():
                if regime in ("cold", "capped"):
                    _drop_caches()
                prefix = _cap(args.cap_bytes) if regime == "capped" else []
                seconds, peak, usage = _run([*prefix, *cmd], env if method == "soupkern" else None)
                times[method].append(seconds)
                rss[method].append(peak)
                cpu_io[method].append(usage)
                os.remove(out)
        ratios = [s / f for s, f in zip(times["soupkern"], times["floor"])]
        def med(method: str, key: str) -> str:
            return f"{statistics.median(u[key] for u in cpu_io[method]):.1f}"
        rows.append((regime, fmt(statistics.median(times["floor"]), 2), fmt(statistics.median(times["soupkern"]), 2),
                     f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}",
                     fmt(max(rss["soupkern"]) / 2**20, 2),
                     f"{med('floor', 'user_s')} / {med('floor', 'system_s')}",
                     f"{med('soupkern', 'user_s')} / {med('soupkern', 'system_s')}",
                     f"{med('floor', 'disk_read_gb')} / {med('soupkern', 'disk_read_gb')}"))
        records.append({"regime": regime, "seconds": times, "peak_rss_kib": rss, "ratios": ratios, "usage": cpu_io})
    name = args.out or str(RESULTS_DIR / f"io_regimes_{args.model}_{args.dtype}_n{args.n}")
    write_results(name, f"# Whole-process uniform soup vs the I/O floor: {args.n} x {args.model} {args.dtype} "
                  f"({inputs_gb:.1f} GB of inputs)\n\n"
                  f"`python benchmarks/bench_io_regimes.py --model {args.model} --dtype {args.dtype} -n {args.n} "
                  f"--regimes {args.regimes} --repeats {args.repeats}{''.join(' --env ' + kv for kv in args.env)}`: whole processes (interpreter start and "
                  "imports included), soupkern and the floor alternating, medians of "
                  f"{args.repeats}; ratio = median of the per-pair soupkern / floor ratios; user / sys: CPU seconds "
                  "of the process (/usr/bin/time), medians; disk GB read: /proc/vmstat pgpgin over the run "
                  "(system-wide), medians.\n\n",
                  ["regime", "floor s", "soupkern s", "ratio", "ratio range", "soupkern peak RSS GiB",
                   "floor user / sys s", "soupkern user / sys s", "disk GB read floor / soupkern"], rows,
                  {"results": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
