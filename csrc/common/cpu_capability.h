// Which instruction set the CPU kernels use, chosen once per process at run time.
//
// The extension is built for the baseline x86-64 ISA (SSE2), so that it loads on any x86-64 CPU.
// Kernels whose loops gain from wider vectors are compiled twice more, in the same .so under
// `#pragma GCC target`: for AVX2 and F16C, and for AVX-512 (F, BW, VL, DQ and BF16, with 512-bit
// vectors preferred). The widest build the CPU has runs where torch runs kernels as wide: the
// AVX-512 build under torch's AVX512 kernels, the AVX2 build under its AVX2 ones, so that
// ATEN_CPU_CAPABILITY, torch's switch, picks for both ("avx2", "default"). No build contracts
// multiply-adds (setup.py: -ffp-contract=off, as AVX-512F brings fused ones) and all sum in the
// same order, so all three give the same bits.
#pragma once

#include <ATen/Version.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define MK_CPU_AVX2 1
#endif

// A kernel file built three times (batch_norm_cpu.cpp, dropout_cpu.cpp) puts MK_CPU_ISA_TARGET
// after its includes, so that what it includes keeps the baseline ISA unless it asks for more
// (common/staged.h), and its kernels in namespace MK_CPU_ISA. Its *_avx2.cpp and *_avx512.cpp
// twins define MK_CPU_AVX2_BUILD or MK_CPU_AVX512_BUILD before any include, then include it.
// MK_CPU_ISA_LEVEL: 0 baseline, 1 AVX2 and F16C, 2 AVX-512. MK_CPU_ISA_TARGET_LIST: the build's
// GCC target options (also the target attribute of common/staged.h's functions).
#if defined(MK_CPU_AVX512_BUILD) && defined(MK_CPU_AVX2)
#define MK_CPU_ISA avx512
#define MK_CPU_ISA_LEVEL 2
#define MK_CPU_ISA_TARGET_LIST "avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,prefer-vector-width=512"
#elif defined(MK_CPU_AVX2_BUILD) && defined(MK_CPU_AVX2)
#define MK_CPU_ISA avx2
#define MK_CPU_ISA_LEVEL 1
#define MK_CPU_ISA_TARGET_LIST "avx2,f16c"
#else
#define MK_CPU_ISA baseline
#define MK_CPU_ISA_LEVEL 0
#endif
#if MK_CPU_ISA_LEVEL >= 1
#define MK_CPU_PRAGMA_(x) _Pragma(#x)
#define MK_CPU_PRAGMA(x) MK_CPU_PRAGMA_(x)
#define MK_CPU_ISA_TARGET MK_CPU_PRAGMA(GCC target(MK_CPU_ISA_TARGET_LIST))
#else
#define MK_CPU_ISA_TARGET
#endif
// Defined in the file that registers the ops: the baseline build.
#if !defined(MK_CPU_AVX2_BUILD) && !defined(MK_CPU_AVX512_BUILD)
#define MK_CPU_BASELINE_BUILD 1
#endif

namespace modekernels {

// torch's kernels are AVX2 or AVX-512 ones where at::get_cpu_capability() says "AVX2" or
// "AVX512"; its baseline reads "DEFAULT", or "NO AVX" before torch 2.9.
inline bool cpu_avx2() {
#ifdef MK_CPU_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           (at::get_cpu_capability() == "AVX2" || at::get_cpu_capability() == "AVX512");
  return avx2;
#else
  return false;
#endif
}

inline bool cpu_avx512() {
#ifdef MK_CPU_AVX2
  static const bool avx512 =
      cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16") && at::get_cpu_capability() == "AVX512";
  return avx512;
#else
  return false;
#endif
}

// "AVX512", "AVX2" or "DEFAULT": the build in use (modekernels._C.cpu_capability in Python).
inline const char* cpu_capability() {
  return cpu_avx512() ? "AVX512" : cpu_avx2() ? "AVX2" : "DEFAULT";
}

}  // namespace modekernels
