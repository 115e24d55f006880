// weighted_sum_range compiled for the generic ISA level (selected at run time in dispatch.cpp).
// Standard headers come before the target pragma so none of their inline code is compiled
// for this target; the implementation has internal linkage.
#include <cstddef>
#include <cstdint>

#include "soupkern.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#endif

namespace soupkern {
namespace isa_generic {
#include "wsum_impl.inc"
}  // namespace isa_generic
}  // namespace soupkern
