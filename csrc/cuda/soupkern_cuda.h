// soupkern CUDA kernels: framework-free host API (no CUDA headers needed to include this file).
//
// One multi-tensor kernel serves every contract; `Op` picks the per-element arithmetic. It is
// the exact-arithmetic contract of csrc/soupkern.h, in fp64, every operation one IEEE rounding by
// an explicit intrinsic (nothing contracted; nvcc also gets --fmad=false); csrc/cuda/convert.h:
//   kWeightedSum:     inputs decoded exactly to fp64; acc = w_0 * x_0 (__dmul_rn); acc =
//                     fma(w_k, x_k, acc) (__fma_rn) for k = 1..K-1 in order; acc / divisor
//                     (__ddiv_rn) when divisor != 1; out = round(acc). fp64 weights. Bit-identical
//                     to the C++ kernel (NaN stays NaN; its payload is the GPU's canonical one).
//   kGreedyCandidate: K = 2, x_0 = fp64 running sum, x_1 = candidate:
//                     out = round(__ddiv_rn(__dadd_rn(x_0, x_1), divisor)), divisor = n + 1.
//   kGreedyAccept:    K = 2, out = x_0 = the fp64 running sum (updated in place):
//                     out = __dadd_rn(x_0, x_1), stored as fp64.
// round(): to fp32 __double2float_rn; to fp16 / bf16 one rounding through round-to-odd fp32
// (__double2float_rz, last bit set when inexact), then __float2half_rn, or for bf16 the integer
// round-to-nearest-even of the fp32 bits (the C++ kernel's f32_to_bf16; NaN -> quiet NaN).
// Weighted sum: inputs and outputs fp32/fp16/bf16 (dtype tags of csrc/soupkern.h; F64 refused),
// any mix per (tensor, input). Greedy ops: input 0 and accept's output F64, the rest
// fp32/fp16/bf16 (pack_table checks). Bytes moved: sum over tensors of
// numel * (sum_k itemsize(x_k) + itemsize(out)).
//
// Work split: every tensor is cut into tiles of kTile elements; tiles of all tensors are numbered
// in table order and a grid-stride loop over tile numbers reads each tile's (tensor, chunk) from
// the table's block map: one 8-byte load, no search. Access width, one per launch (a kernel per
// width keeps the register count low): 8 = 16-byte accesses of 8 elements (every address 16-byte
// aligned, every operand 2 bytes wide); 4 = accesses of 4 elements (every address 16-byte
// aligned: 16 bytes of fp32, 8 of halves, 2 x 16 of fp64); 1 = element by element (any
// addresses). Each element gets the same instruction sequence whatever the width, so the bits
// do not depend on alignment, tiling or grid size.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../soupkern.h"

#ifdef __CUDACC__
#define SOUPKERN_HOST_DEVICE __host__ __device__
#else
#define SOUPKERN_HOST_DEVICE
#endif

namespace soupkern {
namespace cuda {

enum Op : int { kWeightedSum = 0, kGreedyCandidate = 1, kGreedyAccept = 2 };

constexpr int kThreads = 256;                 // threads per block
constexpr int kPerThread = 16;                // elements per thread per tile
constexpr std::int64_t kTile = kThreads * kPerThread;
constexpr int kMaxInputs = 2048;              // K limit: the row of a tile is staged in shared memory

// The launch table of T tensors with K inputs each and B blocks (tiles of kTile elements here):
// the format shared with the Triton kernels, described once in soupkern/kernels/table.py:
//   int64  addr[T * (K + 1)]     row t: tensor t's K input addresses, then its output address
//   int64  numel[T]
//   int32  block[B][2]           block b: (tensor index, chunk index within the tensor)
//   double weight[K]             fp64 weights (the greedy ops ignore them)
//   uint8  dtype[T * (K + 1)]    row t: the K input dtypes, then the output's; padded to 8 bytes
//   double divisor
// Built on the host by pack_table, copied to the device by the caller.
struct TableLayout {
  std::size_t addr, numel, block, weight, dtype, divisor, total;
};

SOUPKERN_HOST_DEVICE inline TableLayout table_layout(std::int64_t tensors, int k, std::int64_t blocks) {
  const std::size_t rows = static_cast<std::size_t>(tensors) * (static_cast<std::size_t>(k) + 1);
  TableLayout l{};
  l.addr = 0;
  l.numel = l.addr + 8 * rows;
  l.block = l.numel + 8 * static_cast<std::size_t>(tensors);
  l.weight = l.block + 8 * static_cast<std::size_t>(blocks);
  l.dtype = l.weight + 8 * static_cast<std::size_t>(k);
  l.divisor = l.dtype + ((rows + 7) & ~std::size_t{7});
  l.total = l.divisor + 8;
  return l;
}

// Tiles of a launch over tensors of these element counts (-1 if a count is negative, or a
// tensor has 2^31 tiles or more: the block map holds int32 chunk indices).
std::int64_t tile_count(const std::int64_t* numels, std::int64_t tensors);

// The widest access (8, 4 or 1) that a tensor with these addresses and dtypes allows.
int access_width(std::uint64_t out, int out_dtype, const std::uint64_t* ins, const int* in_dtypes, int k);

// Fills `host` (table_layout(tensors, k, tile_count(numels, tensors)).total bytes) for a launch
// of `op` and returns the number of tiles. outs[t], numels[t], out_dtypes[t]; ins[t * k + j],
// in_dtypes[t * k + j]; weights[j]; divisor: fp64, != 0 and finite (weighted sum: 1 = no
// division; candidate: n + 1; accept: 1). Returns -1 with *error set on a bad argument (dtypes
// that `op` does not take, negative numel, a tensor that does not allow access `width`, a bad
// divisor). A table must be launched with the op it was packed for.
std::int64_t pack_table(void* host, Op op, int width, std::int64_t tensors, int k, const std::uint64_t* outs,
                        const int* out_dtypes, const std::uint64_t* ins, const int* in_dtypes, const std::int64_t* numels,
                        const double* weights, double divisor, const char** error);

// Launches `op` with access `width` (that of pack_table) over a device table of `tiles` tiles on
// `stream` (a cudaStream_t as an integer; 0 = the legacy default stream) of device `device`
// (made current only when it is not already). Returns the cudaError_t value (0 = success): the
// launch's own status, not that of the kernel's execution. Width 8 exists for kWeightedSum only
// (cudaErrorInvalidValue otherwise). `input_dtype`: the dtype tag every input of the table has
// (F32, F16, BF16: a kernel specialized for it), or -1 for any mix; the caller derives it from
// the dtypes it packed, and a wrong tag reads the inputs as the wrong type.
int launch(Op op, int width, const void* device_table, std::int64_t tensors, int k, std::int64_t tiles, int device,
           std::uintptr_t stream, int input_dtype = -1);

// cudaGetDeviceCount's status and count (count = 0 on any error).
int device_count(int* count);
int runtime_version();
int driver_version();  // 0 when no driver is installed
const char* error_name(int code);
const char* error_string(int code);

}  // namespace cuda
}  // namespace soupkern
