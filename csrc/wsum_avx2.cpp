// weighted_sum_range compiled for the avx2 ISA level (selected at run time in dispatch.cpp).
// Standard headers come before the target pragma so none of their inline code is compiled
// for this target; the implementation has internal linkage.
#include <cstddef>
#include <cstdint>

#include "soupkern.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#include <immintrin.h>
#define SOUPKERN_ISA_AVX2 1
#endif

namespace soupkern {
namespace isa_avx2 {
#include "wsum_impl.inc"
}  // namespace isa_avx2
}  // namespace soupkern
