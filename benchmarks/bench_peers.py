"""soupkern against the tools people use: uniform soup, file to file, over a matrix of configs.

For every (model, dtype, N) in the matrix (synthetic timm-shaped ViT-B/32, ViT-L/14, ViT-G/14
ingredients; bf16 and fp32; N = 2, 4, 8) this runs, each in a fresh child process and
interleaved (A B C D E A B C D E ...), the methods of baselines.py:

    io_floor, soupkern, naive_safetensors, model_soups_reference, mergekit_linear

and records the median wall time of the soup, peak RSS (ru_maxrss from wait4) and peak anonymous
RSS of each child, and checks every output against round-to-nearest-even(fp64 mean) on a sample
of tensors (soupcheck.py). A method that cannot run is skipped with its reason written into the
results, never silently: optional package missing (mergekit), predicted peak memory over 85% of
MemAvailable, or not enough disk for its inputs. Before each run the method's inputs are re-read
(untimed) when they fit in 70% of RAM, so such runs are warm; larger inputs are read partly from
disk, and the results say which. The 1-minute load average is recorded at the start and end of
every config (other jobs may share the cores: compare ratios measured in one config).

Results accumulate in `<results-dir>/peers_cpu.json` (one entry per config, replaced when a config
is rerun), rendered to `peers_cpu.md` and the plots `peers_scaling_size.png` (time and peak RSS
against model size at N=4) and `peers_scaling_n.png` (against N for one model) after every config.

    python benchmarks/bench_peers.py --smoke                               # tiny, seconds
    python benchmarks/bench_peers.py --models vit_b32 --dtypes bf16,fp32 --ns 2,4,8
    python benchmarks/bench_peers.py --render-only                         # md + png from the json
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

from baselines import METHODS, OPTIONAL_METHODS, Launcher, method_unavailable
from bench_soup import RAM_FRACTION, estimate_peak_bytes, fits_page_cache, run_methods, summarize
from common import GIB, RESULTS_DIR, fmt, md_table, meminfo_kib, provenance, provenance_md

# torch (through vit / soupcheck) is imported only after the launcher is started (see Launcher)

PEER_METHODS = METHODS + OPTIONAL_METHODS
RESULT_STEM = "peers_cpu"
DISK_MARGIN = 2 * 10**9  # bytes left free on the work disk


def config_key(tag: str, dtype: str, n: int) -> str:
    return f"{tag}/{dtype}/n{n}"


def repeats_for(total_in: int, args: argparse.Namespace) -> int:
    """Fewer repeats for big inputs: --repeats up to --large-gb, then --large-repeats, then
    --huge-repeats past --huge-gb (of input bytes read by one method)."""
    gb = total_in / 1e9
    if gb > args.huge_gb:
        return min(args.repeats, args.huge_repeats)
    if gb > args.large_gb:
        return min(args.repeats, args.large_repeats)
    return args.repeats


def plan_methods(methods: list[str], n_params: int, itemsize: int, n: int, workdir: Path,
                 have_st: int, have_pt: int) -> tuple[list[str], dict[str, str], bool]:
    """(methods that can run, skipped {method: reason}, whether the safetensors inputs fit on disk).

    Memory: `estimate_peak_bytes` against RAM_FRACTION of MemAvailable now. Disk: the N
    safetensors ingredients, the N `.pt` copies for model_soups_reference, one output, a margin;
    bytes already written count as available.
    """
    skipped: dict[str, str] = {}
    model_bytes = n_params * itemsize
    avail = meminfo_kib()["MemAvailable"] * 1024
    ram_gib = meminfo_kib()["MemTotal"] / 1024**2
    for m in methods:
        why = method_unavailable(m)
        if why:
            skipped[m] = f"not run: {why}"
            continue
        need = estimate_peak_bytes(m, model_bytes, model_bytes, itemsize)
        if need > RAM_FRACTION * avail:
            skipped[m] = (f"out of memory, not run: needs ~{need / GIB:.1f} GiB > {RAM_FRACTION:.0%} of "
                          f"MemAvailable {avail / GIB:.1f} GiB ({ram_gib:.1f} GiB RAM)")
    free = shutil.disk_usage(workdir).free
    need_st = n * model_bytes - have_st + model_bytes + DISK_MARGIN
    st_fits = need_st <= free
    if not st_fits:
        for m in methods:
            skipped.setdefault(m, f"not run: inputs need ~{need_st / 1e9:.0f} GB of disk, "
                                  f"{free / 1e9:.0f} GB free in {workdir}")
    elif "model_soups_reference" in methods and "model_soups_reference" not in skipped:
        need_pt = need_st + n * model_bytes - have_pt
        if need_pt > free:
            skipped["model_soups_reference"] = (
                f"not run: its .pt copies need ~{(n * model_bytes - have_pt) / 1e9:.0f} GB more disk "
                f"than is free ({free / 1e9:.0f} GB free, safetensors inputs need ~{need_st / 1e9:.0f} GB)")
    return [m for m in methods if m not in skipped], skipped, st_fits


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern)) if folder.exists() else 0


def run_config(launcher: Launcher, model: str, depth: int | None, dtype: str, n: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """Measure one (model, dtype, N) config; returns its record (see module docstring)."""
    from vit import DTYPES, convert_to_pt, generate_ingredients, get_config, ingredient_dir, param_count

    cfg = get_config(model, depth)
    tdtype = DTYPES[dtype]
    n_params = param_count(cfg)
    workdir = Path(args.workdir)
    folder = ingredient_dir(workdir, cfg, dtype)
    names = [f"ingredient_{i:02d}" for i in range(n)]
    have_st = sum(folder_bytes(folder, f"{s}.safetensors") for s in names)
    have_pt = sum(folder_bytes(folder, f"{s}.pt") for s in names)
    requested = [m for m in args.methods if m in PEER_METHODS]
    methods, skipped, st_fits = plan_methods(requested, n_params, tdtype.itemsize, n, workdir, have_st, have_pt)
    record: dict[str, Any] = {
        "model": cfg.tag, "dtype": dtype, "n": n, "params": n_params, "methods": requested,
        "skipped": skipped, "loadavg_start": os.getloadavg(),
        "mem_available_gib_start": meminfo_kib()["MemAvailable"] / 1024**2,
        "date_utc_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"\n## {config_key(cfg.tag, dtype, n)}: {n_params:,} parameters; running {methods}; "
          f"skipped {skipped or 'none'}; load {record['loadavg_start']}", flush=True)
    if not st_fits or not methods:
        record.update(runs=[], checks={}, summary={}, repeats=0, page_cache={})
        return record
    t0 = time.perf_counter()
    inputs = generate_ingredients(cfg, dtype, n, workdir)
    pt_inputs = convert_to_pt(inputs) if "model_soups_reference" in methods else []
    record["prepare_s"] = time.perf_counter() - t0
    method_inputs = {m: (pt_inputs if m == "model_soups_reference" else inputs) for m in methods}
    in_bytes = {m: sum(p.stat().st_size for p in method_inputs[m]) for m in methods}
    repeats = repeats_for(max(in_bytes.values()), args)
    page_cache = {m: ("warm (inputs re-read before each run)" if fits_page_cache(method_inputs[m]) else
                      f"partly cold ({in_bytes[m] / 1e9:.1f} GB of inputs > 70% of RAM)") for m in methods}
    runs, checks, failed = run_methods(
        launcher, methods, method_inputs, inputs, cfg, tdtype, workdir, repeats, sk_kwargs={},
        check=not args.no_check, rewarm=True, prefix=f"{config_key(cfg.tag, dtype, n)} ")
    out_bytes = {m: next((r["out_bytes"] for r in runs if r["method"] == m and "out_bytes" in r), 0)
                 for m in methods}
    summary = summarize(runs, {m: in_bytes[m] + out_bytes[m] for m in methods})
    for m in failed:
        err = next((r.get("error", "") for r in runs if r["method"] == m and r["returncode"] != 0), "")
        rc = next((r["returncode"] for r in runs if r["method"] == m and r["returncode"] != 0), None)
        summary[m]["failed"] = f"rc {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"[:300]
    record.update(runs=runs, checks=checks, summary=summary, repeats=repeats, page_cache=page_cache,
                  input_bytes=in_bytes, output_bytes=out_bytes, loadavg_end=os.getloadavg(),
                  date_utc_end=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return record


# ----------------------------------------------------------------------------- rendering
def load_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"configs": {}, "commands": []}


def _time_ratio(rec: dict[str, Any], m: str) -> float | None:
    s, k = rec["summary"].get(m, {}), rec["summary"].get("soupkern", {})
    return s["median_s"] / k["median_s"] if s.get("runs") and k.get("runs") else None


def _cell_status(rec: dict[str, Any], m: str) -> str | None:
    """Why a method has no figures in a config, or None when it has them."""
    if m in rec["skipped"]:
        return rec["skipped"][m]
    s = rec["summary"].get(m)
    if s is None:
        return "not requested"
    if not s.get("runs"):
        return "FAILED " + s.get("failed", "")
    return None


def _cpu_s(rec: dict[str, Any], m: str) -> float | None:
    """Median user + system CPU seconds of the soup call (all threads; imports excluded) over a
    method's successful runs: less disturbed than wall time by other jobs on the cores."""
    t = [r["soup_cpu_s"] for r in rec["runs"] if r["method"] == m and r["returncode"] == 0 and "soup_cpu_s" in r]
    return statistics.median(t) if t else None


