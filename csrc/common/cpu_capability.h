// Which instruction set the CPU kernels use, chosen once per process at run time.
//
// The extension is built for the baseline x86-64 ISA (SSE2), so that it loads on any x86-64 CPU.
// Kernels whose loops gain from wider vectors are also compiled for AVX2 and F16C (in the same .so,
// under `#pragma GCC target`, without FMA so that both builds round alike), and the AVX2 build
// runs where the CPU has both and torch runs its own AVX2 (or AVX-512) kernels: setting
// ATEN_CPU_CAPABILITY=default, torch's switch, makes both torch and modekernels use their
// baseline kernels.
#pragma once

#include <ATen/Version.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define MK_CPU_AVX2 1
#endif

// A kernel file built twice (batch_norm_cpu.cpp, dropout_cpu.cpp) puts MK_CPU_ISA_TARGET after its
// includes, so that everything it includes keeps the baseline ISA (the inline functions both
// builds share are then the same code in both), and its kernels in namespace MK_CPU_ISA. Its
// *_avx2.cpp twin defines MK_CPU_AVX2_BUILD before any include, then includes it.
// MK_CPU_ISA_F16C: whether this build may use AVX2 and F16C (common/staged.h).
#if defined(MK_CPU_AVX2_BUILD) && defined(MK_CPU_AVX2)
#define MK_CPU_ISA avx2
#define MK_CPU_ISA_TARGET _Pragma("GCC target(\"avx2,f16c\")")
#define MK_CPU_ISA_F16C true
#else
#define MK_CPU_ISA baseline
#define MK_CPU_ISA_TARGET
#define MK_CPU_ISA_F16C false
#endif

namespace modekernels {

inline bool cpu_avx2() {
#ifdef MK_CPU_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           at::get_cpu_capability() != "DEFAULT";
  return avx2;
#else
  return false;
#endif
}

// "AVX2" or "DEFAULT": the build cpu_avx2() picks (modekernels._C.cpu_capability in Python).
inline const char* cpu_capability() {
  return cpu_avx2() ? "AVX2" : "DEFAULT";
}

}  // namespace modekernels
