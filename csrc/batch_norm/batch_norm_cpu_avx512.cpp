// The BatchNorm CPU kernels of batch_norm_cpu.cpp compiled for AVX-512 (see there and
// common/cpu_capability.h); empty where the compiler cannot target x86-64 extensions.
#define MK_CPU_AVX512_BUILD 1
#include "common/cpu_capability.h"

#ifdef MK_CPU_AVX2
#include "batch_norm/batch_norm_cpu.cpp"
#endif
