"""Triton weighted sum over many tensors in one launch (multi-tensor form of weighted_sum.py).

Contract: for every tensor t, ``outs[t] = round((Σ_k w_k · inputs[t][k]) / d)`` exactly as
weighted_sum.py (fp64 accumulation, acc = w_0·x_0 then fma(w_k, x_k, acc) in order, fp64
weights, one IEEE division when d != 1, one round-to-nearest-even to outs[t]'s dtype). Bytes moved: Σ_t numel_t · (Σ_k itemsize(x_tk) +
itemsize(out_t)).

Why: a checkpoint is hundreds of tensors (ViT-G/14: 584), most of them biases and norms of a
few thousand elements; one launch per tensor would be dominated by launch overhead.

Table: soupkern/kernels/table.py's format (shared with the CUDA kernels), one int64 tensor on
the device per launch, built on the host. The grid is one program per BLOCK of every tensor
(Σ_t cdiv(numel_t, BLOCK) programs); program p reads its (tensor, chunk) from the table's block
map with one load (no search), then runs weighted_sum.py's block body: full blocks unmasked
with 16-byte vectors, the tensor's last block masked. Tensors with no elements are left out of
the table.

One launch per group: all tensors of a launch share the output dtype and the list of input
dtypes over k (a compile-time code when uniform, per-k codes in the table when mixed); a
checkpoint whose tensors differ in dtype is launched once per (input dtypes, output dtype) group.
"""

from __future__ import annotations

from typing import Hashable, Iterator, Sequence, TypeVar

import torch
import triton
import triton.language as tl

from soupkern.errors import InputError
from soupkern.kernels.table import block_entry, build_table, table_sections
from soupkern.kernels.table_cache import device_table
from soupkern.kernels.weighted_sum import (
    TORCH_CODES, all_aligned, check_block, check_device, check_divisor, check_tensor, input_code,
    launch_settings, weighted_sum_block)


@triton.jit
def _multi_weighted_sum_kernel(table, T, K, IN_CODE: tl.constexpr, OUT_CODE: tl.constexpr,
                               DIVIDE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    numels, blocks, weights, codes, divisor = table_sections(table, T, K, tl.num_programs(0))
    t, chunk = block_entry(blocks, pid)
    row = t * (K + 1)
    weighted_sum_block(table + row, weights, codes + row, K, divisor, tl.load(table + row + K),
                       chunk.to(tl.int64) * BLOCK, tl.load(numels + t), IN_CODE, OUT_CODE, DIVIDE, ALIGNED, BLOCK)


KeyT = TypeVar("KeyT", bound=Hashable)


def launch_groups(keys: Sequence[KeyT], numels: Sequence[int]) -> Iterator[tuple[KeyT, list[int]]]:
    """(key, indices of the tensors with that key), one per launch: groups in order of first
    appearance, tensors with no elements left out, groups left empty skipped."""
    groups: dict[KeyT, list[int]] = {}
    for i, key in enumerate(keys):
        if numels[i] > 0:
            groups.setdefault(key, []).append(i)
    yield from groups.items()


def multi_weighted_sum(outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                       weights: Sequence[float], divisor: float = 1.0, *, block: int | None = None,
                       num_warps: int | None = None) -> None:
    """outs[t] = round((Σ_k weights[k] · inputs[t][k]) / divisor) for every t, one launch per dtype group.

    inputs[t] lists tensor t of each of the K ingredients (same K and weights for every t);
    every tensor contiguous fp32/fp16/bf16 on one device, inputs[t][k] with outs[t]'s numel.
    """
    if len(outs) != len(inputs):
        raise InputError(f"{len(outs)} outputs but {len(inputs)} input lists")
    d = check_divisor(divisor)
    if not outs:
        return
    k = len(weights)
    if k < 1:
        raise InputError("multi_weighted_sum needs at least one input per tensor")
    device = check_tensor(outs[0], "outs[0]").device
    check_device(device)
    if block is not None:
        check_block(block)
    keys = []
    for t, (out, xs) in enumerate(zip(outs, inputs)):
        check_tensor(out, f"outs[{t}]", device)
        if len(xs) != k:
            raise InputError(f"inputs[{t}]: {len(xs)} tensors but {k} weights")
        for i, x in enumerate(xs):
            check_tensor(x, f"inputs[{t}][{i}]", device, out.numel())
        keys.append((tuple(TORCH_CODES[x.dtype] for x in xs), TORCH_CODES[out.dtype]))
    for (codes, out_code), members in launch_groups(keys, [out.numel() for out in outs]):
        group_block, warps = launch_settings(device, input_code(codes), out_code, block, num_warps)
        rows = [[x.data_ptr() for x in inputs[t]] + [outs[t].data_ptr()] for t in members]
        host, programs = build_table(rows, [[*codes, out_code]] * len(members), [outs[t].numel() for t in members],
                                     weights, d, group_block)
        tensors = [x for t in members for x in (*inputs[t], outs[t])]
        _multi_weighted_sum_kernel[(programs,)](
            device_table(host, device), len(members), k, IN_CODE=input_code(codes), OUT_CODE=out_code,
            DIVIDE=d != 1.0, ALIGNED=all_aligned(tensors), BLOCK=group_block, num_warps=warps)


def bytes_moved(numels: Sequence[int], in_itemsizes: Sequence[int], out_itemsize: int) -> int:
    """Bytes read and written by multi_weighted_sum over tensors of `numels` elements."""
    return sum(numels) * (sum(in_itemsizes) + out_itemsize)
