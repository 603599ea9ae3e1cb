// Kernels for x86-64 CPUs with AVX-512 (F, BW) and VNNI: the AVX2 kernels
// with query-key scores taken in integers (int_dot_avx512.h). dispatch.cpp
// calls them only after checking the CPU has those instructions.
#define KVSNAP_ISA avx512_vnni
#define KVSNAP_INT_DOT "int_dot_avx512.h"
#include "kernels_impl.h"
