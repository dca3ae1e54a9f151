// Compiles kernel-family headers once per instruction set (see cpu_simd.h). NO include guard on
// purpose: a .cpp defines LIGHTNET_OPS_KERNELS_HEADER (a header's name, in quotes) and, if it needs
// more families, LIGHTNET_OPS_KERNELS_HEADER2 / _HEADER3, includes this file, and gets the shared
// SIMD layer (cpu_vec.h) and those headers' functions in lightnet_ops::cpu::isa_default, isa_avx2
// and isa_avx512, each namespace with its own `constexpr int kVecBytes` (the register width in
// bytes) and, on x86, inside the matching target region. Standard headers, cpu_simd.h and whatever
// the kernel headers use must already be included.
#ifndef LIGHTNET_OPS_KERNELS_HEADER
#error "define LIGHTNET_OPS_KERNELS_HEADER before including lightnet_ops/cpu_isa_variants.h"
#endif

namespace lightnet_ops {
namespace cpu {
namespace isa_default {
using namespace ::lightnet_ops::cpu;
constexpr int kVecBytes = 16;
#include "lightnet_ops/cpu_vec.h"
#include LIGHTNET_OPS_KERNELS_HEADER
#ifdef LIGHTNET_OPS_KERNELS_HEADER2
#include LIGHTNET_OPS_KERNELS_HEADER2
#endif
#ifdef LIGHTNET_OPS_KERNELS_HEADER3
#include LIGHTNET_OPS_KERNELS_HEADER3
#endif
}  // namespace isa_default
}  // namespace cpu
}  // namespace lightnet_ops

#if LIGHTNET_OPS_X86_DISPATCH
LIGHTNET_OPS_TARGET_BEGIN(LIGHTNET_OPS_ISA_AVX2)
namespace lightnet_ops {
namespace cpu {
namespace isa_avx2 {
using namespace ::lightnet_ops::cpu;
constexpr int kVecBytes = 32;
#include "lightnet_ops/cpu_vec.h"
#include LIGHTNET_OPS_KERNELS_HEADER
#ifdef LIGHTNET_OPS_KERNELS_HEADER2
#include LIGHTNET_OPS_KERNELS_HEADER2
#endif
#ifdef LIGHTNET_OPS_KERNELS_HEADER3
#include LIGHTNET_OPS_KERNELS_HEADER3
#endif
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace lightnet_ops
LIGHTNET_OPS_TARGET_END

LIGHTNET_OPS_TARGET_BEGIN(LIGHTNET_OPS_ISA_AVX512)
namespace lightnet_ops {
namespace cpu {
namespace isa_avx512 {
using namespace ::lightnet_ops::cpu;
constexpr int kVecBytes = 64;
#include "lightnet_ops/cpu_vec.h"
#include LIGHTNET_OPS_KERNELS_HEADER
#ifdef LIGHTNET_OPS_KERNELS_HEADER2
#include LIGHTNET_OPS_KERNELS_HEADER2
#endif
#ifdef LIGHTNET_OPS_KERNELS_HEADER3
#include LIGHTNET_OPS_KERNELS_HEADER3
#endif
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace lightnet_ops
LIGHTNET_OPS_TARGET_END
#endif

#undef LIGHTNET_OPS_KERNELS_HEADER
#undef LIGHTNET_OPS_KERNELS_HEADER2
#undef LIGHTNET_OPS_KERNELS_HEADER3
