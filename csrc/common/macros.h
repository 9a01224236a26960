// Portability macros shared by the CPU (.cpp) and CUDA (.cu) sides of every op family.
#pragma once

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#define MK_UNROLL _Pragma("unroll")
#else
#define MK_HOST_DEVICE inline
#define MK_UNROLL _Pragma("GCC unroll 16")
#endif
