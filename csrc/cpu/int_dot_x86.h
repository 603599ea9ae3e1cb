// Parts of the integer-dot attention shared by the x86 instruction sets
// (int_dot_avx2.h, int_dot_avx512.h): both compile with AVX2, FMA and F16C.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// The score loops of a column block of a tile, shared by int_dot_avx2.h's
// int_scores8 and int_dot_avx512.h's score_keys16 (kCols dword columns to
// a whole block): part(r0, nr, c, cnt, g) for each group of up to 4 query
// rows [r0, r0 + nr) (nr a std::integral_constant, so the rows' sums are
// registers) and each run of columns [c, c + cnt) of the block in one key
// group g. cnt is a constant where the block is whole (n_cols == kCols), so
// the loops over columns unroll.
template <int kCols, typename Part>
__attribute__((always_inline)) inline void for_score_parts(int R, int n_cols, int col0, int cols_per_group, Part part) {
  for (int r0 = 0; r0 < R; r0 += 4) {
    auto rows = [&](auto nr) __attribute__((always_inline)) {
      if (n_cols == kCols && cols_per_group % kCols == 0) {
        part(r0, nr, 0, kCols, col0 / cols_per_group); // group sizes of 64 x k (4-bit) or 32 x k (8-bit) at kCols 8
      } else if (n_cols == kCols && cols_per_group == kCols / 2) {
        part(r0, nr, 0, kCols / 2, col0 / cols_per_group);
        part(r0, nr, kCols / 2, kCols / 2, col0 / cols_per_group + 1);
      } else {
        for (int c = 0; c < n_cols;) {
          int g = (col0 + c) / cols_per_group;
          int c_end = std::min(n_cols, (g + 1) * cols_per_group - col0);
          part(r0, nr, c, c_end - c, g);
          c = c_end;
        }
      }
    };
    switch (std::min(4, R - r0)) {
      case 4: rows(std::integral_constant<int, 4>{}); break;
      case 3: rows(std::integral_constant<int, 3>{}); break;
      case 2: rows(std::integral_constant<int, 2>{}); break;
      default: rows(std::integral_constant<int, 1>{}); break;
    }
  }
}

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA
