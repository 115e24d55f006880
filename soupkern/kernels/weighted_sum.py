"""Triton weighted sum of K tensors: ``out = round((Σ_k w_k · x_k) / d)`` (the exact-arithmetic
contract of csrc/soupkern.h).

Math, in this order for every element i:

    acc = w_0 * x_0[i]                          (fp64 multiply, fp64 weights)
    acc = fma(w_k, x_k[i], acc)   k = 1..K-1    (fp64 fused multiply-add, one rounding)
    acc = acc / d                               (one IEEE fp64 division; skipped when d == 1)
    out[i] = round(acc)                         (once, to out's dtype, to nearest even)

- Inputs: fp32, fp16 or bf16, any mix across k; decoded exactly to fp64.
- Output: fp32 (``cvt.rn.f32.f64``), or fp16/bf16 through fp32 rounded to odd (truncate toward
  zero, set the last bit when inexact), which makes the second rounding the correct single
  rounding of the fp64 value: fp16 by the hardware conversion, bf16 by integer rounding of the
  fp32 bits, ``(u + 0x7fff + lsb) >> 16``, NaN kept NaN as ``(u >> 16) | 0x40``: the same bits as
  the C++ kernel (the integer form also makes the Triton interpreter, whose fp32 -> bf16 cast
  truncates, produce correct bits).
- Bytes moved: Σ_k numel · itemsize(x_k) + numel · itemsize(out), each byte once.
- Bit-identical to the C++ kernel (NaN payloads aside: NaN stays NaN): ``tl.fma`` on fp64 lowers
  to ``fma.rn.f64``, fp64 ``/`` to ``div.rn.f64``. The Triton interpreter may emulate ``tl.fma`` as
  ``x * y + z`` in numpy (two roundings); with weights of 1 (the uniform soup) the product is
  exact and so is the emulation; tests/test_triton.py handles the rest.

How the K inputs reach the kernel: a small table on the device (soupkern/kernels/table.py's
format with one tensor and no block map) holds the K input addresses and the output's, the
element count, the K fp64 weights (as bit patterns), the dtype codes and the divisor; the kernel
loops over k at run time. One compiled kernel therefore serves every K (up to the 72 ingredients
of a sweep) and every mix of input dtypes: a uniform mix is a compile-time constant (no branch);
a mixed one is read from the table per k (a uniform branch, negligible next to the loads). A
tuple of tensors with ``tl.static_range`` would recompile for every K and dtype mix; a stacked
[K, n] tensor would need a copy of every input.

Vector loads: addresses loaded from memory carry no alignment facts, so when every address is
16-byte aligned the launcher says so (``ALIGNED``) and the kernel marks the typed pointers with
``tl.multiple_of(p, 16)``; full blocks are loaded without a mask, only a tensor's last block is
masked (a runtime mask on an arbitrary n would otherwise keep every access scalar). With both,
loads and stores compile to 16-byte ``ld/st.global.v4`` (checked in the PTX). Unaligned views
(a slice of a byte buffer at an odd offset) take the same kernel with scalar accesses.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from soupkern import dtype_codes
from soupkern.errors import InputError
from soupkern.kernels.table import build_table, table_sections
from soupkern.kernels.table_cache import device_table
from soupkern.options import check_divisor  # noqa: F401  (re-exported to multi_weighted_sum)

# dtype codes (soupkern/dtype_codes.py: csrc/soupkern.h's DType), as compile-time constants
F64 = tl.constexpr(dtype_codes.F64)  # the greedy kernels' running sums only
F32 = tl.constexpr(dtype_codes.F32)
F16 = tl.constexpr(dtype_codes.F16)
BF16 = tl.constexpr(dtype_codes.BF16)
MIXED = tl.constexpr(-1)  # not a DType: input dtypes differ across k, each code is read from the table
TORCH_CODES: dict[torch.dtype, int] = {
    torch.float32: dtype_codes.F32, torch.float16: dtype_codes.F16, torch.bfloat16: dtype_codes.BF16}

GPU_BLOCK = 2048  # elements per program on a GPU: 16 per thread at 4 warps (4-8 x 16-byte loads)
GPU_WARPS = 4
INTERPRETER_BLOCK = 65536  # the interpreter pays per program, not per element


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def default_block() -> int:
    return INTERPRETER_BLOCK if interpreted() else GPU_BLOCK


# ---------------------------------------------------------------------------------------------
# building blocks, shared with multi_weighted_sum.py and greedy_update.py


@triton.jit
def typed_pointer(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """int64 address -> pointer to the dtype of CODE (16-byte aligned when ALIGNED)."""
    if CODE == F32:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == F64:
        p = addr.to(tl.pointer_type(tl.float64))
    elif CODE == F16:
        p = addr.to(tl.pointer_type(tl.float16))
    else:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load_f64(ptrs, mask, MASKED: tl.constexpr):
    """Load and decode exactly to fp64 (16-bit floats through fp32, which holds them exactly)."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if ptrs.dtype.element_ty != tl.float64:
        x = x.to(tl.float32)
    return x.to(tl.float64)


