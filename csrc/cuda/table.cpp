// Host side of the CUDA kernels' launch table (layout in soupkern_cuda.h). Plain C++: no CUDA.
#include <cstring>

#include "soupkern_cuda.h"

namespace soupkern {
namespace cuda {

namespace {

bool half_or_float(int dt) { return dt == F32 || dt == F16 || dt == BF16; }

template <typename T>
void put(unsigned char* base, std::size_t offset, std::size_t index, T value) {
  std::memcpy(base + offset + index * sizeof(T), &value, sizeof(T));
}

}  // namespace

int access_width(std::uint64_t out, int out_dtype, const std::uint64_t* ins, const int* in_dtypes, int k) {
  bool aligned = out % 16 == 0, narrow = out_dtype != F32;
  for (int j = 0; j < k; ++j) {
    aligned = aligned && ins[j] % 16 == 0;
    narrow = narrow && in_dtypes[j] != F32;
  }
  return aligned ? (narrow ? 8 : 4) : 1;
}

std::int64_t pack_table(void* host, int width, std::int64_t tensors, int k, const std::uint64_t* outs, const int* out_dtypes,
                        const std::uint64_t* ins, const int* in_dtypes, const std::int64_t* numels,
                        const float* weights, const char** error) {
  if (width != 1 && width != 4 && width != 8) {
    *error = "access width must be 1, 4 or 8";
    return -1;
  }
  const TableLayout l = table_layout(tensors, k);
  auto* b = static_cast<unsigned char*>(host);
  std::memset(b, 0, l.total);
  std::int64_t tiles = 0;
  for (std::int64_t t = 0; t < tensors; ++t) {
    const std::size_t ti = static_cast<std::size_t>(t);
    const std::size_t row = ti * static_cast<std::size_t>(k);
    if (numels[t] < 0) {
      *error = "negative element count";
      return -1;
    }
    if (!half_or_float(out_dtypes[t])) {
      *error = "output dtype must be F32, F16 or BF16";
      return -1;
    }
    for (int j = 0; j < k; ++j) {
      if (!half_or_float(in_dtypes[row + static_cast<std::size_t>(j)])) {
        *error = "input dtype must be F32, F16 or BF16";
        return -1;
      }
    }
    const int allowed = access_width(outs[t], out_dtypes[t], ins + row, in_dtypes + row, k);
    if (width > allowed || (width == 8 && allowed == 4)) {
      *error = "a tensor's addresses or dtypes do not allow the requested access width";
      return -1;
    }
    put<std::int64_t>(b, l.tile_start, ti, tiles);
    tiles += (numels[t] + kTile - 1) / kTile;
    put<std::uint64_t>(b, l.out, ti, outs[t]);
    put<std::int64_t>(b, l.numel, ti, numels[t]);
    b[l.dtype + ti * (k + 1)] = static_cast<unsigned char>(out_dtypes[t]);
    for (int j = 0; j < k; ++j) {
      const std::size_t i = row + static_cast<std::size_t>(j);
      put<std::uint64_t>(b, l.in, i, ins[i]);
      b[l.dtype + ti * (k + 1) + 1 + static_cast<std::size_t>(j)] = static_cast<unsigned char>(in_dtypes[i]);
    }
  }
  put<std::int64_t>(b, l.tile_start, static_cast<std::size_t>(tensors), tiles);
  for (int j = 0; j < k; ++j) put<float>(b, l.weight, static_cast<std::size_t>(j), weights[j]);
  return tiles;
}

}  // namespace cuda
}  // namespace soupkern