def _config_order(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(results["configs"].values(), key=lambda r: (r["params"], r["dtype"], r["n"]))


def render_md(results: dict[str, Any]) -> str:
    from bench_soup import check_cell

    summary_rows, detail_rows = [], []
    for rec in _config_order(results):
        key = config_key(rec["model"], rec["dtype"], rec["n"])
        k = rec["summary"].get("soupkern", {})
        cells = [key, f"{k['median_s']:.2f} s, {k['maxrss_mib']:.0f} / {k['peak_anon_mib']:.0f} MiB"
                 if k.get("runs") else "–"]
        for m in ("io_floor", "naive_safetensors", "model_soups_reference", "mergekit_linear"):
            why = _cell_status(rec, m)
            r = _time_ratio(rec, m)
            if why is not None:
                cells.append("skipped (memory)" if "out of memory" in why else
                             "skipped (disk)" if "disk" in why else
                             "not installed" if "not installed" in why else why[:40])
            else:
                s = rec["summary"][m]
                cells.append(f"{fmt(r, 2)}×, {s['maxrss_mib']:.0f} / {s['peak_anon_mib']:.0f} MiB"
                             + ("" if m == "io_floor" or rec["checks"].get(m, {}).get("ok") else " ✗"))
        summary_rows.append(cells)
        for m in rec["methods"]:
            why = _cell_status(rec, m)
            if why is not None:
                detail_rows.append([key, m, why, "", "", "", "", "", "", ""])
                continue
            s = rec["summary"][m]
            detail_rows.append([
                key, m, f"{s['median_s']:.3f} ({s['min_s']:.3f}–{s['max_s']:.3f}) ×{s['runs']}",
                fmt(_time_ratio(rec, m), 2), fmt(s["gbps"], 2), fmt(_cpu_s(rec, m), 2), f"{s['maxrss_mib']:.0f}",
                f"{s['peak_anon_mib']:.0f}", rec["page_cache"].get(m, ""), check_cell(m, rec["checks"].get(m))])
    load_rows = [[config_key(r["model"], r["dtype"], r["n"]), r.get("date_utc_start", ""),
                  " ".join(f"{x:.2f}" for x in r["loadavg_start"]),
                  " ".join(f"{x:.2f}" for x in r.get("loadavg_end", [])) or "–",
                  f"{r['mem_available_gib_start']:.1f}"] for r in _config_order(results)]
    cmds = "\n".join(f"    {c}" for c in results.get("commands", []))
    prov = results.get("provenance")
    return f"""# Uniform soup, file to file: soupkern vs peers (CPU)

Synthetic timm-shaped ViT ingredients (`benchmarks/vit.py`), uniform soup of N files into one,
each run in a fresh child process, methods interleaved per repeat. Time = median wall time of the
soup call inside the child (imports excluded, reported in the json); ratios are each method's
median time ÷ soupkern's in the same config. RSS = ru_maxrss of the child (includes the
interpreter, torch where imported, and touched mmap'd file pages). ✗ = output fails the check
against round(fp64 mean) (err÷bound > 1). Skipped cells give the reason; nothing is left out
silently. Figures on this shared 2-core machine vary by about ±20% between runs (load averages
below): compare ratios within a config.

Commands that produced these results (each replaces the configs it ran):

{cmds}

## Summary: soupkern's median time; each peer's as a multiple of it; peak RSS / peak anonymous RSS of each

Peak RSS counts touched pages of memory-mapped input files, which the kernel can drop under
pressure; peak anonymous RSS (sampled every 5 ms) is the heap a tool really needs.

{md_table(["config (model/dtype/N)", "soupkern: s, RSS / anon", "io_floor", "naive_safetensors", "model_soups_reference",
           "mergekit_linear"], summary_rows)}

## All figures

Check = max abs error vs fp64 mean / max ulp from round(fp64 mean) / share of elements not
bit-identical to it / err÷bound (bound = 1 ulp at |mean| + (N+1)·2⁻²⁴·mean|x|, the allowance
of an fp32-accumulated mean), on all small tensors plus the first and last block and the head.
CPU s = median user + system CPU time of the soup call, all threads (soupkern uses both cores),
a figure less disturbed than wall time by other jobs on the machine (n/a: not recorded then).

{md_table(["config", "method", "median s (min–max) ×runs", "÷ soupkern", "GB/s", "CPU s", "maxrss MiB",
           "peak anon MiB", "page cache", "check"], detail_rows)}

## Methods

- `soupkern`: `soupkern.uniform_soup(paths, out, overwrite=True)`, streaming over mmap'd inputs.
- `io_floor`: read every input byte once, write one output file of the soup's size; no math.
- `naive_safetensors`: `safetensors.torch.load_file` each ingredient, fp32 accumulation, divide,
  cast back, `save_file`.
- `model_soups_reference`: mlfoundations/model-soups `main.py` style: `torch.load` whole state
  dicts, `v * (1/N) + soup[k]` in the ingredients' dtype, `torch.save` (on cached `.pt` copies).
- `mergekit_linear`: mergekit's `mergekit-pytorch CONFIG OUT` (default options), config
  `merge_method: linear`, each file with `weight: 1.0` (normalized by the weight sum); writes a
  folder of safetensors shards. Its linear merge accumulates in fp32 and casts to the input dtype.

## Load average (1, 5, 15 min) and MemAvailable at each config

{md_table(["config", "start (UTC)", "load at start", "load at end", "MemAvailable GiB"], load_rows)}

## Provenance (last run)
{provenance_md(prov) if prov else "n/a"}
- peers: {json.dumps(results.get("peer_versions", {}))}
"""


METRICS = (("median_s", "wall time (s)"), ("cpu_s", "CPU time of the soup, user + system (s)"),
           ("maxrss_mib", "peak RSS (MiB)"))


def _metric(rec: dict[str, Any], m: str, metric: str) -> float | None:
    s = rec["summary"].get(m, {})
    if not s.get("runs"):
        return None
    return _cpu_s(rec, m) if metric == "cpu_s" else float(s[metric])


def render_plots(results: dict[str, Any], out_dir: Path, n_for_size: int, model_for_n: str) -> list[Path]:
    """Wall time, CPU time and peak RSS against model size (at N=`n_for_size`) and against N (for
    `model_for_n`), one panel per (metric, dtype), one line per method; missing = skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _config_order(results)
    dtypes = sorted({r["dtype"] for r in recs})
    written: list[Path] = []
    if not recs:
        return written
    for name, xkey, select, xlabel in (
            ("size", "params", lambda r: r["n"] == n_for_size, f"parameters (N = {n_for_size})"),
            ("n", "n", lambda r: r["model"] == model_for_n, f"ingredients N ({model_for_n})")):
        fig, axes = plt.subplots(3, len(dtypes), figsize=(5.5 * len(dtypes), 11), squeeze=False)
        for j, dt in enumerate(dtypes):
            sel = [r for r in recs if r["dtype"] == dt and select(r)]
            for i, (metric, label) in enumerate(METRICS):
                ax = axes[i][j]
                for m in PEER_METHODS:
                    pts = [(r[xkey], v) for r in sel if (v := _metric(r, m, metric)) is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=m)
                ax.set_xscale("log", base=10 if xkey == "params" else 2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(label)
                ax.set_title(f"{dt}: {label.split(' (')[0]}")
                ax.grid(True, which="both", alpha=0.3)
                if xkey == "n":
                    ax.set_xticks(sorted({r["n"] for r in sel}) or [2])
                    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                if i == 0 and j == 0 and ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.suptitle("uniform soup, file to file (a missing point = skipped or failed; see peers_cpu.md)")
        fig.tight_layout()
        path = out_dir / f"peers_scaling_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def render(results_dir: Path, n_for_size: int, model_for_n: str) -> None:
    results = load_results(results_dir / f"{RESULT_STEM}.json")
    (results_dir / f"{RESULT_STEM}.md").write_text(render_md(results))
    render_plots(results, results_dir, n_for_size, model_for_n)


def peer_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("mergekit", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma list (default vit_b32,vit_l14,vit_g14; tiny with --smoke)")
    ap.add_argument("--depth", type=int, default=None, help="override the number of blocks (all models)")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16,fp32,fp16 (default bf16,fp32)")
    ap.add_argument("--ns", default=None, help="comma list of ingredient counts (default 2,4,8; 2,3 with --smoke)")
    ap.add_argument("--methods", default=",".join(PEER_METHODS), help=f"comma list from {','.join(PEER_METHODS)}")
    ap.add_argument("--repeats", type=int, default=None, help="runs per method (default 3; 1 with --smoke)")
    ap.add_argument("--large-gb", type=float, default=10.0, help="inputs above this many GB get --large-repeats")
    ap.add_argument("--large-repeats", type=int, default=2)
    ap.add_argument("--huge-gb", type=float, default=20.0, help="inputs above this many GB get --huge-repeats")
    ap.add_argument("--huge-repeats", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/soupkern-bench", help="ingredients, .pt copies and outputs")
    ap.add_argument("--results-dir", default=None,
                    help=f"default {RESULTS_DIR}; <workdir>/results with --smoke")
    ap.add_argument("--cleanup-gb", type=float, default=None,
                    help="after a (model, dtype), delete its ingredient folder if it holds more than this many GB")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--plot-n", type=int, default=None, help="N of the size plot (default 4; 2 with --smoke)")
    ap.add_argument("--plot-model", default=None, help="model of the N plot (default vit_l14; tiny with --smoke)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the md and png from the json")
    ap.add_argument("--smoke", action="store_true", help="tiny model, N=2,3, 1 repeat: checks the harness")
    args = ap.parse_args(argv)
    args.models = (args.models or ("tiny" if args.smoke else "vit_b32,vit_l14,vit_g14")).split(",")
    args.dtypes = (args.dtypes or "bf16,fp32").split(",")
    args.ns = [int(x) for x in (args.ns or ("2,3" if args.smoke else "2,4,8")).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    plot_n = args.plot_n or (2 if args.smoke else 4)
    plot_model = args.plot_model or ("tiny" if args.smoke else "vit_l14")
    results_dir = Path(args.results_dir) if args.results_dir else (
        Path(args.workdir) / "results" if args.smoke else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        render(results_dir, plot_n, plot_model)
        return 0
    bad = [m for m in args.methods if m not in PEER_METHODS] + [n for n in args.ns if n < 2]
    if bad or args.repeats < 1:
        print(f"error: bad methods / N / repeats: {bad}", file=sys.stderr)
        return 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    launcher = Launcher()  # before torch is imported: keeps the children's ru_maxrss unbiased
    try:
        return _run(args, argv, launcher, results_dir, plot_n, plot_model)
    finally:
        launcher.close()


def _run(args: argparse.Namespace, argv: list[str] | None, launcher: Launcher, results_dir: Path,
         plot_n: int, plot_model: str) -> int:
    from vit import get_config, ingredient_dir

    json_path = results_dir / f"{RESULT_STEM}.json"
    cmd = "python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    status = 0
    for model in args.models:
        for dtype in args.dtypes:
            for n in sorted(args.ns):
                rec = run_config(launcher, model, args.depth, dtype, n, args)
                rec["command"] = cmd
                results = load_results(json_path)
                results["configs"][config_key(rec["model"], dtype, n)] = rec
                results["commands"] = list(dict.fromkeys([*results.get("commands", []), cmd]))
                results["provenance"] = provenance()
                results["peer_versions"] = peer_versions()
                tmp = json_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, json_path)
                render(results_dir, plot_n, plot_model)
                print(f"updated {json_path} and {RESULT_STEM}.md / peers_scaling_*.png", flush=True)
                for m, s in rec["summary"].items():
                    if not s.get("runs") or (m in ("soupkern", "naive_safetensors")
                                             and not rec["checks"].get(m, {}).get("ok", True)):
                        status = 1
            folder = ingredient_dir(args.workdir, get_config(model, args.depth), dtype)
            size = sum(p.stat().st_size for p in folder.glob("*")) if folder.exists() else 0
            if args.cleanup_gb is not None and size > args.cleanup_gb * 1e9:
                shutil.rmtree(folder)
                print(f"deleted {folder} ({size / 1e9:.1f} GB)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
