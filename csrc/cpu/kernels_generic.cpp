// Kernels for the baseline target (SSE2 on x86-64, NEON on arm64).
#define KVSNAP_ISA generic
#include "kernels_impl.h"
