"""End-to-end uniform-soup benchmark: N synthetic ViT ingredients on disk -> one soup file.

What is measured, per method (see baselines.py for the methods) and per repeat, each run in its
own fresh child process (order interleaved A B C D A B C D ... so drift hits all methods alike):

- `soup_s`: wall time inside the child around the soup call only (file(s) in -> file out,
  including reads, math and writes to the page cache; not interpreter start or imports, which are
  reported separately as `import_s`). With `--fsync` the child also times an fsync of the output.
- GB/s: (bytes of all input files + bytes of the output file) / median `soup_s`.
- peak RSS: `ru_maxrss` of the child from `os.wait4` (KiB on Linux; includes touched mmap'd
  file pages and the interpreter), and the sampled peak anonymous RSS (heap only).
- correctness: on a sample of tensors (all small ones, the big ones of the first and last block,
  the head), the output is compared with round-to-nearest-even(fp64 mean of the ingredients)
  computed here from the input files: max abs error vs the fp64 mean, max ulp distance and the
  fraction of elements not bit-identical to the rounded reference.

Before timing, the inputs are read once to warm the page cache (when they fit in RAM; the result
says whether they did). Outputs are deleted, and `sync` is called, between runs.

    python benchmarks/bench_soup.py --model vit_g14 --dtype bf16 -n 4 --skip-slow-baselines
    python benchmarks/bench_soup.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from baselines import (DIR_OUTPUT_METHODS, METHODS, OPTIONAL_METHODS, REGISTRY, SLOW_METHODS, Launcher,
                       method_unavailable, output_bytes, remove_output)
from common import GIB, MIB, RESULTS_DIR, fmt, md_table, meminfo_kib, provenance, provenance_md

# torch, vit and soupcheck are imported in main() after the launcher is started (see Launcher)

BASELINES = Path(__file__).resolve().parent / "baselines.py"
RAM_FRACTION = 0.85  # a method may use at most this fraction of MemAvailable


# ----------------------------------------------------------------------------- running
def warm(paths: list[Path], block: int = 64 * MIB) -> float:
    """Read every file once (page-cache warm-up); returns GB/s."""
    buf = bytearray(block)
    t0, total = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / 1e9 / (time.perf_counter() - t0)


def spawn(launcher: Launcher, method: str, inputs: list[Path], out: Path, kwargs: dict[str, Any],
          fsync: bool, tmp: Path) -> dict[str, Any]:
    """Run `method` in a fresh child; its measurements plus ru_maxrss and the exit status."""
    spec_path, result_path, log_path = (tmp / f"{method}.{s}" for s in ("spec.json", "result.json", "log"))
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({"method": method, "inputs": [str(p) for p in inputs],
                                     "out": str(out), "kwargs": kwargs, "fsync": fsync,
                                     "result": str(result_path)}))
    run: dict[str, Any] = {"method": method,
                           **launcher.run([sys.executable, str(BASELINES), str(spec_path)], str(log_path))}
    if run["returncode"] == 0 and result_path.exists():
        run.update(json.loads(result_path.read_text()))
        run["out_bytes"] = output_bytes(out)
    else:
        run["error"] = log_path.read_text(errors="replace")[-4000:]
    return run


def output_path(out_dir: Path, method: str) -> Path:
    """Where `method` writes its soup (a folder for DIR_OUTPUT_METHODS)."""
    if method in DIR_OUTPUT_METHODS:
        return out_dir / method
    return out_dir / f"{method}.{'pt' if method == 'model_soups_reference' else 'safetensors'}"


def fits_page_cache(paths: list[Path]) -> bool:
    """Whether the files can stay page-cache resident (under 70% of RAM)."""
    return sum(p.stat().st_size for p in paths) < 0.7 * meminfo_kib()["MemTotal"] * 1024


def run_methods(launcher: Launcher, methods: list[str], method_inputs: dict[str, list[Path]],
                ingredients: list[Path], cfg: Any, tdtype: Any, workdir: Path, repeats: int, *,
                sk_kwargs: dict[str, Any], fsync: bool = False, cold: bool = False, check: bool = True,
                rewarm: bool = False, prefix: str = ""
                ) -> tuple[list[dict[str, Any]], dict[str, Any], set[str]]:
    """`repeats` rounds, each running every method once in order, each run in a fresh child.

    Outputs are deleted before and after each run, `os.sync()` precedes each run; `cold` drops
    the page cache before each run; `rewarm` re-reads a method's inputs (untimed) before each of
    its runs when they fit in the page cache, so every run starts warm even when the inputs of
    all methods together do not fit. The first successful run of each method (but io_floor) is
    checked against the fp64 mean (`soupcheck.check_output`) when `check`.
    Returns (runs, checks by method, methods that failed; a failed method is not rerun).
    """
    from soupcheck import check_output

    out_dir = workdir / "out"
    out_dir.mkdir(exist_ok=True)
    tmp = out_dir / "child"
    tmp.mkdir(exist_ok=True)
    outs = {m: output_path(out_dir, m) for m in methods}
    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    failed: set[str] = set()
    for rep in range(repeats):
        for m in methods:
            if m in failed:
                continue
            remove_output(outs[m])
            warm_s = None
            if rewarm and not cold and fits_page_cache(method_inputs[m]):
                t0 = time.perf_counter()
                warm(method_inputs[m])
                warm_s = time.perf_counter() - t0
            os.sync()  # no dirty pages of an earlier run are written back during this one
            if cold:
                _drop_caches()
            run = spawn(launcher, m, method_inputs[m], outs[m], sk_kwargs if m == "soupkern" else {}, fsync, tmp)
            run["repeat"] = rep
            run["rewarm_s"] = warm_s
            runs.append(run)
            if run["returncode"] != 0:
                failed.add(m)
                print(f"{prefix}[{rep}] {m}: FAILED (rc {run['returncode']})\n{run.get('error', '')}", flush=True)
                remove_output(outs[m])
                continue
            line = (f"{prefix}[{rep}] {m:22s} {run['soup_s']:8.3f} s  maxrss {run['ru_maxrss_kib'] / 1024:8.0f} MiB"
                    f"  anon {run['peak_rss_anon_kib'] / 1024:8.0f} MiB")
            if check and m != "io_floor" and m not in checks:
                fmt_ = "pt" if m == "model_soups_reference" else "safetensors"
                try:
                    checks[m] = check_output(outs[m], fmt_, ingredients, cfg, tdtype)
                except Exception as e:  # noqa: BLE001 - an unreadable output is a failed check
                    checks[m] = {"ok": False, "problems": [f"output unreadable: {e!r}"], "max_abs_err": None,
                                 "max_ulp": None, "frac_not_bit_identical": None, "max_err_over_bound": None,
                                 "elements_checked": 0}
                c = checks[m]
                line += (f"  check: max_abs {c['max_abs_err']:.3g} max_ulp {c['max_ulp']} "
                         f"err/bound {c['max_err_over_bound']:.3g}" if c["elements_checked"] else "  check:")
                line += "" if c["ok"] else f" ✗ {c['problems'][:3]}"
            print(line, flush=True)
            remove_output(outs[m])
    shutil.rmtree(tmp, ignore_errors=True)
    return runs, checks, failed


def check_cell(method: str, c: dict[str, Any] | None) -> str:
    """A check result as 'max abs err / max ulp / not bit-identical / err÷bound' (✗ if not ok)."""
    if method == "io_floor":
        return "n/a (no math)"
    if c is None:
        return "not run"
    if not c["elements_checked"]:
        return "✗ " + "; ".join(c["problems"])[:200]
    return (f"{c['max_abs_err']:.3g} / {c['max_ulp']} / {c['frac_not_bit_identical']:.2%} / "
            f"{c['max_err_over_bound']:.3g}" + ("" if c["ok"] else " ✗"))


def estimate_peak_bytes(method: str, in_bytes: int, pt_bytes: int, itemsize: int) -> int:
    """Rough peak anonymous memory of a method (the refusal check; mmap'd pages not counted)."""
    base = GIB // 2  # interpreter + torch
    if method == "naive_safetensors":  # fp32 accumulator + cast output
        return base + in_bytes * 4 // itemsize + in_bytes
    if method == "model_soups_reference":  # loaded state dict + old soup + new soup (+ temporaries)
        return base + 4 * pt_bytes
    if method == "mergekit_linear":  # + transformers; output shard (<= 5e9 bytes) held until written
        return base + GIB // 2 + min(in_bytes, 5 * 10**9) + in_bytes * 4 // itemsize // 8
    return base


def summarize(runs: list[dict[str, Any]], bytes_moved: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per-method medians/min/max of the successful runs."""
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        ok = [r for r in runs if r["method"] == m and r["returncode"] == 0 and "soup_s" in r]
        if not ok:
            out[m] = {"runs": 0}
            continue
        t = [r["soup_s"] for r in ok]
        med = statistics.median(t)
        fs = [r["fsync_s"] for r in ok if r.get("fsync_s") is not None]
        out[m] = {
            "runs": len(ok), "median_s": med, "min_s": min(t), "max_s": max(t),
            "gbps": bytes_moved[m] / 1e9 / med,
            "import_s": statistics.median(r["import_s"] for r in ok),
            "maxrss_mib": statistics.median(r["ru_maxrss_kib"] for r in ok) / 1024,
            "peak_anon_mib": statistics.median(r["peak_rss_anon_kib"] for r in ok) / 1024,
            "vmhwm_mib": statistics.median(r["vmhwm_kib"] for r in ok) / 1024,
            "rss_after_import_mib": statistics.median(r["rss_after_import_kib"] for r in ok) / 1024,
            "fsync_s": statistics.median(fs) if fs else None,
        }
    return out


def _can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _drop_caches() -> None:
    """Evict clean page-cache pages (after os.sync), so the next run reads its inputs from disk."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="tiny, vit_b32, vit_l14, vit_g14 (default vit_b32; tiny with --smoke)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("-n", "--num", type=int, default=None, help="number of ingredients (default 4; 3 with --smoke)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per method (default 5; 1 with --smoke)")
    ap.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    ap.add_argument("--classes", type=int, default=None, help="override the head size (default 1000)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS + OPTIONAL_METHODS)}")
    ap.add_argument("--skip-slow-baselines", action="store_true",
                    help=f"drop {', '.join(SLOW_METHODS)} (they hold whole models in RAM)")
    ap.add_argument("--workdir", default="/tmp/soupkern-bench", help="ingredients, .pt copies and outputs")
    ap.add_argument("--results-dir", default=None,
                    help=f"where the .md/.json go (default {RESULTS_DIR}; <workdir>/results with --smoke)")
    ap.add_argument("--backend", default=None, help="soupkern backend (default: soupkern's choice)")
    ap.add_argument("--budget-bytes", type=int, default=None, help="soupkern working-memory budget")
    ap.add_argument("--fsync", action="store_true", help="also time an fsync of each output (reported apart)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every run (needs root): inputs are read from disk")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat: checks the harness works")
    args = ap.parse_args(argv)
    launcher = Launcher()  # before torch is imported: keeps the children's ru_maxrss unbiased
    try:
        return _main(args, argv, launcher)
    finally:
        launcher.close()


def _main(args: argparse.Namespace, argv: list[str] | None, launcher: Launcher) -> int:
    # torch comes in with these, after the launcher was started (see main)
    from common import soupkern_info
    from soupcheck import sample_keys
    from vit import (DTYPES, convert_to_pt, generate_ingredients, get_config, ingredient_dir, param_count,
                     vit_shapes)

    model = args.model or ("tiny" if args.smoke else "vit_b32")
    depth = args.depth if args.depth is not None else (1 if args.smoke and model != "tiny" else None)
    cfg = get_config(model, depth, args.classes)
    n = args.num if args.num is not None else (3 if args.smoke else 4)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    if n < 2 or repeats < 1:
        print("error: need -n >= 2 and --repeats >= 1", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        print(f"error: unknown methods {unknown}; choose from {list(REGISTRY)}", file=sys.stderr)
        return 2
    missing = {m: why for m in methods if (why := method_unavailable(m))}
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    if args.skip_slow_baselines:
        for m in SLOW_METHODS:
            if m in methods:
                methods.remove(m)
                skipped[m] = "--skip-slow-baselines"
    sk = soupkern_info()
    if "soupkern" in methods and not sk["available"]:
        print(f"error: {sk['error']}\n(run the baselines alone with --methods "
              f"{','.join(m for m in methods if m != 'soupkern')})", file=sys.stderr)
        return 2
    if not methods:
        print("error: no methods left to run", file=sys.stderr)
        return 2

    tdtype = DTYPES[args.dtype]
    n_params = param_count(cfg)
    in_bytes_est = n_params * tdtype.itemsize
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # refuse before writing anything if RAM or disk cannot take it
    avail = meminfo_kib()["MemAvailable"] * 1024
    too_big = {m: estimate_peak_bytes(m, in_bytes_est, in_bytes_est, tdtype.itemsize) for m in methods}
    too_big = {m: b for m, b in too_big.items() if b > RAM_FRACTION * avail}
    if too_big:
        lst = ", ".join(f"{m} needs ~{b / GIB:.1f} GiB" for m, b in too_big.items())
        print(f"error: refusing to run: {lst}; {avail / GIB:.1f} GiB available (limit "
              f"{RAM_FRACTION:.0%}). Use --skip-slow-baselines or --methods "
              f"{','.join(m for m in methods if m not in too_big)}", file=sys.stderr)
        return 2
    need_disk = in_bytes_est * (n * (2 if "model_soups_reference" in methods else 1) + 2)
    free = shutil.disk_usage(workdir).free
    have = sum(p.stat().st_size for p in ingredient_dir(workdir, cfg, args.dtype).glob("ingredient_*"))
    if need_disk > free * 0.95 + have:
        print(f"error: {workdir} has {free / 1e9:.1f} GB free, about {need_disk / 1e9:.1f} GB needed",
              file=sys.stderr)
        return 2

    print(f"# {cfg.tag} {args.dtype} n={n}: {n_params:,} parameters, "
          f"{in_bytes_est / 1e9:.2f} GB per ingredient; methods {methods}, {repeats} repeats", flush=True)
    t0 = time.perf_counter()
    inputs = generate_ingredients(cfg, args.dtype, n, workdir)
    pt_inputs = convert_to_pt(inputs) if "model_soups_reference" in methods else []
    print(f"ingredients ready in {time.perf_counter() - t0:.1f} s", flush=True)

    method_inputs = {m: (pt_inputs if m == "model_soups_reference" else inputs) for m in methods}
    all_inputs = list(dict.fromkeys(p for m in methods for p in method_inputs[m]))
    total_in = sum(p.stat().st_size for p in all_inputs)
    fits = total_in < 0.7 * meminfo_kib()["MemTotal"] * 1024
    if args.cold and not _can_drop_caches():
        print("--cold needs write access to /proc/sys/vm/drop_caches (root)", file=sys.stderr)
        return 2
    warm_gbps = warm(all_inputs)
    print(f"page-cache warm-up: {total_in / 1e9:.2f} GB at {warm_gbps:.2f} GB/s"
          + ("" if fits else " (inputs do not fit in the page cache: runs are partly cold)"), flush=True)

    sk_kwargs = {k: v for k, v in (("backend", args.backend), ("budget_bytes", args.budget_bytes)) if v is not None}
    runs, checks, failed = run_methods(
        launcher, methods, method_inputs, inputs, cfg, tdtype, workdir, repeats,
        sk_kwargs=sk_kwargs, fsync=args.fsync, cold=args.cold, check=not args.no_check)

    out_bytes = {m: next((r["out_bytes"] for r in runs if r["method"] == m and "out_bytes" in r), 0)
                 for m in methods}
    moved = {m: sum(p.stat().st_size for p in method_inputs[m]) + out_bytes[m] for m in methods}
    summary = summarize(runs, moved)

    def ratio(a: str, b: str) -> float | None:
        sa, sb = summary.get(a, {}), summary.get(b, {})
        return sa["median_s"] / sb["median_s"] if sa.get("runs") and sb.get("runs") else None

    ratios = {"soupkern / io_floor (time)": ratio("soupkern", "io_floor"),
              "naive_safetensors / soupkern (time)": ratio("naive_safetensors", "soupkern"),
              "model_soups_reference / soupkern (time)": ratio("model_soups_reference", "soupkern"),
              "mergekit_linear / soupkern (time)": ratio("mergekit_linear", "soupkern")}
    prov = provenance()
    backend = next((r["info"].get("backend") for r in runs if r["method"] == "soupkern" and "info" in r), None)

    rows = []
    for m in methods:
        s, c = summary.get(m, {"runs": 0}), checks.get(m)
        chk = check_cell(m, c)
        if not s.get("runs"):
            rows.append([m, "failed", "", "", "", "", "", "", chk])
            continue
        rows.append([m, fmt(s["median_s"]), f"{fmt(s['min_s'])}–{fmt(s['max_s'])}", fmt(s["gbps"], 2),
                     f"{s['maxrss_mib']:.0f}", f"{s['peak_anon_mib']:.0f}", fmt(s["import_s"], 2),
                     fmt(s["fsync_s"], 2) if s["fsync_s"] is not None else "–", chk])
    table = md_table(["method", "median s", "min–max s", "GB/s", "maxrss MiB", "peak anon MiB",
                      "import s", "fsync s", "check: max abs err / max ulp / not bit-identical / err÷bound"], rows)
    ratio_lines = "\n".join(f"- {k}: {fmt(v, 2)}" for k, v in ratios.items() if v is not None)
    cmd = "python benchmarks/bench_soup.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = f"""# Uniform soup: {cfg.tag}, {args.dtype}, N={n}

`{cmd}`

- model: {cfg.tag} (D={cfg.dim}, depth {cfg.depth}, MLP {cfg.mlp}, patch {cfg.patch}, img {cfg.img}, \
{cfg.classes} classes), {n_params:,} parameters, {len(vit_shapes(cfg))} tensors
- inputs: {n} x {inputs[0].stat().st_size / 1e9:.3f} GB safetensors ({args.dtype}); \
{repeats} repeats per method, each in a fresh process, order {' '.join(methods)} per repeat
- page cache: {total_in / 1e9:.2f} GB of inputs, warm-up read at {warm_gbps:.2f} GB/s; \
{'COLD runs: the page cache is dropped before every run, inputs come from disk' if args.cold else ('inputs fit in RAM (warm runs)' if fits else 'inputs do NOT fit in RAM: runs read partly from disk')}
- soupkern backend reported: {backend}; kwargs {sk_kwargs or '{}'}
- time = wall time around the soup only (inside the child); GB/s = (input file bytes + output file \
bytes) / median time; maxrss = ru_maxrss of the child (includes mmap'd file pages and the \
interpreter; measured by a ~10 MB launcher, whose own RSS is the floor); peak anon = sampled \
RssAnon peak
- check, on {len(sample_keys(cfg))} of {len(vit_shapes(cfg))} tensors: max abs error vs the fp64 \
mean; max ulp distance from and share of elements not bit-identical to round-to-nearest-even(fp64 \
mean); err÷bound = max |out - mean| / (1 ulp of the output at |mean| + (N+1)·2^-24·mean|x|), the \
allowance of an fp32-accumulated mean; ✗ = over 1 (expected for model_soups_reference in 16-bit \
dtypes: it multiplies and adds in the ingredients' dtype)
{"- skipped: " + ", ".join(f"{k} ({v})" for k, v in skipped.items()) if skipped else ""}

{table}

{ratio_lines}

## Provenance
{provenance_md(prov)}
"""
    results_dir = Path(args.results_dir) if args.results_dir else (
        workdir / "results" if args.smoke else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"soup_{cfg.tag}_{args.dtype}_n{n}" + ("_cold" if args.cold else "")
    (results_dir / f"{stem}.md").write_text(md)
    (results_dir / f"{stem}.json").write_text(json.dumps({
        "provenance": prov, "args": vars(args), "config": {**cfg.__dict__, "tag": cfg.tag, "params": n_params},
        "num_ingredients": n, "repeats": repeats, "methods": methods, "skipped": skipped,
        "input_bytes": {m: sum(p.stat().st_size for p in method_inputs[m]) for m in methods},
        "output_bytes": out_bytes, "page_cache_fits": fits, "warm_gbps": warm_gbps,
        "runs": runs, "checks": checks, "summary": summary, "ratios": ratios}, indent=1))
    print("\n" + table + "\n\n" + ratio_lines)
    print(f"\nwrote {results_dir / stem}.md and .json")
    bad = failed or {m for m, c in checks.items() if m in ("soupkern", "naive_safetensors") and not c["ok"]}
    if bad:
        print(f"error: failed or incorrect: {sorted(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
