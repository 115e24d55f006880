"""Triton fused updates of the greedy soup recipe, multi-tensor (one launch per dtype group).

The greedy recipe keeps an fp32 running sum ``s`` of the n ingredients accepted so far and tries
each next ingredient x:

greedy_candidate(outs, sums, xs, n):
    outs[t] = round((sums[t] + float(xs[t])) / (n + 1))
    one fp32 add, one IEEE fp32 division (``tl.math.div_rn`` -> ``div.rn.f32``), one rounding to
    outs[t]'s dtype (nearest even; bf16 as in weighted_sum.py). Bit-identical to the torch
    expression ``((s + x.float()) / (n + 1)).to(dtype)``. Triton's plain ``/`` on fp32 lowers to
    the approximate ``div.full.f32`` (up to 2 ulp off; seen in the PTX of an offline sm_90
    compile with triton 3.7), which is why it is not used here.
    Bytes moved: numel · (4 + itemsize(x) + itemsize(out)).
greedy_accept(sums, xs):
    sums[t] = sums[t] + float(xs[t]) in fp32, in place. Bytes moved: numel · (8 + itemsize(x)).

Each is one pass over memory: the candidate soup is written straight in the model's dtype from
the running sum, with no fp32 temporary. Tensors are laid out in one launch as in
multi_weighted_sum.py (table rows: sum, x[, out] addresses; binary search from program to
tensor; full blocks unmasked for 16-byte vector accesses); tensors are grouped by (x dtype,
out dtype).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from soupkern.errors import InputError
from soupkern.kernels.multi_weighted_sum import build_table, launch_groups, locate
from soupkern.kernels.weighted_sum import (
    DTYPE_CODES, F32, GPU_WARPS, all_aligned, check_block, check_device, check_tensor, device_table, load_f32,
    store_rounded, typed_pointer)


@triton.jit
def _greedy_block(s_addr, x_addr, out_addr, denom, start, n, X_CODE: tl.constexpr, OUT_CODE: tl.constexpr,
                  ACCEPT: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    s_ptrs = typed_pointer(s_addr, F32, ALIGNED) + start + offs
    total = load_f32(s_ptrs, mask, MASKED) + load_f32(typed_pointer(x_addr, X_CODE, ALIGNED) + start + offs, mask, MASKED)
    if ACCEPT:
        store_rounded(s_ptrs, total, mask, MASKED)
    else:
        store_rounded(typed_pointer(out_addr, OUT_CODE, ALIGNED) + start + offs, tl.math.div_rn(total, denom),
                      mask, MASKED)


@triton.jit
def _greedy_kernel(table, T, denom, X_CODE: tl.constexpr, OUT_CODE: tl.constexpr, ACCEPT: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # table rows: [sum, x] (accept) or [sum, x, out] (candidate) addresses
    R: tl.constexpr = 2 if ACCEPT else 3
    pid = tl.program_id(0)
    t, first = locate(table, T, R, pid)
    start = (pid - first).to(tl.int64) * BLOCK
    n = tl.load(table + T * R + t)
    row = table + t * R
    out_addr = tl.load(row) if ACCEPT else tl.load(row + 2)
    if start + BLOCK <= n:
        _greedy_block(tl.load(row), tl.load(row + 1), out_addr, denom, start, n, X_CODE, OUT_CODE, ACCEPT,
                      False, ALIGNED, BLOCK)
    else:
        _greedy_block(tl.load(row), tl.load(row + 1), out_addr, denom, start, n, X_CODE, OUT_CODE, ACCEPT,
                      True, ALIGNED, BLOCK)


def _launch(sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor] | None,
            denom: float, block: int | None, num_warps: int) -> None:
    what = "greedy_accept" if outs is None else "greedy_candidate"
    if len(sums) != len(xs) or (outs is not None and len(outs) != len(sums)):
        counts = f"{len(sums)} sums, {len(xs)} xs" + ("" if outs is None else f", {len(outs)} outs")
        raise InputError(f"{what}: {counts}: one of each per tensor")
    if not sums:
        return
    device = check_tensor(sums[0], "sums[0]").device
    check_device(device)
    block = check_block(block)
    keys = []
    for t, (s, x) in enumerate(zip(sums, xs)):
        check_tensor(s, f"sums[{t}]", device)
        if s.dtype != torch.float32:
            raise InputError(f"sums[{t}]: the running sum must be float32, got {s.dtype}")
        check_tensor(x, f"xs[{t}]", device, s.numel())
        if outs is not None:
            check_tensor(outs[t], f"outs[{t}]", device, s.numel())
        keys.append((DTYPE_CODES[x.dtype], DTYPE_CODES[torch.float32 if outs is None else outs[t].dtype]))
    for (x_code, out_code), members in launch_groups(keys, [s.numel() for s in sums]):
        rows = [[sums[t].data_ptr(), xs[t].data_ptr()] + ([] if outs is None else [outs[t].data_ptr()])
                for t in members]
        host, programs = build_table(rows, [sums[t].numel() for t in members], block)
        tensors = [sums[t] for t in members] + [xs[t] for t in members] + ([] if outs is None else [outs[t] for t in members])
        _greedy_kernel[(programs,)](device_table(host, device), len(members), denom, X_CODE=x_code, OUT_CODE=out_code,
                                    ACCEPT=outs is None, ALIGNED=all_aligned(tensors), BLOCK=block, num_warps=num_warps)


def greedy_candidate(outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], n: int,
                     *, block: int | None = None, num_warps: int = GPU_WARPS) -> None:
    """outs[t] = round((sums[t] + xs[t]) / (n + 1)) (module contract). sums: fp32; xs, outs:
    fp32/fp16/bf16; all contiguous on one device, matching numels per t; n >= 0."""
    if n < 0 or n + 1 > 2**24:
        raise InputError(f"greedy_candidate: n = {n} ingredients; need 0 <= n < 2^24 (n + 1 exact in fp32)")
    _launch(sums, xs, outs, float(n + 1), block, num_warps)


def greedy_accept(sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], *, block: int | None = None,
                  num_warps: int = GPU_WARPS) -> None:
    """sums[t] += xs[t] in fp32, in place (module contract)."""
    _launch(sums, xs, None, 1.0, block, num_warps)


def bytes_moved(numel: int, x_itemsize: int, out_itemsize: int | None) -> int:
    """Bytes read and written: greedy_candidate (out_itemsize given) or greedy_accept (None)."""
    return numel * (4 + x_itemsize + out_itemsize) if out_itemsize is not None else numel * (8 + x_itemsize)
