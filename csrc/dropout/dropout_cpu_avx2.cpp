// The Dropout CPU kernels of dropout_cpu.cpp compiled for AVX2 (see there and
// common/cpu_capability.h); empty where the compiler cannot target AVX2.
#define MK_CPU_AVX2_BUILD 1
#include "common/cpu_capability.h"

#ifdef MK_CPU_AVX2
#include "dropout/dropout_cpu.cpp"
#endif
