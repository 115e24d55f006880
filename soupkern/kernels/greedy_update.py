"""Triton fused updates of the greedy soup recipe, multi-tensor (one launch per dtype group).

The greedy recipe keeps an fp64 running sum ``s`` of the n ingredients accepted so far (the
uniform contract's accumulator, csrc/soupkern.h) and tries each next ingredient x:

greedy_candidate(outs, sums, xs, n):
    outs[t] = round((sums[t] + float64(xs[t])) / (n + 1))
    one fp64 add, one IEEE fp64 division (``div.rn.f64``), one rounding to outs[t]'s dtype
    (nearest even; fp16/bf16 through round-to-odd fp32 as in weighted_sum.py): exactly the
    uniform soup of the n + 1 ingredients. Bytes moved: numel · (8 + itemsize(x) + itemsize(out)).
greedy_accept(sums, xs):
    sums[t] = sums[t] + float64(xs[t]), in place. Bytes moved: numel · (16 + itemsize(x)).

Each is one pass over memory: the candidate soup is written straight in the model's dtype from
the running sum, with no temporary. Tensors are laid out in one launch as in
multi_weighted_sum.py (soupkern/kernels/table.py's format with K = 2: rows sum, x, out, where
accept's out is the sum; the divisor n + 1 or 1; one block-map load from program to tensor;
full blocks unmasked for 16-byte vector accesses); tensors are grouped by (x dtype, out dtype).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from soupkern.errors import InputError
from soupkern.kernels.multi_weighted_sum import launch_groups
from soupkern.kernels.table import block_entry, build_table, table_sections
from soupkern.kernels.table_cache import device_table
from soupkern.kernels.weighted_sum import (
    F64, GPU_WARPS, TORCH_CODES, all_aligned, check_block, check_device, check_tensor, load_f64,
    store_rounded, typed_pointer)


@triton.jit
def _greedy_block(s_addr, x_addr, out_addr, denom, start, n, X_CODE: tl.constexpr, OUT_CODE: tl.constexpr,
                  ACCEPT: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    s_ptrs = typed_pointer(s_addr, F64, ALIGNED) + start + offs
    total = load_f64(s_ptrs, mask, MASKED) + load_f64(typed_pointer(x_addr, X_CODE, ALIGNED) + start + offs, mask, MASKED)
    if ACCEPT:
        store_rounded(s_ptrs, total, mask, MASKED)
    else:
        store_rounded(typed_pointer(out_addr, OUT_CODE, ALIGNED) + start + offs, total / denom, mask, MASKED)


@triton.jit
def _greedy_kernel(table, T, X_CODE: tl.constexpr, OUT_CODE: tl.constexpr, ACCEPT: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # table.py's format, K = 2: rows [sum, x, out] (accept: out = sum); divisor n + 1 (candidate)
    pid = tl.program_id(0)
    numels, blocks, _, _, divisor = table_sections(table, T, 2, tl.num_programs(0))
    t, chunk = block_entry(blocks, pid)
    denom = tl.load(divisor).to(tl.float64, bitcast=True)
    start = chunk.to(tl.int64) * BLOCK
    n = tl.load(numels + t)
    row = table + t * 3
    out_addr = tl.load(row + 2)
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
    device = _check_sum(sums[0], "sums[0]", None).device
    check_device(device)
    block = check_block(block)
    keys = []
    for t, (s, x) in enumerate(zip(sums, xs)):
        _check_sum(s, f"sums[{t}]", device)
        check_tensor(x, f"xs[{t}]", device, s.numel())
        if outs is not None:
            check_tensor(outs[t], f"outs[{t}]", device, s.numel())
        keys.append((TORCH_CODES[x.dtype], F64.value if outs is None else TORCH_CODES[outs[t].dtype]))
    for (x_code, out_code), members in launch_groups(keys, [s.numel() for s in sums]):
        rows = [[sums[t].data_ptr(), xs[t].data_ptr(), (sums[t] if outs is None else outs[t]).data_ptr()]
                for t in members]
        host, programs = build_table(rows, [[F64.value, x_code, out_code]] * len(members),
                                     [sums[t].numel() for t in members], [1.0, 1.0], denom, block)
        tensors = [sums[t] for t in members] + [xs[t] for t in members] + ([] if outs is None else [outs[t] for t in members])
        _greedy_kernel[(programs,)](device_table(host, device), len(members), X_CODE=x_code, OUT_CODE=out_code,
                                    ACCEPT=outs is None, ALIGNED=all_aligned(tensors), BLOCK=block, num_warps=num_warps)


def _check_sum(s: object, what: str, device: torch.device | None) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float64:
        raise InputError(f"{what}: the running sum must be a float64 tensor, got {getattr(s, 'dtype', type(s).__name__)}")
    if not s.is_contiguous():
        raise InputError(f"{what}: not contiguous")
    if device is not None and s.device != device:
        raise InputError(f"{what}: on {s.device}, expected {device}")
    return s


def greedy_candidate(outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], n: int,
                     *, block: int | None = None, num_warps: int = GPU_WARPS) -> None:
    """outs[t] = round((sums[t] + xs[t]) / (n + 1)) (module contract). sums: fp64; xs, outs:
    fp32/fp16/bf16; all contiguous on one device, matching numels per t; n >= 0."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n + 1 > 2**53:
        raise InputError(f"greedy_candidate: n = {n!r} ingredients; need an int with 0 <= n and n + 1 <= 2^53 (exact in fp64)")
    _launch(sums, xs, outs, float(n + 1), block, num_warps)


def greedy_accept(sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], *, block: int | None = None,
                  num_warps: int = GPU_WARPS) -> None:
    """sums[t] += xs[t] in fp64, in place (module contract)."""
    _launch(sums, xs, None, 1.0, block, num_warps)


def bytes_moved(numel: int, x_itemsize: int, out_itemsize: int | None) -> int:
    """Bytes read and written: greedy_candidate (out_itemsize given) or greedy_accept (None)."""
    return numel * (8 + x_itemsize + out_itemsize) if out_itemsize is not None else numel * (16 + x_itemsize)
