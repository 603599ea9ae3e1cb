// The part of the Metal standard library that is plain computation, shared
// by the two stand-ins for <metal_stdlib>: shim/metal_stdlib (declarations
// for the g++ type-check, tools/check_metal.py) and emu/metal_stdlib (the
// emulation that runs the kernels on CPU threads, tests/test_metal_emulated.py).
// Types, bit casts, IEEE binary16 `half` and the math functions, with
// Metal's signatures. Add to it only what the kernels use.
#pragma once

#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong; // 64-bit, as in Metal (LP64 hosts)

namespace metal {

template <typename To, typename From>
To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of one size");
  return __builtin_bit_cast(To, x);
}

// IEEE binary16, stored as its bit pattern; conversions round to nearest
// even, as the GPU's do, so a kernel's half outputs have half precision.
inline ushort float_to_half_bits(float f) {
  const uint x = as_type<uint>(f);
  const uint sign = (x >> 16) & 0x8000u;
  const uint ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) {
    return ushort(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); // NaN stays NaN
  }
  if (ax >= 0x477ff000u) {
    return ushort(sign | 0x7c00u); // 65520 and up round to infinity
  }
  if (ax < 0x38800000u) {
    // Below 2^-14: a subnormal half, m * 2^-24; scaling by 2^24 is exact.
    return ushort(sign | uint(__builtin_rintf(as_type<float>(ax) * 16777216.0f)));
  }
  const uint rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return ushort(sign | ((rounded - 0x38000000u) >> 13));
}

inline float half_bits_to_float(ushort h) {
  const uint sign = uint(h & 0x8000u) << 16;
  const uint e = (h >> 10) & 0x1fu;
  const uint m = h & 0x3ffu;
  if (e == 0) {
    const float v = float(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) {
    return as_type<float>(sign | 0x7f800000u | (m << 13));
  }
  return as_type<float>(sign | ((e + 112u) << 23) | (m << 13));
}

struct half {
  ushort bits;
  half() = default;
  explicit half(float x) : bits(float_to_half_bits(x)) {}
  operator float() const { return half_bits_to_float(bits); }
};

struct uint3 {
  uint x, y, z;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

template <typename T> T max(T a, T b) { return a > b ? a : b; }
template <typename T> T min(T a, T b) { return a < b ? a : b; }
template <typename T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fabs(float x) { return __builtin_fabsf(x); }
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float rint(float x) { return __builtin_rintf(x); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float ceil(float x) { return __builtin_ceilf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }

namespace fast {
inline float exp(float x) { return __builtin_expf(x); }
} // namespace fast

} // namespace metal

// Metal has these types at global scope as well.
using metal::half;
using metal::uint3;
using metal::float2;
using metal::float4;
