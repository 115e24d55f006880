"""Kernel microbenchmark: `soupkern._native.weighted_sum` against a memory copy and torch.

Measured, for K = 2, 4, 8 inputs of ~256 MiB each (SOUPKERN_BENCH_MIB), inputs BF16 or F32 and
the output in the same dtype, the uniform soup:

- `weighted_sum`: the exact-arithmetic contract (csrc/soupkern.h): weights 1, divisor K, fp64
  accumulation, one IEEE division, one rounding; all cores (threads=0).
- `old_contract` (with `--old-native PATH`, a `_native` extension built from an earlier commit):
  the previous contract in the same run, fp32 accumulation with weights fl(1/K).
- `copy`: `_native.copy` (OpenMP memcpy, all cores) of half the kernel's bytes, so that its
  bytes read + written equal the kernel's: the same-run bandwidth ceiling.
- `torch`: the naive torch way, preallocated buffers, `torch.set_num_threads(<cores>)`:
  F32 `torch.mul(x0, w0, out=out)` then `out.add_(xk, alpha=wk)`; BF16 the same into an fp32
  accumulator (`acc.copy_(x0).mul_(w0)`, `acc.add_(xk, alpha=wk)`, `out.copy_(acc)`), because
  bf16 arithmetic in torch would round every step.
- `numpy copy`: `np.copyto` (one thread) of the same bytes, for reference.
- `read`: `_native.read` of the kernel's K inputs once (no math, no output), all cores: the read
  floor. The kernel reads K of its K+1 streams, and a core reads slower than it copies.

GB/s = (K * in_itemsize + out_itemsize) * n / time for every row (bf16 counts 2 bytes), median
of >= 7 interleaved runs after one warm-up; "fraction" = GB/s / copy GB/s from the same run.
The kernel's output is checked against round(exact mean) (soupkern.reference, exact rational
arithmetic where fp64 cannot decide) on the first 2^18 elements: the share of elements equal.

    python benchmarks/bench_kernel.py              # writes benchmarks/results/kernel_cpu.md/.json
    pytest benchmarks/bench_kernel.py --benchmark-only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

from common import MIB, RESULTS_DIR, SoupkernUnavailable, fmt, import_soupkern, md_table, provenance, provenance_md

SIZE_MIB = int(os.environ.get("SOUPKERN_BENCH_MIB", "256"))
KS = (2, 4, 8)
DTYPES = ("BF16", "F32")
TORCH_DT = {"BF16": torch.bfloat16, "F32": torch.float32}
CHECK_N = 1 << 18


def native_or_none() -> ModuleType | None:
    """`soupkern._native`, or None when it cannot be imported."""
    try:
        return import_soupkern(native=True)
    except SoupkernUnavailable:
        return None


def cores() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0))


@dataclass
class Buffers:
    """K_max inputs and one output of one dtype, as raw uint8 numpy arrays with torch views."""

    dtype: str
    n: int
    raw_in: list[np.ndarray]
    raw_out: np.ndarray
    t_in: list[torch.Tensor]
    t_out: torch.Tensor
    acc: torch.Tensor | None  # fp32 accumulator for the torch baseline of 16-bit dtypes
    raw_old: np.ndarray  # output of the previous contract's kernel (--old-native)

    @property
    def itemsize(self) -> int:
        return TORCH_DT[self.dtype].itemsize

    def bytes_moved(self, k: int) -> int:
        """Bytes read + written by a K-input weighted sum."""
        return (k * self.itemsize + self.itemsize) * self.n


def make_buffers(dtype: str, size_mib: int = SIZE_MIB, kmax: int = max(KS)) -> Buffers:
    """Allocate and fill (so no page fault is timed) kmax inputs and the outputs."""
    tdt = TORCH_DT[dtype]
    n = size_mib * MIB // tdt.itemsize
    g = torch.Generator().manual_seed(0)
    raw_in, t_in = [], []
    for k in range(kmax):
        raw = np.empty(n * tdt.itemsize, dtype=np.uint8)
        t = torch.from_numpy(raw).view(tdt)
        t.normal_(0.0, 0.02 * (1 + k / 16), generator=g)
        raw_in.append(raw)
        t_in.append(t)
    raw_out = np.zeros(n * tdt.itemsize, dtype=np.uint8)
    acc = torch.zeros(n, dtype=torch.float32) if tdt != torch.float32 else None
    return Buffers(dtype, n, raw_in, raw_out, t_in, torch.from_numpy(raw_out).view(tdt), acc,
                   np.zeros(n * tdt.itemsize, dtype=np.uint8))


def make_copy_buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination of `nbytes` for the copy baselines (pre-faulted)."""
    src = np.ones(nbytes, dtype=np.uint8)
    return src, np.zeros(nbytes, dtype=np.uint8)


def weights(k: int) -> list[float]:
    return [1.0 / k] * k


def run_native(native: ModuleType, b: Buffers, k: int) -> None:
    native.weighted_sum(b.raw_out, b.dtype, b.raw_in[:k], [b.dtype] * k, [1.0] * k, b.n, 0, divisor=float(k))


