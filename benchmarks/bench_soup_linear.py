"""Fused soup-linear vs materialize-then-matmul: S soups of K ingredients through one linear layer.

Y[s] = X · (Σ_k A[s,k] W_k)ᵀ + Σ_k A[s,k] b_k with one input batch X [B, IN] shared by the S soups
(batched soup evaluation), W [K, OUT, IN], b [K, OUT], A [S, K] random (any sign).

Methods (all produce [S, B, OUT] in X's dtype):
- `fused`: `soupkern.kernels.soup_linear.soup_linear` — on CPU its blocked torch path (mixing
  blocks of output rows into a bounded fp32 temporary), on CUDA the Triton kernel (no soup weight
  in memory at all).
- `materialize`: the plain way: W_s = einsum('sk,koi->soi', A, W) in fp32 (S·OUT·IN·4 bytes),
  rounded to X's dtype, then a batched matmul, plus the fp32 bias mix.
- `matmul_floor`: one plain matmul of the same FLOPs with a single given weight (X · W_0ᵀ for each
  soup, as one [B, IN] x [IN, S·OUT] product): what S soups would cost if mixing were free.

Figures: median wall time of `--repeats` interleaved runs after a warm-up (CUDA: synchronized);
TFLOP/s = 2·S·B·OUT·IN / time (the matmul FLOPs only); GB/s = the contract's minimum bytes
(K·OUT·IN·w + B·IN·x + S·B·OUT·y + K·OUT·b + S·K·4) / time; extra memory = the largest temporary
a method allocates beyond inputs and output (from the shapes, not measured); error = max |Y - ref|
over the first soup's first 64 rows against an fp64 reference, divided by max |ref| there.

    python benchmarks/bench_soup_linear.py                  # CPU -> results/soup_linear_cpu.{md,json}
    python benchmarks/bench_soup_linear.py --device cuda    # GPU (Triton) -> results/soup_linear_cuda.*
    python benchmarks/bench_soup_linear.py --smoke --results-dir /tmp/x

Without a CUDA device, `--device cuda` writes a result file saying the GPU figures are unmeasured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import MIB, RESULTS_DIR, fmt, import_soupkern, md_table, provenance, provenance_md

import torch  # noqa: E402  (after common: it sets up the import path for soupkern)

TORCH_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_DEFAULT = {"b": 256, "n_in": 1024, "n_out": 1024, "k": 8, "soups": "1,4,8,16", "dtypes": "fp32,bf16"}
CUDA_DEFAULT = {"b": 2048, "n_in": 4096, "n_out": 4096, "k": 8, "soups": "1,4,8,16", "dtypes": "bf16,fp16,fp32"}
SMOKE = {"b": 8, "n_in": 24, "n_out": 20, "k": 3, "soups": "1,2", "dtypes": "fp32"}


def materialize(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    ws = torch.einsum("sk,koi->soi", a, w.to(torch.float32)).to(x.dtype)  # S soup weights in memory
    y = torch.matmul(x, ws.transpose(1, 2))
    return (y.to(torch.float32) + (a @ b.to(torch.float32))[:, None, :]).to(x.dtype)


def torch_path_workspace(s: int, k: int, b: int, n_out: int, n_in: int, isz: int,
                         budget: int = 64 * MIB) -> int:
    """Temporaries of soup_linear_torch (its default budget): fp32 soup block + its product with X,
    plus fp32 copies of the ingredient block and of X when the inputs are not fp32."""
    rows = min(n_out, max(1, budget // (((k + s) * n_in + s * b) * 4)))
    extra = (s * rows * n_in + s * b * rows) * 4
    if isz != 4:
        extra += k * rows * n_in * 4 + b * n_in * 4 + s * rows * n_in * isz
    return extra


def fmt_load(load: tuple[float, ...]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[float]]:
    for f in fns.values():
        f()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def rel_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    rows = min(64, x.shape[0])
    a64 = a[:1].double()
    ref = x[:rows].double() @ torch.einsum("sk,koi->soi", a64, w.double())[0].T + (a64 @ b.double())[0]
    return float((y[0, :rows].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def run(args: argparse.Namespace) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    sk = import_soupkern()
    from soupkern.kernels.soup_linear import soup_linear

    del sk
    g = torch.Generator().manual_seed(0)
    rows: list[list[Any]] = []
    raw: list[dict[str, Any]] = []
    for dname in args.dtypes.split(","):
        dt = TORCH_DT[dname]
        x = torch.randn(args.b, args.n_in, generator=g).to(dt).to(args.device)
        w = (torch.randn(args.k, args.n_out, args.n_in, generator=g) / args.n_in**0.5).to(dt).to(args.device)
        bias = torch.randn(args.k, args.n_out, generator=g).to(dt).to(args.device)
        w0t = w[0].T.contiguous()
        for s in (int(v) for v in args.soups.split(",")):
            a = torch.randn(s, args.k, generator=g).to(args.device)
            wide = w0t.repeat(1, s)  # [IN, S*OUT]: the same FLOPs as S soups, one weight
            fns: dict[str, Callable[[], Any]] = {
                "fused": lambda: soup_linear(x, w, bias, a),
                "materialize": lambda: materialize(x, w, bias, a),
                "matmul_floor": lambda: x @ wide,
            }
            times = time_interleaved(fns, args.repeats, args.device)
            med = {n: statistics.median(t) for n, t in times.items()}
            isz = x.element_size()
            flops = 2 * s * args.b * args.n_out * args.n_in
            min_bytes = (args.k * args.n_out * args.n_in * isz + args.b * args.n_in * isz + s * args.b * args.n_out * isz
                         + args.k * args.n_out * isz + s * args.k * 4)
            extra = {"fused": 0 if args.device == "cuda" else torch_path_workspace(s, args.k, args.b, args.n_out, args.n_in, isz),
                     "materialize": s * args.n_out * args.n_in * (4 + isz), "matmul_floor": args.n_in * s * args.n_out * isz}
            err = {"fused": rel_error(soup_linear(x, w, bias, a), x, w, bias, a),
                   "materialize": rel_error(materialize(x, w, bias, a), x, w, bias, a)}
            entry = {"dtype": dname, "S": s, "K": args.k, "B": args.b, "IN": args.n_in, "OUT": args.n_out,
                     "times_s": times, "median_s": med, "tflops": {n: flops / t / 1e12 for n, t in med.items()},
                     "gbps_min_bytes": {n: min_bytes / t / 1e9 for n, t in med.items() if n != "matmul_floor"},
                     "extra_bytes": extra, "rel_error": err}
            raw.append(entry)
            rows.append([dname, s, fmt(med["fused"] * 1e3, 2), fmt(med["materialize"] * 1e3, 2),
                         fmt(med["materialize"] / med["fused"], 2), fmt(med["matmul_floor"] * 1e3, 2),
                         fmt(med["matmul_floor"] / med["fused"], 2), fmt(entry["tflops"]["fused"], 3),
                         fmt(entry["gbps_min_bytes"]["fused"], 1),
                         f"{extra['fused'] / MIB:.1f} / {extra['materialize'] / MIB:.1f}",
                         f"{err['fused']:.1e} / {err['materialize']:.1e}"])
            print(f"{dname} S={s}: fused {med['fused'] * 1e3:.2f} ms, materialize {med['materialize'] * 1e3:.2f} ms, "
                  f"floor {med['matmul_floor'] * 1e3:.2f} ms", flush=True)
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--b", type=int, help="rows of the input batch")
    ap.add_argument("--n-in", type=int)
    ap.add_argument("--n-out", type=int)
    ap.add_argument("--k", type=int, help="ingredients")
    ap.add_argument("--soups", help="comma-separated S values")
    ap.add_argument("--dtypes", help="comma-separated: fp32, fp16, bf16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats (checks the harness)")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    defaults = SMOKE if args.smoke else (CUDA_DEFAULT if args.device == "cuda" else CPU_DEFAULT)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.repeats = 2
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"soup_linear_{args.device}"
    cmd = "python benchmarks/bench_soup_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])
    prov = provenance()
    if args.device == "cuda":
        prov["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        try:
            import triton

            prov["triton"] = triton.__version__
        except ImportError:
            prov["triton"] = None
    if args.device == "cuda" and not torch.cuda.is_available():
        note = "unmeasured: no CUDA device on this machine (torch.cuda.is_available() is False)"
        (out / f"{name}.md").write_text(f"# Fused soup-linear on GPU (Triton)\n\n`{cmd}`\n\nGPU figures: {note}.\n\n"
                                        f"## Provenance\n{provenance_md(prov)}\n")
        (out / f"{name}.json").write_text(json.dumps({"provenance": prov, "args": vars(args), "measured": False,
                                                      "note": note, "results": []}, indent=1))
        print(f"{note}; wrote {out / name}.md and .json")
        return 0
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    load_before = os.getloadavg()
    rows, raw = run(args)
    prov["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
    table = md_table(["dtype", "S", "fused ms", "materialize ms", "materialize ÷ fused", "matmul floor ms",
                      "floor ÷ fused", "fused TFLOP/s", "fused GB/s (min bytes)", "extra MiB fused / materialize",
                      "rel. error fused / materialize"], rows)
    path = "Triton kernel" if args.device == "cuda" else "blocked torch path"
    md = f"""# Fused soup-linear vs materialize-then-matmul ({args.device}, fused = {path})

