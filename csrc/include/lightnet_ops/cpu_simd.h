// Runtime instruction-set selection for the CPU kernels.
//
// Kernel bodies are written once with GCC/Clang vector extensions, over the one SIMD layer
// cpu_vec.h, in per-family headers that carry no include guard (cpu_*_kernels.h). A .cpp includes
// them several times, each time inside its own namespace and inside a "target region" that
// compiles every function in it for one instruction set (AVX-512, AVX2+FMA, or the build's
// baseline), and picks the namespace at run time with cpu_isa() (cpu_isa_variants.h does the
// repeated inclusion). The default build stays portable (no -march flags): wider code only runs
// where the CPU says it may. Everything a kernel calls must be defined inside the region (helpers
// defined outside would be compiled, and their vector code lowered, for the baseline target).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LIGHTNET_OPS_X86_DISPATCH 1
#else
#define LIGHTNET_OPS_X86_DISPATCH 0
#endif

#if defined(__clang__)
#define LIGHTNET_OPS_TARGET_BEGIN(isa) \
  _Pragma(LIGHTNET_OPS_STR(clang attribute push(__attribute__((target(isa))), apply_to = function)))
#define LIGHTNET_OPS_TARGET_END _Pragma("clang attribute pop")
#elif defined(__GNUC__)
#define LIGHTNET_OPS_TARGET_BEGIN(isa) _Pragma("GCC push_options") _Pragma(LIGHTNET_OPS_STR(GCC target(isa)))
#define LIGHTNET_OPS_TARGET_END _Pragma("GCC pop_options")
#endif
#define LIGHTNET_OPS_STR(x) #x

#define LIGHTNET_OPS_ISA_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#define LIGHTNET_OPS_ISA_AVX2 "avx2,fma"

#define LIGHTNET_OPS_INLINE inline __attribute__((always_inline))

// Register-block loops must be fully unrolled early, or the accumulator arrays stay in memory.
#define LIGHTNET_OPS_UNROLL _Pragma("GCC unroll 16")

namespace lightnet_ops {
namespace cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// A test / experiment override of a kernel choice: 1 if the variable `name` is `on`, 0 if it is
// `off`, -1 (use the heuristic) if it is unset or anything else. Read on every call, like
// LIGHTNET_OPS_CPU_ISA below, so that a test can switch it.
inline int env_choice(const char* name, const char* on, const char* off) {
  const char* env = std::getenv(name);
  if (env == nullptr) return -1;
  const std::string v(env);
  return v == on ? 1 : (v == off ? 0 : -1);
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "default";
}

// The widest instruction set this CPU runs, capped by LIGHTNET_OPS_CPU_ISA (default|avx2|avx512),
// which lets the tests run every variant on one machine. The environment is read on every call (a
// getenv, negligible next to a kernel) so a test can switch it; the CPUID probe is cached.
inline Isa cpu_isa() {
#if LIGHTNET_OPS_X86_DISPATCH
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("LIGHTNET_OPS_CPU_ISA")) {
    const std::string v(env);
    cap = v == "default" ? Isa::kDefault : v == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  }
  return static_cast<int>(best) < static_cast<int>(cap) ? best : cap;
#else
  return Isa::kDefault;
#endif
}

// Whether this is an Intel CPU (the CPUID vendor), whose BLAS (MKL) runs its own tuned code.
inline bool cpu_is_intel() {
#if LIGHTNET_OPS_X86_DISPATCH
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") > 0;
  }();
  return intel;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace lightnet_ops
