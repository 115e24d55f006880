// The multi-tensor kernel behind every soupkern CUDA contract (see soupkern_cuda.h).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

#include "convert.h"
#include "soupkern_cuda.h"

namespace soupkern {
namespace cuda {
namespace {

using convert::f64_to_f32;
using convert::f64_to_half;
using convert::half_to_f64;

// ---- loads and stores: scalar and E-element vectors (16-byte aligned) ---------------------

__device__ __forceinline__ double load1(const void* p, int dt, long long i) {
  if (dt == F32) return static_cast<double>(__ldcs(static_cast<const float*>(p) + i));
  return half_to_f64(__ldcs(static_cast<const unsigned short*>(p) + i), dt);
}

// Rounds v once to the output dtype and stores it. F64 (the greedy running sum) only where
// HAS_F64: the weighted-sum kernels never see it (pack_table checks).
template <bool HAS_F64>
__device__ __forceinline__ void store1(void* p, int dt, long long i, double v) {
  if (HAS_F64 && dt == F64) {
    __stcs(static_cast<double*>(p) + i, v);
  } else if (dt == F32) {
    __stcs(static_cast<float*>(p) + i, f64_to_f32(v));
  } else {
    __stcs(static_cast<unsigned short*>(p) + i, f64_to_half(v, dt));
  }
}

__device__ __forceinline__ unsigned pack2(const double* v, int dt) {
  return static_cast<unsigned>(f64_to_half(v[0], dt)) | (static_cast<unsigned>(f64_to_half(v[1], dt)) << 16);
}

// One 16-byte-aligned access of E elements of a 4- or 2-byte dtype, kept raw until each element
// is used: E = 8 (every operand 2 bytes wide: one 16-byte load of 8 halves) or E = 4 (one
// 16-byte load of 4 fp32, or one 8-byte load of 4 halves). Keeping the raw words (4 registers)
// instead of E decoded values holds the register count down, so more warps stay resident to
// keep loads in flight.
template <int E>
__device__ __forceinline__ uint4 load_raw(const void* p, int dt, long long i) {
  if (E == 4 && dt == F32) {
    const float4 a = __ldcs(reinterpret_cast<const float4*>(static_cast<const float*>(p) + i));
    return make_uint4(__float_as_uint(a.x), __float_as_uint(a.y), __float_as_uint(a.z), __float_as_uint(a.w));
  }
  if (E == 8) return __ldcs(reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(p) + i));
  const uint2 a = __ldcs(reinterpret_cast<const uint2*>(static_cast<const unsigned short*>(p) + i));
  return make_uint4(a.x, a.y, 0u, 0u);
}

__device__ __forceinline__ unsigned word(const uint4& r, int j) { return j == 0 ? r.x : j == 1 ? r.y : j == 2 ? r.z : r.w; }

// Element e (a compile-time constant after unrolling) of a raw access, as fp64 (exact).
template <int E>
__device__ __forceinline__ double element(const uint4& r, int dt, int e) {
  if (E == 4 && dt == F32) return static_cast<double>(__uint_as_float(word(r, e)));
  const unsigned w = word(r, e / 2);
  return half_to_f64(static_cast<unsigned short>(e % 2 == 0 ? (w & 0xffffu) : (w >> 16)), dt);
}

// E results, each rounded once to the output dtype, stored with one access (F64 where HAS_F64:
// E = 4 only, two 16-byte stores).
template <bool HAS_F64, int E>
__device__ __forceinline__ void store_vec(void* p, int dt, long long i, const double* v) {
  if (HAS_F64 && E == 4 && dt == F64) {
    double2* q = reinterpret_cast<double2*>(static_cast<double*>(p) + i);
    __stcs(q, make_double2(v[0], v[1]));
    __stcs(q + 1, make_double2(v[2], v[3]));
  } else if (E == 4 && dt == F32) {
    __stcs(reinterpret_cast<float4*>(static_cast<float*>(p) + i),
           make_float4(f64_to_f32(v[0]), f64_to_f32(v[1]), f64_to_f32(v[2]), f64_to_f32(v[3])));
  } else if (E == 8) {
    __stcs(reinterpret_cast<uint4*>(static_cast<unsigned short*>(p) + i),
           make_uint4(pack2(v, dt), pack2(v + 2, dt), pack2(v + 4, dt), pack2(v + 6, dt)));
  } else {
    __stcs(reinterpret_cast<uint2*>(static_cast<unsigned short*>(p) + i), make_uint2(pack2(v, dt), pack2(v + 2, dt)));
  }
}

// ---- one tile ----------------------------------------------------------------------------

// The tile's row, staged in shared memory by the block.
struct Row {
  const void* const* in;
  const double* weight;
  const unsigned char* dtype;  // K input dtypes
  void* out;
  int out_dtype;
  int k;
};

// DT: the dtype every input of the launch shares, a compile-time constant (no dtype branch per
// element: the common all-bf16 / all-fp32 checkpoint), or kMixed to read each input's from the row.
constexpr int kMixed = -1;

// Input k's U accesses of a pass (zeros where an access is not wholly inside the tile: never
// computed on uninitialized registers).
template <int E, int U, int DT>
__device__ __forceinline__ void load_input(uint4 (&raw)[U], const Row& r, int k, long long base, const bool (&full)[U]) {
  const void* p = r.in[k];
  const int dt = DT == kMixed ? static_cast<int>(r.dtype[k]) : DT;
#pragma unroll
  for (int u = 0; u < U; ++u) raw[u] = full[u] ? load_raw<E>(p, dt, base + u * kThreads * E) : make_uint4(0u, 0u, 0u, 0u);
}

// kWeightedSum, elements [begin, end) with E-element accesses, in passes of kThreads * U * E
// elements: in a pass, thread j owns accesses j, j + kThreads, ... (U of them). Input k + 1's U
// loads are issued before input k's arithmetic, so 2U loads per thread are in flight across
// inputs (not U, serialized input by input). Accesses not wholly inside [begin, end) are skipped
// (tile_tail).
template <int E, int U, int DT>
__device__ __forceinline__ void tile_vector(const Row& r, long long begin, long long end, double divisor) {
  for (long long base = begin + static_cast<long long>(threadIdx.x) * E; base < end; base += kThreads * U * E) {
    bool full[U];
#pragma unroll
    for (int u = 0; u < U; ++u) full[u] = base + u * kThreads * E + E <= end;
    double acc[U][E];
    uint4 raw[U], next[U];
    load_input<E, U, DT>(raw, r, 0, base, full);
#pragma unroll 1
    for (int k = 0; k < r.k; ++k) {
      const int dt = DT == kMixed ? static_cast<int>(r.dtype[k]) : DT;
      const double w = r.weight[k];
      if (k + 1 < r.k) load_input<E, U, DT>(next, r, k + 1, base, full);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const double x = element<E>(raw[u], dt, e);
          acc[u][e] = k == 0 ? convert::first_term<kWeightedSum>(w, x) : convert::next_term<kWeightedSum>(w, x, acc[u][e]);
        }
      if (k + 1 < r.k) {
#pragma unroll
        for (int u = 0; u < U; ++u) raw[u] = next[u];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!full[u]) continue;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[u][e] = convert::finish<kWeightedSum>(acc[u][e], divisor);
      store_vec<false, E>(r.out, r.out_dtype, base + u * kThreads * E, acc[u]);
    }
  }
}

// kWeightedSum, elements [begin, end) one by one, in passes of kThreads * U: thread j owns
// begin + j, begin + j + kThreads, ... (U of them per pass).
template <int U>
__device__ __forceinline__ void tile_scalar(const Row& r, long long begin, long long end, double divisor) {
  for (long long base = begin + static_cast<long long>(threadIdx.x); base < end; base += kThreads * U) {
    double acc[U];
#pragma unroll 1
    for (int k = 0; k < r.k; ++k) {
      const void* p = r.in[k];
      const int dt = r.dtype[k];
      const double w = r.weight[k];
      double x[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + u * kThreads < end) x[u] = load1(p, dt, base + u * kThreads);
#pragma unroll
      for (int u = 0; u < U; ++u)
        acc[u] = k == 0 ? convert::first_term<kWeightedSum>(w, x[u]) : convert::next_term<kWeightedSum>(w, x[u], acc[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * kThreads < end)
        store1<false>(r.out, r.out_dtype, base + u * kThreads, convert::finish<kWeightedSum>(acc[u], divisor));
  }
}

// kWeightedSum, the last end % E elements of a vector tile (fewer than E): one per thread.
template <int E>
__device__ __forceinline__ void tile_tail(const Row& r, long long begin, long long end, double divisor) {
  const long long i = begin + (end - begin) / E * E + threadIdx.x;
  if (i >= end) return;
  double acc = convert::first_term<kWeightedSum>(r.weight[0], load1(r.in[0], r.dtype[0], i));
  for (int k = 1; k < r.k; ++k) acc = convert::next_term<kWeightedSum>(r.weight[k], load1(r.in[k], r.dtype[k], i), acc);
  store1<false>(r.out, r.out_dtype, i, convert::finish<kWeightedSum>(acc, divisor));
}

// The greedy ops (K = 2: input 0 the fp64 running sum, input 1 the candidate x of any 4- or
// 2-byte dtype), elements [begin, end): with E = 4 (16-byte aligned: two 16-byte loads of the
// sum, one load of x, one store) in passes of kThreads * U * 4, then the tail one per thread;
// with E = 1 element by element in passes of kThreads * U.
template <Op OP>
__device__ __forceinline__ double greedy_value(double sum, double x, double divisor) {
  return convert::finish<OP>(convert::next_term<OP>(0.0, x, convert::first_term<OP>(0.0, sum)), divisor);
}

template <Op OP, int E, int U>
__device__ __forceinline__ void tile_greedy(const Row& r, long long begin, long long end, double divisor) {
  const double* sum = static_cast<const double*>(r.in[0]);
  const void* x = r.in[1];
  const int dt = r.dtype[1];
  if constexpr (E == 4) {
    for (long long base = begin + static_cast<long long>(threadIdx.x) * 4; base < end; base += kThreads * U * 4) {
      double2 lo[U], hi[U];
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long i = base + u * kThreads * 4;
        if (i + 4 <= end) {
          lo[u] = __ldcs(reinterpret_cast<const double2*>(sum + i));
          hi[u] = __ldcs(reinterpret_cast<const double2*>(sum + i) + 1);
          raw[u] = load_raw<4>(x, dt, i);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long i = base + u * kThreads * 4;
        if (i + 4 > end) continue;
        const double v[4] = {greedy_value<OP>(lo[u].x, element<4>(raw[u], dt, 0), divisor),
                             greedy_value<OP>(lo[u].y, element<4>(raw[u], dt, 1), divisor),
                             greedy_value<OP>(hi[u].x, element<4>(raw[u], dt, 2), divisor),
                             greedy_value<OP>(hi[u].y, element<4>(raw[u], dt, 3), divisor)};
        store_vec<true, 4>(r.out, r.out_dtype, i, v);
      }
    }
    const long long i = begin + (end - begin) / 4 * 4 + threadIdx.x;
    if (i < end) store1<true>(r.out, r.out_dtype, i, greedy_value<OP>(__ldcs(sum + i), load1(x, dt, i), divisor));
  } else {
    for (long long base = begin + static_cast<long long>(threadIdx.x); base < end; base += kThreads * U) {
      double s[U], v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + u * kThreads < end) {
          s[u] = __ldcs(sum + base + u * kThreads);
          v[u] = load1(x, dt, base + u * kThreads);
        }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + u * kThreads < end) store1<true>(r.out, r.out_dtype, base + u * kThreads, greedy_value<OP>(s[u], v[u], divisor));
    }
  }
}

// ---- the kernel --------------------------------------------------------------------------

// E = 8 or 4: every tensor of the table has 16-byte aligned addresses (and, for 8, only 2-byte
// dtypes); E = 1: any addresses. The host groups tensors by access width (pack_table checks).
// DT: every input's dtype when the launch's inputs share one (weighted sum, E = 4 or 8), else
// kMixed; the host passes it from the dtypes it packed (launch checks the value).
template <Op OP, int E, int DT = kMixed>
__global__ void __launch_bounds__(kThreads, 4) multi_tensor_kernel(const unsigned char* table, long long tensors, int k,
                                                                 long long tiles) {
  const TableLayout l = table_layout(tensors, k, tiles);
  const unsigned long long* addrs = reinterpret_cast<const unsigned long long*>(table + l.addr);
  const long long* numels = reinterpret_cast<const long long*>(table + l.numel);
  const int2* blocks = reinterpret_cast<const int2*>(table + l.block);
  const double* weights = reinterpret_cast<const double*>(table + l.weight);
  const unsigned char* dtypes = table + l.dtype;
  const double divisor = *reinterpret_cast<const double*>(table + l.divisor);

  extern __shared__ unsigned long long smem[];  // K addresses, K fp64 weights, K dtypes
  const void** s_in = reinterpret_cast<const void**>(smem);
  double* s_weight = reinterpret_cast<double*>(smem + k);
  unsigned char* s_dtype = reinterpret_cast<unsigned char*>(s_weight + k);
  for (int j = threadIdx.x; j < k; j += kThreads) s_weight[j] = weights[j];

#pragma unroll 1
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int2 tc = blocks[tile];  // (tensor, chunk): one load, no search
    const long long row = static_cast<long long>(tc.x) * (k + 1);
    __syncthreads();  // the previous tile is done with the shared row
    for (int j = threadIdx.x; j < k; j += kThreads) {
      s_in[j] = reinterpret_cast<const void*>(addrs[row + j]);
      s_dtype[j] = dtypes[row + j];
    }
    __syncthreads();
    const Row r{s_in, s_weight, s_dtype, reinterpret_cast<void*>(addrs[row + k]), dtypes[row + k], k};
    const long long begin = static_cast<long long>(tc.y) * kTile;
    const long long end = min(begin + kTile, numels[tc.x]);
    // U (accesses per thread loaded together) as high as 64 registers (4 blocks of 256 per SM)
    // allow without spilling on sm_80 and sm_90 (ptxas -v): fp64 values take two registers each.
    // Weighted sum E = 8 with U = 2 needs 80 registers (3 blocks per SM): not measured against
    // this on a GPU yet.
    if constexpr (OP != kWeightedSum) {
      tile_greedy<OP, E, E == 4 ? 1 : 4>(r, begin, end, divisor);
    } else if constexpr (E == 1) {
      tile_scalar<4>(r, begin, end, divisor);
    } else {
      tile_vector<E, E == 8 ? 1 : 2, DT>(r, begin, end, divisor);
      tile_tail<E>(r, begin, end, divisor);
    }
  }
}