`{cmd}`

- shared input X [{args.b}, {args.n_in}], K = {args.k} ingredients W [{args.k}, {args.n_out}, {args.n_in}] + bias, \
S soups with random coefficients; output [S, {args.b}, {args.n_out}] in the input dtype
- median of {args.repeats} interleaved runs after a warm-up{' (synchronized)' if args.device == 'cuda' else ''}; \
"÷" columns are time ratios (> 1: fused is faster); matmul floor = one plain matmul with the same FLOPs and one weight
- TFLOP/s counts the matmul FLOPs 2·S·B·OUT·IN; GB/s counts the contract's minimum bytes (each input once, output once)
- extra MiB: temporaries beyond inputs and output, from the shapes; rel. error: max |Y - fp64 ref| / max |ref| \
on the first soup's first 64 rows
- machine load average (1/5/15 min) before / after: {fmt_load(load_before)} / {fmt_load(prov["loadavg_1_5_15"]["after"])} \
(other processes share the cores: compare the ratios within this table, not absolute times across runs)
- GPU figures: {'this run' if args.device == 'cuda' else 'not in this file (run with --device cuda on a GPU machine)'}

{table}

## Provenance
{provenance_md(prov)}
"""
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({"provenance": prov, "args": vars(args), "measured": True,
                                                  "results": raw}, indent=1))
    print("\n" + table + f"\n\nwrote {out / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