def run_old(old: ModuleType, b: Buffers, k: int) -> None:
    """The previous contract (fp32 accumulation, weights fl(1/K)) into a separate output."""
    old.weighted_sum(b.raw_old, b.dtype, b.raw_in[:k], [b.dtype] * k, weights(k), b.n, 0)


def load_old_native(path: str) -> ModuleType:
    """An `_native` extension built from an earlier commit, loaded beside the current one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("soupkern_old_contract._native", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_copy(native: ModuleType, dst: np.ndarray, src: np.ndarray, nbytes: int) -> None:
    native.copy(dst, src, nbytes, 0)


def run_numpy_copy(dst: np.ndarray, src: np.ndarray, nbytes: int) -> None:
    np.copyto(dst[:nbytes], src[:nbytes])


def run_torch(b: Buffers, k: int) -> None:
    w = weights(k)
    if b.acc is None:
        torch.mul(b.t_in[0], w[0], out=b.t_out)
        for j in range(1, k):
            b.t_out.add_(b.t_in[j], alpha=w[j])
    else:
        b.acc.copy_(b.t_in[0]).mul_(w[0])
        for j in range(1, k):
            b.acc.add_(b.t_in[j], alpha=w[j])
        b.t_out.copy_(b.acc)


def check_exact(raw_out: np.ndarray, b: Buffers, k: int) -> float:
    """Share of the first CHECK_N output elements equal to round(exact mean) (+0 == -0)."""
    from soupkern.reference import decode, round_exact_weighted_sum

    m = min(CHECK_N, b.n)
    size = b.itemsize
    raws = [r[: m * size] for r in b.raw_in[:k]]
    exact, _ = round_exact_weighted_sum(raws, [b.dtype] * k, [1.0] * k, b.dtype, float(k))
    got = raw_out[: m * size]
    bits = np.uint16 if size == 2 else np.uint32
    zero = (decode(got, b.dtype) == 0) & (decode(exact, b.dtype) == 0)
    return float(1.0 - ((got.view(bits) != exact.view(bits)) & ~zero).sum() / m)


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """One warm-up call each, then `repeats` rounds calling every fn once per round."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=SIZE_MIB, help="MiB per input (default 256)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per method (>= 7 for reports)")
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--old-native", help="an _native extension built from an earlier commit: its kernel (the "
                                         "previous fp32-accumulation contract) is timed in the same run")
    args = ap.parse_args(argv)
    old = load_old_native(args.old_native) if args.old_native else None
    ks = [int(k) for k in args.ks.split(",")]
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(cores())
    native = native_or_none()
    if native is None:
        print("warning: soupkern._native is not importable; timing only torch and numpy copy",
              file=sys.stderr)

    max_copy = max((k + 1) * args.size_mib * MIB // 2 for k in ks)
    src, dst = make_copy_buffers(max_copy)
    rows, raw = [], []
    for dtype in dtypes:
        b = make_buffers(dtype, args.size_mib, max(ks))
        for k in ks:
            nb = b.bytes_moved(k)
            half = nb // 2
            fns: dict[str, Callable[[], None]] = {}
            if native is not None:
                fns["weighted_sum"] = lambda: run_native(native, b, k)
                if old is not None:
                    fns["old_contract"] = lambda: run_old(old, b, k)
                fns["copy"] = lambda: run_copy(native, dst, src, half)
                fns["read"] = lambda: native.read(b.raw_in[:k], b.n * b.t_in[0].element_size(), 0)
            fns["torch"] = lambda: run_torch(b, k)
            fns["numpy_copy"] = lambda: run_numpy_copy(dst, src, half)
            times = time_interleaved(fns, args.repeats)
            exact_share, old_share = None, None
            if native is not None:
                run_native(native, b, k)
                exact_share = check_exact(b.raw_out, b, k)
            if old is not None:
                run_old(old, b, k)
                old_share = check_exact(b.raw_old, b, k)
            med = {name: statistics.median(t) for name, t in times.items()}
            gbps = {name: nb / 1e9 / t for name, t in med.items()}
            ref = gbps.get("copy")
            frac = {name: (g / ref if ref else None) for name, g in gbps.items()}
            # the read floor: the same-run time to merely read the kernel's K inputs once
            of_read = med["read"] / med["weighted_sum"] if "read" in med else None
            raw.append({"dtype": dtype, "k": k, "n": b.n, "bytes_moved": nb, "times_s": times,
                        "median_s": med, "gbps": gbps, "fraction_of_copy": frac,
                        "read_time_over_kernel_time": of_read, "share_round_exact_mean": exact_share,
                        "old_contract_share_round_exact_mean": old_share})
            rows.append([f"{dtype}→{dtype}", k, f"{nb / 1e9:.2f}",
                         fmt(gbps.get("weighted_sum"), 1), fmt(frac.get("weighted_sum"), 2),
                         fmt(gbps.get("old_contract"), 1), fmt(frac.get("old_contract"), 2),
                         fmt(of_read, 2), fmt(gbps.get("copy"), 1), fmt(gbps["torch"], 1), fmt(frac.get("torch"), 2),
                         fmt(gbps["numpy_copy"], 1),
                         "n/a" if exact_share is None else f"{100 * exact_share:.4f}%",
                         "n/a" if old_share is None else f"{100 * old_share:.4f}%"])
            print(f"{dtype} K={k}: " + ", ".join(f"{name} {g:.1f} GB/s" for name, g in gbps.items())
                  + (f", exact {exact_share}, old {old_share}"), flush=True)
        del b

    table = md_table(["dtype", "K", "GB moved", "weighted_sum GB/s (exact contract)", "fraction of copy",
                      "old contract GB/s", "old fraction of copy",
                      "read floor time ÷ kernel time", "copy GB/s",
                      "torch GB/s", "torch fraction", "numpy copy (1 thr) GB/s",
                      "= round(exact mean), exact contract", "= round(exact mean), old contract"], rows)
    prov = provenance()
    if native is not None:
        prov["native"] = {"isa": _call(native, "isa"), "max_threads": _call(native, "max_threads")}
    cmd = "python benchmarks/bench_kernel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = f"""# Kernel microbenchmark: weighted_sum vs memory copy and read floor (CPU)

`{cmd}`

- {args.size_mib} MiB per input, the uniform soup (exact contract: weights 1, divisor K; old \
contract: weights fl(1/K), fp32 accumulation), output in the input dtype; median of {args.repeats} \
interleaved runs after a warm-up; all cores ({cores()}) for weighted_sum, copy and torch
- GB/s = (K * in_itemsize + out_itemsize) * n / median time (bf16 = 2 bytes); copy moves the same \
bytes (half read, half written); fraction = GB/s / copy GB/s in the same run
- read floor = `_native.read` of the kernel's K inputs once (no math, no output), same threads; \
"read floor time ÷ kernel time" near 1 means the kernel runs at the speed of merely reading its \
inputs (on this machine a core reads slower than it copies, since a copy's writes proceed in \
parallel with its reads)
- torch = preallocated `mul` + `add_(alpha=)` (fp32 accumulator for BF16); kernel check on the \
first {CHECK_N} elements: share of elements equal to the correctly rounded exact mean
- native: {prov.get('native', 'not importable')}