using KernelFn = void (*)(const unsigned char*, long long, int, long long);

// nullptr for a width the op never gets: the greedy ops read an fp64 running sum, so their
// tables allow at most 4-wide accesses (pack_table checks).
template <Op OP>
KernelFn kernel_for_width(int width) {
  if constexpr (OP == kWeightedSum) {
    if (width == 8) return multi_tensor_kernel<OP, 8>;
  } else {
    if (width == 8) return nullptr;
  }
  return width == 4 ? multi_tensor_kernel<OP, 4> : multi_tensor_kernel<OP, 1>;
}

// The weighted sum specialized for one input dtype shared by every input (E = 8: the 2-byte
// dtypes only); the mixed kernel for any other combination.
KernelFn weighted_sum_for(int width, int input_dtype) {
  if (width == 8 && input_dtype == F16) return multi_tensor_kernel<kWeightedSum, 8, F16>;
  if (width == 8 && input_dtype == BF16) return multi_tensor_kernel<kWeightedSum, 8, BF16>;
  if (width == 4 && input_dtype == F32) return multi_tensor_kernel<kWeightedSum, 4, F32>;
  if (width == 4 && input_dtype == F16) return multi_tensor_kernel<kWeightedSum, 4, F16>;
  if (width == 4 && input_dtype == BF16) return multi_tensor_kernel<kWeightedSum, 4, BF16>;
  return kernel_for_width<kWeightedSum>(width);
}

