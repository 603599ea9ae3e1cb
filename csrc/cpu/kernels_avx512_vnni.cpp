// Kernels for x86-64 CPUs with AVX-512 (F, BW) and VNNI: the AVX2 kernels
// with both dot products of attention taken in integers, 512 bits at a time
// (int_dot_avx512.h, int_dot_rows.h). dispatch.cpp
// calls them only after checking the CPU has those instructions.
#define KVSNAP_ISA avx512_vnni
#define KVSNAP_INT_DOT "int_dot_avx512.h"
#include "kernels_impl.h"
