// Element types of the Metal kernels. bfloat16 is carried as its bit
// pattern (`bf16`) and converted by hand, so the kernels need no Metal 3.1
// `bfloat` type and round exactly as the CPU kernels do.
#pragma once

#include <metal_stdlib>

using namespace metal;

struct bf16 {
  ushort bits;
};

inline float to_float(float x) {
  return x;
}
inline float to_float(half x) {
  return float(x);
}
inline float to_float(bf16 x) {
  return as_type<float>(uint(x.bits) << 16);
}

// Round to nearest even, as csrc/cpu/simd.h does; NaN stays NaN.
inline bf16 float_to_bf16(float x) {
  uint u = as_type<uint>(x);
  bf16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = ushort((u >> 16) | 0x40u);
  } else {
    out.bits = ushort((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}

inline void store_float(device float* p, long i, float x) {
  p[i] = x;
}
inline void store_float(device half* p, long i, float x) {
  p[i] = half(x);
}
inline void store_float(device bf16* p, long i, float x) {
  p[i] = float_to_bf16(x);
}
