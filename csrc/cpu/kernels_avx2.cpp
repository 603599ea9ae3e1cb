// Kernels for x86-64 CPUs with AVX2, FMA and F16C (compiled with those flags;
// dispatch.cpp calls them only after checking the CPU has them).
#define KVSNAP_ISA avx2
#include "kernels_impl.h"
