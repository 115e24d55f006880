// soupkern native kernels: framework-free, raw pointers + dtype tags + element counts.
//
// Contract of weighted_sum (the exact-arithmetic contract; every backend implements exactly this):
//   out[i] = round( (sum_{k=0}^{K-1} w_k * x_k[i]) / d )        for i in [0, n)
//   - inputs x_k: F32, F16, BF16 or F64, any mix; converted exactly to fp64.
//   - accumulation in fp64 with fp64 weights: acc = w_0*x_0 (one rounding), then for
//     k = 1..K-1 in this fixed order acc = fma(w_k, x_k, acc) (one rounding per term; no other
//     contraction: compiled with -ffp-contract=off).
//   - divisor d: when d != 1, acc = acc / d, one IEEE fp64 division. The uniform soup is
//     w_k = 1, d = K: the fp64 sum of the inputs in input order, divided once by K.
//   - round(): one rounding of the fp64 value to the output dtype, to nearest, ties to even
//     (F16/BF16 through round-to-odd fp32, which makes it a single rounding); NaN stays NaN
//     (quiet, sign kept), +-Inf stays Inf, overflow gives Inf. F64 output: stored as is.
//   - consequence: a uniform soup equals round(exact mean) except where the fp64 sum or
//     quotient lands across an output rounding boundary (measured: >= 99.999% of elements for
//     F32/F16/BF16 inputs, K = 2..9 and 72; see tests/test_exact.py).
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
                               const DType* in_dtypes, const double* weights, double divisor, int k,
                               std::size_t begin, std::size_t end, bool stream);

namespace isa_avx512 { void weighted_sum_range(void*, DType, const void* const*, const DType*, const double*, double, int, std::size_t, std::size_t, bool); }
namespace isa_avx2 { void weighted_sum_range(void*, DType, const void* const*, const DType*, const double*, double, int, std::size_t, std::size_t, bool); }
namespace isa_generic { void weighted_sum_range(void*, DType, const void* const*, const DType*, const double*, double, int, std::size_t, std::size_t, bool); }

// The best implementation this CPU supports, and its name ("avx512", "avx2", "generic").
WeightedSumFn select_isa(const char** name);

// The implementation named "avx512", "avx2" or "generic" if this CPU can run it, else nullptr.
WeightedSumFn isa_by_name(const char* name);

// Threaded entry points (OpenMP; threads <= 0 means all available; fn == nullptr: the best ISA).
void weighted_sum(void* out, DType out_dtype, const void* const* inputs, const DType* in_dtypes,
                  const double* weights, double divisor, int k, std::size_t n, int threads,
                  WeightedSumFn fn = nullptr);
// One weighted sum of the contract above for each of `count` tensors in one call (the in-memory
// state-dict path): job t reads inputs[t*k .. t*k+k) and writes outs[t] over numels[t] elements
// with weights[t*k .. t*k+k) and divisors[t]. Tensors are cut into blocks spread over the
// threads, so hundreds of small tensors cost one team wake-up, not one each; same bits.
void weighted_sum_many(void* const* outs, const DType* out_dtypes, const void* const* inputs,
                       const DType* in_dtypes, const std::size_t* numels, const double* weights,
                       const double* divisors, int k, std::size_t count, int threads,
                       WeightedSumFn fn = nullptr);
void parallel_copy(void* dst, const void* src, std::size_t nbytes, int threads);
// Reads nbytes of each buffer once (OpenMP over the same element ranges as weighted_sum) and
// returns a checksum: the read-only floor a read-dominated kernel is compared with.
uint64_t parallel_read(const void* const* buffers, int k, std::size_t nbytes, int threads);

}  // namespace soupkern
