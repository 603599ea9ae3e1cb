// Parts of the integer-dot attention shared by the x86 instruction sets
// (int_dot_avx2.h, int_dot_avx512.h): both compile with AVX2, FMA and F16C.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int_dot_common.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

// The 4 bytes at p as one int32.
inline int32_t load4(const int8_t* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// load_params (int_dot_common.h); float16 in rows of 1 or 2 groups with
// nothing between them (kvsnap's default format: head_dim 64 or 128, groups
// of 64) converts 8 keys at a time.
template <DType SD>
inline void load_params8(const char* p, int64_t st, int G, int n, float* out, int ost) {
  if constexpr (SD == DType::f16) {
    if (n == 8 && st == G && G == 1) {
      _mm256_store_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      return;
    }
    if (n == 8 && st == G && G == 2) {
      // [k0g0 k0g1 k1g0 ...]: keys 0-3 and 4-7, each split into g0 | g1 halves.
      const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
      __m256 a = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), split);
      __m256 b = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1)), split);
      _mm256_store_ps(out, _mm256_permute2f128_ps(a, b, 0x20));
      _mm256_store_ps(out + ost, _mm256_permute2f128_ps(a, b, 0x31));
      return;
    }
  }
  load_params<SD>(p, st, G, n, out, ost);
}

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA
