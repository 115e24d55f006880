"""The launch table of the soupkern kernels: one format for the CUDA and the Triton kernels.

For T tensors with K inputs each (R = K + 1 addresses per tensor) launched as B blocks (Triton:
programs of BLOCK elements; CUDA: tiles of 4096 elements), one buffer of 8-byte aligned sections:

    int64  addr[T * R]    row t: tensor t's K input addresses, then its output address
    int64  numel[T]
    int32  block[B][2]    block b: (tensor index, chunk index): elements [chunk * BLOCK,
                          min((chunk + 1) * BLOCK, numel)) of that tensor; an empty tensor has none
    fp64   weight[K]
    uint8  dtype[T * R]   row t: DType codes (soupkern/dtype_codes.py) of the K inputs, then the
                          output's; zero-padded to a multiple of 8 bytes
    fp64   divisor

A block finds its tensor and chunk with one load of the block map, as apex's multi_tensor_apply
and PyTorch's _foreach kernels do (was: a binary search over block prefix sums, dependent loads
before any data load). `build_table` writes it as int64 words for Triton; csrc/cuda/table.cpp's
pack_table writes the same bytes for CUDA (its TableLayout computes the offsets;
tests/test_cuda_build.py checks that the two agree). The greedy ops use it with K = 2 (rows:
running sum, candidate, output; accept's output is the running sum; weights unused). The
single-tensor Triton kernel takes it with T = 1 and no block map (B = 0: program p is chunk p).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import triton
import triton.language as tl

from soupkern.errors import InputError


def fp64_bits(values: Sequence[float]) -> np.ndarray:
    """fp64 values as int64 bit patterns (table entries)."""
    return np.asarray([float(v) for v in values], dtype=np.float64).view(np.int64)


def build_table(rows: Sequence[Sequence[int]], codes: Sequence[Sequence[int]], numels: Sequence[int],
                weights: Sequence[float], divisor: float, block: int | None) -> tuple[np.ndarray, int]:
    """The table of the module docstring as int64 words, and B: rows[t] and codes[t] list tensor
    t's K input addresses / dtype codes, then its output's. block=None: no block map (B = 0)."""
    addr = np.asarray(rows, np.int64).reshape(-1)
    dtype = np.zeros(-(-addr.size // 8) * 8, np.uint8)
    dtype[:addr.size] = np.asarray(codes, np.uint8).reshape(-1)
    sizes = np.asarray(numels, np.int64).reshape(-1)
    blocks = np.zeros(0, np.int64)
    if block is not None:
        chunks = -(-sizes // block)
        if chunks.size and int(chunks.max()) >= 2**31:
            raise InputError(f"a tensor of {int(sizes.max())} elements is 2^31 blocks of {block} or more")
        tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), chunks)
        chunk = np.arange(tensor.size, dtype=np.int64) - np.repeat(np.cumsum(chunks) - chunks, chunks)
        blocks = tensor | (chunk << 32)  # int32 pairs (tensor, chunk), little-endian
    words = np.concatenate([addr, sizes, blocks, fp64_bits(weights), dtype.view(np.int64), fp64_bits([divisor])])
    return words, int(blocks.size)


@triton.jit
def table_sections(table, T, K, B):
    """Pointers to the numel, block map, weight (int64 bits), dtype (uint8) and divisor (int64
    bits) sections of an int64 `table` of T tensors, K inputs each, B blocks."""
    rows = T * (K + 1)
    numels = table + rows
    blocks = numels + T
    weights = blocks + B
    codes = (weights + K).to(tl.pointer_type(tl.uint8), bitcast=True)
    divisor = weights + K + (rows + 7) // 8
    return numels, blocks, weights, codes, divisor


@triton.jit
def block_entry(blocks, pid):
    """(tensor index, chunk index) of block `pid`: one load of the block map."""
    entry = tl.load(blocks + pid)
    return (entry & 0xFFFFFFFF).to(tl.int32), (entry >> 32).to(tl.int32)