KernelFn kernel_for(Op op, int width, int input_dtype) {
  switch (op) {
    case kWeightedSum: return weighted_sum_for(width, input_dtype);
    case kGreedyCandidate: return kernel_for_width<kGreedyCandidate>(width);
    default: return kernel_for_width<kGreedyAccept>(width);
  }
}

std::size_t shared_bytes(int k) { return static_cast<std::size_t>(k) * (8 + 8 + 1); }

// Resident blocks per device (SMs x blocks per SM), computed once per (device, kernel, K).
std::mutex grid_mu;
std::map<std::tuple<int, int, int>, int> grid_cache;

cudaError_t resident_blocks(int device, Op op, int width, int input_dtype, int k, int* blocks) {
  std::lock_guard<std::mutex> lock(grid_mu);
  const auto key = std::make_tuple(device, (static_cast<int>(op) * 16 + width) * 16 + input_dtype + 1, k);
  const auto hit = grid_cache.find(key);
  if (hit != grid_cache.end()) {
    *blocks = hit->second;
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_for(op, width, input_dtype), kThreads,
                                                      shared_bytes(k));
  if (err != cudaSuccess) return err;
  *blocks = grid_cache[key] = sms * (per_sm > 0 ? per_sm : 1);
  return cudaSuccess;
}

}  // namespace

int launch(Op op, int width, const void* device_table, std::int64_t tensors, int k, std::int64_t tiles, int device,
           std::uintptr_t stream, int input_dtype) {
  if (tiles <= 0) return cudaSuccess;
  if (k < 1 || k > kMaxInputs || tensors < 1 || (width != 1 && width != 4 && width != 8)) return cudaErrorInvalidValue;
  if (input_dtype != kMixed && input_dtype != F32 && input_dtype != F16 && input_dtype != BF16) return cudaErrorInvalidValue;
  if (kernel_for(op, width, input_dtype) == nullptr) return cudaErrorInvalidValue;
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  int blocks = 0;
  err = resident_blocks(device, op, width, input_dtype, k, &blocks);
  if (err != cudaSuccess) return err;
  const long long grid = tiles < blocks ? tiles : blocks;
  kernel_for(op, width, input_dtype)<<<static_cast<unsigned>(grid), kThreads, shared_bytes(k), reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const unsigned char*>(device_table), tensors, k, tiles);
  return cudaGetLastError();
}

int device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky-free status so later calls report their own
  }
  return err;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

const char* error_name(int code) { return cudaGetErrorName(static_cast<cudaError_t>(code)); }
const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace soupkern
