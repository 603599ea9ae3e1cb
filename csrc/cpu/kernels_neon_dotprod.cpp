// Kernels for arm64 CPUs with the dot-product extension (Armv8.2-A+dotprod):
// the baseline kernels with both dot products of attention taken in
// integers (int_dot_neon.h, sdot). dispatch.cpp calls them only after
// getauxval(AT_HWCAP) reports HWCAP_ASIMDDP.
#define KVSNAP_ISA neon_dotprod
#define KVSNAP_INT_DOT "int_dot_neon.h"
#include "kernels_impl.h"