@triton.jit
def load_input_f64(addr, code, start, offs, mask, CODE: tl.constexpr, MASKED: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """Elements [start + offs] of the input at `addr` as fp64 (exact). CODE == MIXED: the dtype
    is the runtime `code`, otherwise the compile-time CODE."""
    if CODE == MIXED:
        if code == F32:
            x = load_f64(typed_pointer(addr, F32, ALIGNED) + start + offs, mask, MASKED)
        elif code == F16:
            x = load_f64(typed_pointer(addr, F16, ALIGNED) + start + offs, mask, MASKED)
        else:
            x = load_f64(typed_pointer(addr, BF16, ALIGNED) + start + offs, mask, MASKED)
    else:
        x = load_f64(typed_pointer(addr, CODE, ALIGNED) + start + offs, mask, MASKED)
    return x


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, NaN stays NaN (quiet, payload kept): bit-identical
    to the C++ kernel's f32_to_bf16."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = tl.where(nan, (u >> 16) | 0x40, rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to_odd_f32(acc):
    """fp64 -> fp32 rounded to odd: truncate toward zero, then set the last bit if inexact; a
    second rounding to fp16/bf16 is then the correct single rounding of the fp64 value."""
    f = acc.to(tl.float32)
    back = f.to(tl.float64)
    u = f.to(tl.uint32, bitcast=True)
    u = tl.where(tl.abs(back) > tl.abs(acc), u - 1, u)
    u = tl.where((back != acc) & (acc == acc), u | 1, u)
    return u.to(tl.float32, bitcast=True)


@triton.jit
def store_rounded(ptrs, acc, mask, MASKED: tl.constexpr):
    """Round fp64 `acc` once to the pointee dtype of `ptrs` and store it."""
    if ptrs.dtype.element_ty == tl.float64:
        v = acc
    elif ptrs.dtype.element_ty == tl.float32:
        v = acc.to(tl.float32)
    elif ptrs.dtype.element_ty == tl.bfloat16:
        v = round_to_bf16(round_to_odd_f32(acc))
    else:
        v = round_to_odd_f32(acc).to(tl.float16)
    if MASKED:
        tl.store(ptrs, v, mask=mask)
    else:
        tl.store(ptrs, v)


@triton.jit
def _accumulate(in_addrs, weight_bits, codes, K, divisor_bits, start, offs, mask, IN_CODE: tl.constexpr,
                DIVIDE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    w = tl.load(weight_bits).to(tl.float64, bitcast=True)
    x = load_input_f64(tl.load(in_addrs), tl.load(codes), start, offs, mask, IN_CODE, MASKED, ALIGNED)
    acc = w * x
    for k in range(1, K):
        w = tl.load(weight_bits + k).to(tl.float64, bitcast=True)
        x = load_input_f64(tl.load(in_addrs + k), tl.load(codes + k), start, offs, mask, IN_CODE,
                           MASKED, ALIGNED)
        acc = tl.fma(w, x, acc)
    if DIVIDE:
        acc = acc / tl.load(divisor_bits).to(tl.float64, bitcast=True)  # div.rn.f64: IEEE
    return acc


@triton.jit
def weighted_sum_block(in_addrs, weight_bits, codes, K, divisor_bits, out_addr, start, n, IN_CODE: tl.constexpr,
                       OUT_CODE: tl.constexpr, DIVIDE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [start, min(start + BLOCK, n)) of one tensor: in_addrs[k], weight_bits[k] and
    codes[k] (uint8) are the table entries of input k, divisor_bits the divisor's; out_addr is
    the output's address."""
    offs = tl.arange(0, BLOCK)
    out = typed_pointer(out_addr, OUT_CODE, ALIGNED) + start + offs
    mask = offs < n - start
    if start + BLOCK <= n:  # full block: no mask, so accesses can be 16-byte vectors
        acc = _accumulate(in_addrs, weight_bits, codes, K, divisor_bits, start, offs, mask, IN_CODE, DIVIDE,
                          False, ALIGNED)
        store_rounded(out, acc, mask, False)
    else:
        acc = _accumulate(in_addrs, weight_bits, codes, K, divisor_bits, start, offs, mask, IN_CODE, DIVIDE,
                          True, ALIGNED)
        store_rounded(out, acc, mask, True)


@triton.jit
def _weighted_sum_kernel(table, K, IN_CODE: tl.constexpr, OUT_CODE: tl.constexpr, DIVIDE: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # table.py's format, one tensor, no block map: program p is chunk p
    numels, _, weights, codes, divisor = table_sections(table, 1, K, 0)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    weighted_sum_block(table, weights, codes, K, divisor, tl.load(table + K), start, tl.load(numels), IN_CODE,
                       OUT_CODE, DIVIDE, ALIGNED, BLOCK)


# ---------------------------------------------------------------------------------------------
# host side


def check_tensor(t: object, what: str, device: torch.device | None = None, numel: int | None = None) -> torch.Tensor:
    """Validate one kernel operand: a contiguous fp32/fp16/bf16 torch tensor (on `device`, with
    `numel` elements when given). Raises InputError naming the operand."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in TORCH_CODES:
        raise InputError(f"{what}: unsupported dtype {t.dtype} (the Triton kernels take float32, float16, bfloat16)")
    if not t.is_contiguous():
        raise InputError(f"{what}: not contiguous (the kernels read and write flat memory; pass .contiguous())")
    if device is not None and t.device != device:
        raise InputError(f"{what}: on {t.device}, the output is on {device}")
    if numel is not None and t.numel() != numel:
        raise InputError(f"{what}: {t.numel()} elements, expected {numel}")
    return t


def check_block(block: int | None) -> int:
    """The block size to use: `block`, or the default for GPU / interpreter."""
    block = block or default_block()
    if block & (block - 1) or block < 16:
        raise InputError(f"block must be a power of two >= 16, got {block}")
    return block


def check_device(device: torch.device) -> None:
    if interpreted():
        if device.type != "cpu":
            raise InputError(f"the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors; got {device}")
    elif device.type != "cuda":
        raise InputError(f"Triton kernels need CUDA tensors, got {device} (set TRITON_INTERPRET=1 to run on CPU)")


def input_code(codes: Sequence[int]) -> int:
    """The compile-time input dtype code: the common code, or MIXED."""
    return codes[0] if len(set(codes)) == 1 else MIXED.value


def launch_settings(device: torch.device, in_code: int, out_code: int, block: int | None,
                    num_warps: int | None) -> tuple[int, int]:
    """(BLOCK, num_warps): as given, the default for one left out, or, neither given, the
    measured configuration (soupkern/kernels/tuning.py)."""
    if block is None and num_warps is None:
        from soupkern.kernels.tuning import launch_config

        block, num_warps = launch_config(device, in_code, out_code)
    return check_block(block), num_warps or GPU_WARPS


def all_aligned(tensors: Sequence[torch.Tensor]) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def weighted_sum(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                 divisor: float = 1.0, *, block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """out = round((Σ_k weights[k] · inputs[k]) / divisor) (the module's contract), one launch;
    returns `out`.

    out and every input: contiguous fp32/fp16/bf16 tensors with the same number of elements, on
    one CUDA device (CPU under TRITON_INTERPRET=1); shapes may differ (flat element order).
    `out` may be one of the inputs: every element is read by the program that writes it, before
    it writes it.
    `block` (a power of two, elements per program) and `num_warps`: the launch configuration;
    neither given: the one measured fastest for these dtypes on this device (kernels/tuning.py).
    """
    out = check_tensor(out, "out")
    check_device(out.device)
    k = len(inputs)
    if k < 1:
        raise InputError("weighted_sum needs at least one input")
    if len(weights) != k:
        raise InputError(f"{k} inputs but {len(weights)} weights")
    d = check_divisor(divisor)
    n = out.numel()
    xs = [check_tensor(x, f"inputs[{i}]", out.device, n) for i, x in enumerate(inputs)]
    if n == 0:
        return out
    codes = [TORCH_CODES[x.dtype] for x in xs]
    block, num_warps = launch_settings(out.device, input_code(codes), TORCH_CODES[out.dtype], block, num_warps)
    host, _ = build_table([[x.data_ptr() for x in xs] + [out.data_ptr()]], [codes + [TORCH_CODES[out.dtype]]], [n],
                          weights, d, None)
    grid = (triton.cdiv(n, block),)
    _weighted_sum_kernel[grid](device_table(host, out.device), k, IN_CODE=input_code(codes),
                               OUT_CODE=TORCH_CODES[out.dtype], DIVIDE=d != 1.0, ALIGNED=all_aligned([out, *xs]),
                               BLOCK=block, num_warps=num_warps)
    return out


def bytes_moved(numel: int, in_itemsizes: Sequence[int], out_itemsize: int) -> int:
    """Bytes read and written by weighted_sum: each input and the output once."""
    return numel * (sum(in_itemsizes) + out_itemsize)
