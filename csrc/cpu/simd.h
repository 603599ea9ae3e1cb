// 8-lane float/int vectors written with GCC/Clang vector extensions, so one
// kernel source compiles to SSE2 (baseline x86-64), AVX2+FMA, or NEON.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__F16C__) || defined(__AVX__))
#include <immintrin.h>
#endif

namespace kvsnap::cpu::simd {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

inline v8f splat(float x) {
  return v8f{x, x, x, x, x, x, x, x};
}

inline v8u splat_u(uint32_t x) {
  return v8u{x, x, x, x, x, x, x, x};
}

inline v8f load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, v8f v) {
  std::memcpy(p, &v, sizeof(v));
}

inline float hsum(v8f v) {
#if defined(__AVX__)
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
#else
  float a = (v[0] + v[4]) + (v[1] + v[5]);
  float b = (v[2] + v[6]) + (v[3] + v[7]);
  return a + b;
#endif
}

inline float hmax(v8f v) {
#if defined(__AVX__)
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  m = _mm_max_ps(_mm_movehl_ps(m, m), m);
  m = _mm_max_ss(_mm_shuffle_ps(m, m, 1), m);
  return _mm_cvtss_f32(m);
#else
  float m = v[0];
  for (int i = 1; i < 8; ++i) {
    m = v[i] > m ? v[i] : m;
  }
  return m;
#endif
}

inline v8f to_float(v8u x) {
  return __builtin_convertvector(reinterpret_cast<v8i&>(x), v8f);
}

// exp(x) for x <= 0, relative error ~2e-7; inputs below -87.3 (and -inf)
// give exactly 0.
inline v8f exp_neg(v8f x) {
  const v8f lo = splat(-87.3f);
  v8i zero_mask = x < lo; // all ones where the result must be 0
  x = x < lo ? lo : x;
  // x = n ln2 + r, |r| <= ln2 / 2
  v8f n = x * splat(1.44269504088896341f);
  // round to nearest: add and subtract 1.5 * 2^23
  const v8f magic = splat(12582912.0f);
  n = (n + magic) - magic;
  v8f r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  v8f y = p * scale;
  v8i yi;
  std::memcpy(&yi, &y, sizeof(yi));
  yi &= ~zero_mask;
  std::memcpy(&y, &yi, sizeof(y));
  return y;
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    float f = float(mant) * 5.9604644775390625e-8f; // 2^-24
    return sign ? -f : f;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// Round to nearest even, like a float32 -> float16 cast.
inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  uint16_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {
    return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);
  }
  if (x >= 0x477ff000u) {
    return sign | 0x7c00u;
  }
  if (x < 0x38800000u) {
    float a;
    std::memcpy(&a, &x, sizeof(a));
    return sign | uint16_t(std::nearbyint(a * 16777216.0f));
  }
  x += 0xfffu + ((x >> 13) & 1u);
  x -= 0x38000000u;
  return sign | uint16_t(x >> 13);
#endif
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((x >> 16) | 0x40u);
  }
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

} // namespace kvsnap::cpu::simd
