// Run-time ISA selection and the OpenMP-threaded entry points.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "soupkern.h"

namespace soupkern {

WeightedSumFn select_isa(const char** name) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    if (name) *name = "avx512";
    return isa_avx512::weighted_sum_range;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    if (name) *name = "avx2";
    return isa_avx2::weighted_sum_range;
  }
#endif
  if (name) *name = "generic";
  return isa_generic::weighted_sum_range;
}

WeightedSumFn isa_by_name(const char* name) {
  const char* best = nullptr;
  select_isa(&best);
  const std::string want(name), have(best);
  const int rank_want = want == "avx512" ? 2 : want == "avx2" ? 1 : want == "generic" ? 0 : -1;
  const int rank_have = have == "avx512" ? 2 : have == "avx2" ? 1 : 0;
  if (rank_want < 0 || rank_want > rank_have) return nullptr;
  return rank_want == 2 ? isa_avx512::weighted_sum_range
         : rank_want == 1 ? isa_avx2::weighted_sum_range
                          : isa_generic::weighted_sum_range;
}

#ifndef SOUPKERN_MANY_STREAM
#define SOUPKERN_MANY_STREAM (1u << 20)
#endif
namespace {
// Below this many elements a kernel runs on the calling thread: waking the team costs more.
constexpr std::size_t kMinParallel = 1 << 16;
// Work is split on multiples of this many elements (cache-line and block friendly).
constexpr std::size_t kGrain = 1024;
// Outputs at least this large are written with non-temporal stores (they will not be re-read
// from cache soon; it saves the read-for-ownership). The engine's staging window is smaller,
// so its output stays in cache for the pwrite that follows.
constexpr std::size_t kStreamBytes = 32u << 20;
// The multi-tensor entry point writes whole tensors the caller keeps (in-memory soups): no
// later pwrite re-reads them from cache, so every tensor of this size streams.
constexpr std::size_t kManyStreamBytes = SOUPKERN_MANY_STREAM;

int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }
}  // namespace

void weighted_sum(void* out, DType out_dtype, const void* const* inputs, const DType* in_dtypes,
                  const double* weights, double divisor, int k, std::size_t n, int threads, WeightedSumFn fn) {
  static const WeightedSumFn best = select_isa(nullptr);
  if (fn == nullptr) fn = best;
  if (n == 0) return;
  const bool stream = n * itemsize(out_dtype) >= kStreamBytes && reinterpret_cast<std::uintptr_t>(out) % 64 == 0;
  const int t = n < kMinParallel ? 1 : resolve_threads(threads);
  if (t == 1) {
    fn(out, out_dtype, inputs, in_dtypes, weights, divisor, k, 0, n, stream);
    return;
  }
  const std::size_t grains = (n + kGrain - 1) / kGrain;
#pragma omp parallel num_threads(t)
  {
    const std::size_t nt = static_cast<std::size_t>(omp_get_num_threads());
    const std::size_t id = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t g0 = grains * id / nt, g1 = grains * (id + 1) / nt;
    const std::size_t b = std::min(n, g0 * kGrain), e = std::min(n, g1 * kGrain);
    if (b < e) fn(out, out_dtype, inputs, in_dtypes, weights, divisor, k, b, e, stream);
  }
}

void weighted_sum_many(void* const* outs, const DType* out_dtypes, const void* const* inputs,
                       const DType* in_dtypes, const std::size_t* numels, const double* weights,
                       const double* divisors, int k, std::size_t count, int threads, WeightedSumFn fn) {
  static const WeightedSumFn best = select_isa(nullptr);
  if (fn == nullptr) fn = best;
  constexpr std::size_t kBlock = 1 << 15;  // elements per work item: L2-sized for K inputs
  std::vector<std::size_t> first(count + 1, 0);  // first work item of each tensor
  std::size_t total = 0;
  for (std::size_t t = 0; t < count; ++t) {
    first[t + 1] = first[t] + (numels[t] + kBlock - 1) / kBlock;
    total += numels[t];
  }
  const std::size_t items = first[count];
  const int nt = total < kMinParallel ? 1 : resolve_threads(threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (std::size_t i = 0; i < items; ++i) {
    const std::size_t t = static_cast<std::size_t>(std::upper_bound(first.begin(), first.end(), i) - first.begin()) - 1;
    const std::size_t b = (i - first[t]) * kBlock, e = std::min(numels[t], b + kBlock);
    const bool stream = numels[t] * itemsize(out_dtypes[t]) >= kManyStreamBytes &&
                        reinterpret_cast<std::uintptr_t>(outs[t]) % 64 == 0;
    fn(outs[t], out_dtypes[t], inputs + t * k, in_dtypes + t * k, weights + t * k, divisors[t], k, b, e, stream);
  }
}

void parallel_copy(void* dst, const void* src, std::size_t nbytes, int threads) {
  const int t = nbytes < (kMinParallel * 4) ? 1 : resolve_threads(threads);
#pragma omp parallel num_threads(t)
  {
    const std::size_t nt = static_cast<std::size_t>(omp_get_num_threads());
    const std::size_t id = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t b = (nbytes * id / nt) & ~std::size_t(63);
    const std::size_t e = id + 1 == nt ? nbytes : (nbytes * (id + 1) / nt) & ~std::size_t(63);
    if (b < e) std::memcpy(static_cast<char*>(dst) + b, static_cast<const char*>(src) + b, e - b);
  }
}

uint64_t parallel_read(const void* const* buffers, int k, std::size_t nbytes, int threads) {
  const int t = nbytes < (kMinParallel * 4) ? 1 : resolve_threads(threads);
  const std::size_t words = nbytes / 8;
  uint64_t total = 0;
#pragma omp parallel num_threads(t) reduction(+ : total)
  {
    const std::size_t nt = static_cast<std::size_t>(omp_get_num_threads());
    const std::size_t id = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t b = words * id / nt, e = words * (id + 1) / nt;
    for (std::size_t blk = b; blk < e; blk += kGrain) {  // input by input, block by block
      const std::size_t be = std::min(e, blk + kGrain);
      for (int j = 0; j < k; ++j) {
        const uint64_t* p = static_cast<const uint64_t*>(buffers[j]);
        uint64_t s = 0;
        for (std::size_t i = blk; i < be; ++i) s += p[i];
        total += s;
      }
    }
  }
  return total;
}

}  // namespace soupkern