{table}

## Provenance
{provenance_md(prov)}
"""
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_cpu.md").write_text(md)
    (out / "kernel_cpu.json").write_text(json.dumps({"provenance": prov, "args": vars(args), "results": raw},
                                                    indent=1))
    print("\n" + table + f"\n\nwrote {out / 'kernel_cpu.md'} and .json")
    return 0


def _call(mod: ModuleType, name: str) -> Any:
    f = getattr(mod, name, None)
    try:
        return f() if callable(f) else f
    except Exception as e:  # noqa: BLE001 - provenance only
        return f"error: {e}"


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    _CACHE: dict[Any, Any] = {}

    def _bufs(dtype: str) -> Buffers:
        if dtype not in _CACHE:
            _CACHE[dtype] = make_buffers(dtype)
        return _CACHE[dtype]

    def _copy_bufs() -> tuple[np.ndarray, np.ndarray]:
        if "copy" not in _CACHE:
            _CACHE["copy"] = make_copy_buffers((max(KS) + 1) * SIZE_MIB * MIB // 2)
        return _CACHE["copy"]

    def _native() -> ModuleType:
        native = native_or_none()
        if native is None:
            pytest.skip("soupkern._native is not importable")
        return native

    def _bench(benchmark: Any, fn: Callable[[], None], group: str, nbytes: int) -> None:
        torch.set_num_threads(cores())
        benchmark.group = group
        benchmark.extra_info["bytes_moved"] = nbytes
        benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:
            benchmark.extra_info["GB/s (median)"] = round(nbytes / 1e9 / stats.median, 2)

    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_weighted_sum(benchmark: Any, dtype: str, k: int) -> None:
        native, b = _native(), _bufs(dtype)
        _bench(benchmark, lambda: run_native(native, b, k), f"{dtype} K={k}", b.bytes_moved(k))
        share = check_exact(b.raw_out, b, k)
        if share < 0.99999:
            raise AssertionError(f"weighted_sum {dtype} K={k}: only {share:.6%} of elements equal round(exact mean)")

    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_copy(benchmark: Any, dtype: str, k: int) -> None:
        native, b = _native(), _bufs(dtype)
        src, dst = _copy_bufs()
        nb = b.bytes_moved(k)
        _bench(benchmark, lambda: run_copy(native, dst, src, nb // 2), f"{dtype} K={k}", nb)

    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_read(benchmark: Any, dtype: str, k: int) -> None:
        native, b = _native(), _bufs(dtype)
        nbytes = b.n * b.t_in[0].element_size()
        _bench(benchmark, lambda: native.read(b.raw_in[:k], nbytes, 0), f"{dtype} K={k}", k * nbytes)

    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_torch(benchmark: Any, dtype: str, k: int) -> None:
        b = _bufs(dtype)
        _bench(benchmark, lambda: run_torch(b, k), f"{dtype} K={k}", b.bytes_moved(k))


if __name__ == "__main__":
    sys.exit(main())
