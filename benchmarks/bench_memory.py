"""In-memory uniform soup through the public API against the torch idioms a user would write.

Four state dicts of 8 x 1024^2, 2 x 4096x1024 and 280 x 1024 fp32 tensors (68 MB each in fp32),
in fp32 and in bf16. Methods, all timed in one process, interleaved, median of --repeats:

- `torch idiom`: fp32 `acc = [t.clone() for t in sd0.values()]`, `torch._foreach_add_(acc,
  list(sd.values()))` for the others, `torch._foreach_div_(acc, 4)`; bf16 the same on `t.float()`
  copies, then `.to(torch.bfloat16)` of each.
- `torch idiom, in place`: the same into preallocated fp32 accumulators (`torch._foreach_copy_`)
  and, for bf16, preallocated bf16 outputs (`torch._foreach_copy_(out, acc)`).
- `soupkern`: `soupkern.uniform_state_dict(sds)`, new output tensors.
- `soupkern, out=`: `soupkern.uniform_state_dict(sds, out=outs)`, written in place.

"vs idiom" = the torch idiom's median time / the method's (same dtype, same run); "paired" = the
median over repeats of the idiom's time / the method's in that repeat (run back to back, so
drift in the machine's load and the allocator's state cancels); "exact" = the
share of elements equal to round(fp64 sum / 4), rounded once: the correctly rounded mean wherever
the fp64 sum of the four values is exact (whenever their exponents are within 29 of each other:
every element of these randn tensors but a vanishing few). torch uses all cores.

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory_cpu.md/.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, fmt, import_soupkern, md_table, provenance, provenance_md  # noqa: E402


def state_dicts(torch: Any, k: int, dtype: Any) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        sd = {}
        for i in range(8):
            sd[f"blocks.{i}.weight"] = torch.randn(1024, 1024, generator=g).to(dtype)
        for i in range(2):
            sd[f"mlp.{i}.weight"] = torch.randn(4096, 1024, generator=g).to(dtype)
        for i in range(280):
            sd[f"norm.{i}.bias"] = torch.randn(1024, generator=g).to(dtype)
        out.append(sd)
    return out


def methods(torch: Any, soupkern: Any, sds: list[dict[str, Any]], dtype: Any) -> dict[str, Callable[[], Any]]:
    k = len(sds)
    values = [list(sd.values()) for sd in sds]
    acc_pre = [torch.empty(t.shape, dtype=torch.float32) for t in values[0]]
    out_pre = [torch.empty_like(t) for t in values[0]]
    outs = dict(zip(sds[0], out_pre))

    if dtype == torch.float32:
        def idiom() -> Any:
            acc = [t.clone() for t in values[0]]
            for v in values[1:]:
                torch._foreach_add_(acc, v)
            torch._foreach_div_(acc, k)
            return acc

        def idiom_in_place() -> Any:
            torch._foreach_copy_(acc_pre, values[0])
            for v in values[1:]:
                torch._foreach_add_(acc_pre, v)
            torch._foreach_div_(acc_pre, k)
            return acc_pre
    else:
        def idiom() -> Any:
            acc = [t.float() for t in values[0]]
            for v in values[1:]:
                torch._foreach_add_(acc, [t.float() for t in v])
            torch._foreach_div_(acc, k)
            return [a.to(dtype) for a in acc]

        def idiom_in_place() -> Any:
            torch._foreach_copy_(acc_pre, values[0])
            for v in values[1:]:
                torch._foreach_add_(acc_pre, v)
            torch._foreach_div_(acc_pre, k)
            torch._foreach_copy_(out_pre, acc_pre)
            return out_pre

    return {
        "torch idiom": idiom,
        "torch idiom, in place": idiom_in_place,
        "soupkern": lambda: list(soupkern.uniform_state_dict(sds).values()),  # in sds[0]'s order
        "soupkern, out=": lambda: list(soupkern.uniform_state_dict(sds, out=outs).values()),
    }


def exact_share(torch: Any, sds: list[dict[str, Any]], result: list[Any], dtype: Any) -> float:
    """Share of elements equal to round(fp64 sum / K); `result` in sds[0]'s tensor order."""
    from soupkern.backends.torch_backend import round_f64

    equal = total = 0
    for name, got in zip(sds[0], result):
        mean = sum(sd[name].double() for sd in sds) / len(sds)
        want = round_f64(mean.reshape(-1), dtype)
        equal += int((got.reshape(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
                      == want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)).sum())
        total += want.numel()
    return equal / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS_DIR / "memory_cpu"))
    args = ap.parse_args(argv)
    import torch

    soupkern = import_soupkern()
    torch.set_num_threads(os.cpu_count() or 1)
    rows, records = [], []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sds = state_dicts(torch, args.k, dtype)
        nbytes = sum(t.numel() * t.element_size() for t in sds[0].values())
        ms = methods(torch, soupkern, sds, dtype)
        times: dict[str, list[float]] = {name: [] for name in ms}
        exact = {name: exact_share(torch, sds, fn(), dtype) for name, fn in ms.items()}  # also the warm-up
        for _ in range(args.repeats):
            for name, fn in ms.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["torch idiom"])
        for name, ts in times.items():
            med = statistics.median(ts)
            paired = statistics.median(i / t for i, t in zip(times["torch idiom"], ts))
            moved = nbytes * (args.k + 1)
            rows.append((dname, name, fmt(med * 1e3, 2), fmt(moved / med / 1e9, 2), fmt(base / med, 2),
                         fmt(paired, 2), f"{100 * exact[name]:.4f}%"))
            records.append({"dtype": dname, "method": name, "median_s": med, "gb_per_s": moved / med / 1e9,
                            "vs_idiom": base / med, "paired_vs_idiom": paired, "exact_share": exact[name], "samples": ts,
                            "bytes_per_state_dict": nbytes})
        del sds
    prov = provenance()
    header = ["dtype", "method", "median ms", "GB/s", "vs idiom", "paired", "exact"]
    md = (f"# In-memory uniform soup: {args.k} state dicts (8 x 1024^2, 2 x 4096x1024, 280 x 1024 tensors)\n\n"
          f"`python benchmarks/bench_memory.py --repeats {args.repeats}`; median of {args.repeats} interleaved "
          f"repeats after one warm-up; GB/s counts {args.k} inputs read + 1 output written.\n\n"
          + md_table(header, rows) + "\n\n" + provenance_md(prov) + "\n")
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"provenance": prov, "results": records}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
