// soupkern native kernels: framework-free, raw pointers + dtype tags + element counts.
//
// Contract of weighted_sum (every backend implements exactly this):
//   out[i] = sum_{k=0}^{K-1} w_k * x_k[i]        for i in [0, n)
//   - inputs x_k: F32, F16, BF16 or F64, any mix; converted exactly to the accumulator type.
//   - accumulator: fp64 if the output or any input is F64, else fp32. Weights are rounded to
//     the accumulator type once. acc = w_0*x_0 (one rounding), then for k = 1..K-1 in this
//     fixed order acc = fma(w_k, x_k, acc) (one rounding per term).
//   - output: F32/F64 stored as is; F16 and BF16 rounded to nearest, ties to even; NaN stays
//     NaN (quiet, sign kept), +-Inf stays Inf, F16 overflow gives Inf.
//   - bytes moved: n * (sum_k itemsize(x_k) + itemsize(out)); each input byte read once,
//     each output byte written once.
//   - every element is computed independently with the same instruction sequence, so the
//     result is bit-identical for any thread count, chunking or alignment.
#pragma once
#include <cstddef>
#include <cstdint>

namespace soupkern {

enum DType : int { F64 = 0, F32 = 1, F16 = 2, BF16 = 3 };

inline std::size_t itemsize(DType t) { return t == F64 ? 8 : t == F32 ? 4 : 2; }

// One ISA level's implementation of the contract above, for elements [begin, end).
// stream: write the output with non-temporal stores (requires `out` 64-byte aligned and
// `begin` a multiple of 1024); same bits, but the output bypasses the caches.
using WeightedSumFn = void (*)(void* out, DType out_dtype, const void* const* inputs,
                               const DType* in_dtypes, const double* weights, int k,
                               std::size_t begin, std::size_t end, bool stream);

namespace isa_avx512 { void weighted_sum_range(void*, DType, const void* const*, const DType*, const double*, int, std::size_t, std::size_t, bool); }
namespace isa_avx2 { void weighted_sum_range(void*, DType, const void* const*, const DType*, const double*, int, std::size_t, std::size_t, bool); }
namespace isa_generic { void weighted_sum_range(void*, DType, const void* const*, const DType*, const double*, int, std::size_t, std::size_t, bool); }

// The best implementation this CPU supports, and its name ("avx512", "avx2", "generic").
WeightedSumFn select_isa(const char** name);

// The implementation named "avx512", "avx2" or "generic" if this CPU can run it, else nullptr.
WeightedSumFn isa_by_name(const char* name);

// Threaded entry points (OpenMP; threads <= 0 means all available; fn == nullptr: the best ISA).
void weighted_sum(void* out, DType out_dtype, const void* const* inputs, const DType* in_dtypes,
                  const double* weights, int k, std::size_t n, int threads, WeightedSumFn fn = nullptr);
void parallel_copy(void* dst, const void* src, std::size_t nbytes, int threads);
// Reads nbytes of each buffer once (OpenMP over the same element ranges as weighted_sum) and
// returns a checksum: the read-only floor a read-dominated kernel is compared with.
uint64_t parallel_read(const void* const* buffers, int k, std::size_t nbytes, int threads);

}  // namespace soupkern
