// Host side of the CUDA kernels' launch table (layout in soupkern_cuda.h). Plain C++: no CUDA.
#include <cmath>
#include <cstring>

#include "soupkern_cuda.h"

namespace soupkern {
namespace cuda {

namespace {

bool half_or_float(int dt) { return dt == F32 || dt == F16 || dt == BF16; }

// The dtypes `op` takes, or nullptr with the reason: weighted sum: F32/F16/BF16 everywhere;
// greedy ops: K = 2, input 0 the F64 running sum, input 1 F32/F16/BF16, output F32/F16/BF16
// (candidate) or F64 (accept: the running sum itself).
const char* check_dtypes(Op op, int k, int out_dtype, const int* in_dtypes) {
  if (op == kWeightedSum) {
    if (!half_or_float(out_dtype)) return "output dtype must be F32, F16 or BF16";
    for (int j = 0; j < k; ++j)
      if (!half_or_float(in_dtypes[j])) return "input dtype must be F32, F16 or BF16";
    return nullptr;
  }
  if (op != kGreedyCandidate && op != kGreedyAccept) return "unknown op";
  if (k != 2) return "the greedy ops take k = 2 (running sum, candidate)";
  if (in_dtypes[0] != F64) return "greedy: the running sum (input 0) dtype must be F64";
  if (!half_or_float(in_dtypes[1])) return "greedy: the candidate (input 1) dtype must be F32, F16 or BF16";
  if (op == kGreedyAccept ? out_dtype != F64 : !half_or_float(out_dtype))
    return op == kGreedyAccept ? "greedy accept: output dtype must be F64 (the running sum)"
                               : "greedy candidate: output dtype must be F32, F16 or BF16";
  return nullptr;
}

template <typename T>
void put(unsigned char* base, std::size_t offset, std::size_t index, T value) {
  std::memcpy(base + offset + index * sizeof(T), &value, sizeof(T));
}

}  // namespace

int access_width(std::uint64_t out, int out_dtype, const std::uint64_t* ins, const int* in_dtypes, int k) {
  bool aligned = out % 16 == 0, narrow = out_dtype == F16 || out_dtype == BF16;
  for (int j = 0; j < k; ++j) {
    aligned = aligned && ins[j] % 16 == 0;
    narrow = narrow && (in_dtypes[j] == F16 || in_dtypes[j] == BF16);
  }
  return aligned ? (narrow ? 8 : 4) : 1;
}

std::int64_t tile_count(const std::int64_t* numels, std::int64_t tensors) {
  std::int64_t tiles = 0;
  for (std::int64_t t = 0; t < tensors; ++t) {
    if (numels[t] < 0) return -1;
    const std::int64_t chunks = (numels[t] + kTile - 1) / kTile;
    if (chunks > INT32_MAX) return -1;
    tiles += chunks;
  }
  return tiles;
}

std::int64_t pack_table(void* host, Op op, int width, std::int64_t tensors, int k, const std::uint64_t* outs,
                        const int* out_dtypes, const std::uint64_t* ins, const int* in_dtypes, const std::int64_t* numels,
                        const double* weights, double divisor, const char** error) {
  if (width != 1 && width != 4 && width != 8) {
    *error = "access width must be 1, 4 or 8";
    return -1;
  }
  if (!std::isfinite(divisor) || divisor == 0.0) {
    *error = "divisor must be finite and non-zero";
    return -1;
  }
  if (tensors > INT32_MAX) {
    *error = "more than 2^31 - 1 tensors";
    return -1;
  }
  const std::int64_t tiles = tile_count(numels, tensors);
  if (tiles < 0) {
    *error = "negative element count, or a tensor of 2^31 tiles or more";
    return -1;
  }
  const TableLayout l = table_layout(tensors, k, tiles);
  const std::size_t r = static_cast<std::size_t>(k) + 1;  // addresses (and dtypes) per tensor
  auto* b = static_cast<unsigned char*>(host);
  std::memset(b, 0, l.total);
  std::size_t tile = 0;
  for (std::int64_t t = 0; t < tensors; ++t) {
    const std::size_t ti = static_cast<std::size_t>(t);
    const std::size_t in_row = ti * static_cast<std::size_t>(k);
    if (const char* bad = check_dtypes(op, k, out_dtypes[t], in_dtypes + in_row)) {
      *error = bad;
      return -1;
    }
    const int allowed = access_width(outs[t], out_dtypes[t], ins + in_row, in_dtypes + in_row, k);
    if (width > allowed || (width == 8 && allowed == 4)) {
      *error = "a tensor's addresses or dtypes do not allow the requested access width";
      return -1;
    }
    for (int j = 0; j < k; ++j) {
      const std::size_t i = in_row + static_cast<std::size_t>(j);
      put<std::uint64_t>(b, l.addr, ti * r + static_cast<std::size_t>(j), ins[i]);
      b[l.dtype + ti * r + static_cast<std::size_t>(j)] = static_cast<unsigned char>(in_dtypes[i]);
    }
    put<std::uint64_t>(b, l.addr, ti * r + static_cast<std::size_t>(k), outs[t]);
    b[l.dtype + ti * r + static_cast<std::size_t>(k)] = static_cast<unsigned char>(out_dtypes[t]);
    put<std::int64_t>(b, l.numel, ti, numels[t]);
    const std::int64_t chunks = (numels[t] + kTile - 1) / kTile;
    for (std::int64_t c = 0; c < chunks; ++c, ++tile) {
      put<std::int32_t>(b, l.block, 2 * tile, static_cast<std::int32_t>(t));
      put<std::int32_t>(b, l.block, 2 * tile + 1, static_cast<std::int32_t>(c));
    }
  }
  for (int j = 0; j < k; ++j) put<double>(b, l.weight, static_cast<std::size_t>(j), weights[j]);
  put<double>(b, l.divisor, 0, divisor);
  return tiles;
}

}  // namespace cuda
}  // namespace soupkern
