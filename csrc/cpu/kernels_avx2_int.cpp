// Kernels for x86-64 CPUs with AVX2, FMA and F16C but no VNNI (AVX-512 or
// AVX-VNNI): the AVX2 kernels with both dot products of attention taken in
// integers (int_dot_avx2.h, vpmaddubsw). dispatch.cpp calls them only after checking
// the CPU has those instructions; it never makes them the default where
// "avx2-vnni" or "avx512-vnni" runs.
#define KVSNAP_ISA avx2_int
#define KVSNAP_INT_DOT "int_dot_avx2.h"
#include "kernels_impl.h"
