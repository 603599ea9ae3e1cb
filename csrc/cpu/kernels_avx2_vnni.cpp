// Kernels for x86-64 CPUs with AVX2 and AVX-VNNI but no AVX-512 (Intel's
// client cores since Alder Lake): "avx2-int" with each four-product dot
// step one 256-bit vpdpbusd (int_dot_avx2.h, KVSNAP_AVX_VNNI), so 8-bit
// planes keep int8 of full range. dispatch.cpp calls them only after
// checking the CPU has those instructions; it never makes them the default
// where "avx512-vnni" runs.
#define KVSNAP_ISA avx2_vnni
#define KVSNAP_AVX_VNNI 1
#define KVSNAP_INT_DOT "int_dot_avx2.h"
#include "kernels_impl.h"
