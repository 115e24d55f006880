// Per-element arithmetic of the CUDA kernels: exact decoding to fp64, the fp64 steps of each Op
// and the one rounding to the output dtype (contract in csrc/soupkern.h and soupkern_cuda.h).
// Device code, included by multi_tensor.cu only (nvcc). Every step is an explicit intrinsic with
// its rounding in the name, so nothing depends on contraction (setup.py passes --fmad=false too).
//
// SOUPKERN_CONVERT_FN is `__device__ __forceinline__` unless the includer defines it: a host test
// can define it as `inline` and map the few device-only intrinsics used below to host functions
// of the same IEEE semantics, to check the logic built on them.
#pragma once

#include <cuda_fp16.h>

#include "../soupkern.h"
#include "soupkern_cuda.h"

#ifndef SOUPKERN_CONVERT_FN
#define SOUPKERN_CONVERT_FN __device__ __forceinline__
#endif

namespace soupkern {
namespace cuda {
namespace convert {

// ---- decoding: every storage dtype to fp64, exactly ------------------------------------------

SOUPKERN_CONVERT_FN double bf16_to_f64(unsigned short h) {
  return static_cast<double>(__uint_as_float(static_cast<unsigned>(h) << 16));
}

SOUPKERN_CONVERT_FN double f16_to_f64(unsigned short h) { return static_cast<double>(__half2float(__ushort_as_half(h))); }

SOUPKERN_CONVERT_FN double half_to_f64(unsigned short h, int dt) { return dt == BF16 ? bf16_to_f64(h) : f16_to_f64(h); }

// ---- the one rounding of the fp64 result -----------------------------------------------------

// F32 output: nearest even (overflow gives Inf, subnormals kept).
SOUPKERN_CONVERT_FN float f64_to_f32(double d) { return __double2float_rn(d); }

// fp64 -> fp32 rounded to odd: truncate toward zero, then set the last bit if that was inexact
// (NaN excluded). fp32 keeps >= 2 more bits than F16 and BF16 at every exponent they can
// represent, so rounding this to nearest even once more is the correct rounding of the fp64
// value: one rounding in effect. Never Inf for finite input (|d| > FLT_MAX gives FLT_MAX, whose
// last bit is already set, which the second rounding then takes to Inf). Same bits as the C++
// kernel's f64_to_f32_odd for every non-NaN value.
SOUPKERN_CONVERT_FN float f64_to_f32_odd(double d) {
  const float t = __double2float_rz(d);
  if (static_cast<double>(t) != d && d == d) return __uint_as_float(__float_as_uint(t) | 1u);
  return t;
}

// fp32 -> bf16, nearest even on the bits (the C++ kernel's f32_to_bf16); NaN stays a quiet NaN.
SOUPKERN_CONVERT_FN unsigned short f32_to_bf16(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fp32 -> fp16, nearest even (subnormal halves and overflow to Inf included).
SOUPKERN_CONVERT_FN unsigned short f32_to_f16(float f) { return __half_as_ushort(__float2half_rn(f)); }

// F16 / BF16 output: round to odd fp32, then nearest even to the 2-byte dtype.
SOUPKERN_CONVERT_FN unsigned short f64_to_half(double d, int dt) {
  const float f = f64_to_f32_odd(d);
  return dt == BF16 ? f32_to_bf16(f) : f32_to_f16(f);
}

// ---- the fp64 steps of each Op ----------------------------------------------------------------
// kWeightedSum:     acc = w_0 * x_0; acc = fma(w_k, x_k, acc) for k = 1..K-1; acc / divisor.
// kGreedyCandidate: acc = x_0 (fp64 running sum) + x_1; acc / divisor (n + 1).
// kGreedyAccept:    acc = x_0 + x_1 (the new running sum; divisor 1).

template <Op OP>
SOUPKERN_CONVERT_FN double first_term(double w, double x) {
  if constexpr (OP == kWeightedSum) return __dmul_rn(w, x);
  return x;
}

template <Op OP>
SOUPKERN_CONVERT_FN double next_term(double w, double x, double acc) {
  if constexpr (OP == kWeightedSum) return __fma_rn(w, x, acc);
  return __dadd_rn(acc, x);
}

// One IEEE division when the divisor is not 1 (x / 1 == x for every x, so skipping it changes no
// value; a NaN keeps its payload).
template <Op OP>
SOUPKERN_CONVERT_FN double finish(double acc, double divisor) {
  if constexpr (OP == kGreedyAccept) return acc;
  return divisor != 1.0 ? __ddiv_rn(acc, divisor) : acc;
}

}  // namespace convert
}  // namespace cuda
}  // namespace soupkern
