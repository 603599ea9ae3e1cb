// Standalone check of the CPU kernel sets, free of MLX and Python: every set
// this build and CPU can run against "generic" (the float reference), on
// random K/V quantized in the cache's layout, over a grid of bits, group
// sizes, head dims, GQA, decode and causal prefill, a window, masks and
// scores in the thousands.
// tools/check_neon.py cross-compiles it with csrc/cpu/*.cpp for arm64 and
// runs it under qemu; it builds natively as well.
//
//   kernel_check <tolerance> [required set ...]
//
// Prints the worst error per set; exits 1 if one is over the tolerance
// (max |out - ref| / max(1, max |ref|)) or a required set is missing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../csrc/cpu/kernels.h"

using namespace kvsnap::cpu;

namespace {

struct Case {
  int k_bits, v_bits, gs, D, L, T;
  bool causal;
  int window;
  int mask; // 0 none, 1 float, 2 bool, 3 a low-rank score bias (kvsnap.offsets), 4 that and the stored basis
  float scale = 0.f; // 0: 1 / sqrt(D)
};

// float16 of a float, to nearest even; magnitudes below 2^-14 become 0 (the
// scales and biases here are far above that).
uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x < 0x38800000u) {
    return sign;
  }
  x += 0xfffu + ((x >> 13) & 1u);
  return uint16_t(sign | ((x - 0x38000000u) >> 13));
}

float from_half(uint16_t h) {
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t x = exp ? (uint32_t(h & 0x8000u) << 16) | ((exp + 112) << 23) | (uint32_t(h & 0x3ffu) << 13)
                   : uint32_t(h & 0x8000u) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Packed codes and float16 scales/biases of [rows, D] values (MLX's affine
// layout: each row one little-endian bit stream, element e at bits
// [e * bits, (e + 1) * bits); at 6 bits an element may straddle two words).
struct Quantized {
  std::vector<uint32_t> packed;
  std::vector<uint16_t> scales, biases;
};

Quantized quantize(const std::vector<float>& x, int rows, int D, int gs, int bits) {
  Quantized q;
  const int levels = (1 << bits) - 1;
  q.packed.assign(size_t(rows) * D * bits / 32, 0);
  for (int r = 0; r < rows; ++r) {
    for (int g = 0; g < D / gs; ++g) {
      const float* w = &x[size_t(r) * D + g * gs];
      float lo = *std::min_element(w, w + gs), hi = *std::max_element(w, w + gs);
      uint16_t s16 = to_half(std::max((hi - lo) / levels, 1e-4f)), b16 = to_half(lo);
      float s = from_half(s16), b = from_half(b16);
      q.scales.push_back(s16);
      q.biases.push_back(b16);
      for (int i = 0; i < gs; ++i) {
        int c = std::clamp(int(std::lrint((w[i] - b) / s)), 0, levels);
        const size_t bit = (size_t(r) * D + g * gs + i) * bits;
        q.packed[bit / 32] |= uint32_t(c) << (bit % 32);
        if (bit % 32 + bits > 32) {
          q.packed[bit / 32 + 1] |= uint32_t(c) >> (32 - bit % 32);
        }
      }
    }
  }
  return q;
}

std::vector<float> run(const std::string& set, const Case& c, uint32_t seed) {
  const int B = 2, Hkv = 2, Hq = 8, D = c.D, T = c.T, G = D / c.gs;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto randn = [&](size_t n, float sd) {
    std::vector<float> v(n);
    for (auto& x : v) {
      x = sd * normal(rng);
    }
    return v;
  };
  std::vector<float> q = randn(size_t(B) * Hq * c.L * D, 1.f);
  const int rows = B * Hkv * T;
  Quantized k = quantize(randn(size_t(rows) * D, 1.f), rows, D, c.gs, c.k_bits);
  Quantized v = quantize(randn(size_t(rows) * D, 1.f), rows, D, c.gs, c.v_bits);
  std::vector<float> fmask = randn(size_t(B) * Hq * c.L * T, 2.f);
  std::vector<uint8_t> bmask(fmask.size());
  for (size_t i = 0; i < fmask.size(); ++i) {
    bmask[i] = fmask[i] > -2.f; // keeps ~84%
  }
  std::vector<int32_t> kv_len = {T, T - 37};
  // Score bias: rank 5 (coefficient rows of N(0, 0.3)), a table in blocks of 32.
  const int E = 5;
  std::vector<float> bias_w = randn(size_t(Hkv) * E * D, 0.3f);
  std::vector<float> bias_table = randn(size_t((T + 31) / 32) * E * 32, 1.f);

  AttentionArgs a;
  a.B = B;
  a.Hq = Hq;
  a.L = c.L;
  a.scale = c.scale > 0.f ? c.scale : 1.f / std::sqrt(float(D));
  a.q = q.data();
  a.q_dtype = DType::f32;
  std::vector<float> out(q.size());
  a.out = out.data();
  a.kv_len = kv_len.data();
  a.causal = c.causal;
  a.window = c.window;
  // The stored basis: queries times a per-KV-head scale, rotated, output rotated back.
  std::vector<float> query_scale = randn(size_t(Hkv) * D, 0.3f);
  for (float& x : query_scale) {
    x = 1.f + x;
  }
  if (c.mask == 4) {
    a.rotate = true;
    a.query_scale = query_scale.data();
  }
  if (c.mask >= 3) {
    a.bias_w = bias_w.data();
    a.bias_table = bias_table.data();
    a.bias_rank = E;
  } else if (c.mask) {
    a.mask = c.mask == 1 ? static_cast<const void*>(fmask.data()) : bmask.data();
    a.mask_is_bool = c.mask == 2;
    int64_t st[4] = {int64_t(Hq) * c.L * T, int64_t(c.L) * T, T, 1};
    std::copy(st, st + 4, a.mask_stride);
  }
  QuantSource& s = a.kv;
  s.k_bits = c.k_bits;
  s.v_bits = c.v_bits;
  s.group_size = c.gs;
  s.head_dim = D;
  s.n_kv_heads = Hkv;
  s.scale_dtype = DType::f16;
  s.n_tokens = T;
  const void* ptr[6] = {k.packed.data(), k.scales.data(), k.biases.data(),
                        v.packed.data(), v.scales.data(), v.biases.data()};
  int64_t row_elems[6] = {D * c.k_bits / 32, G, G, D * c.v_bits / 32, G, G};
  for (int i = 0; i < 6; ++i) {
    s.ptr[i] = ptr[i];
    s.stride[i][0] = int64_t(Hkv) * T * row_elems[i];
    s.stride[i][1] = int64_t(T) * row_elems[i];
    s.stride[i][2] = row_elems[i];
  }
  set_isa(set.c_str());
  attention(a);
  return out;
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: kernel_check <tolerance> [required set ...]\n");
    return 2;
  }
  const double tol = std::atof(argv[1]);
  std::vector<std::string> sets = available_isas();
  int failed = 0;
  for (int i = 2; i < argc; ++i) {
    if (std::find(sets.begin(), sets.end(), argv[i]) == sets.end()) {
      std::printf("FAIL: kernel set %s is not available here\n", argv[i]);
      ++failed;
    }
  }
  std::vector<Case> cases;
  const int bits[6][2] = {{4, 4}, {8, 8}, {8, 4}, {4, 8}, {6, 4}, {6, 8}};
  for (auto& kv : bits) {
    for (int gs : {32, 64, 128}) {
      for (int D : {64, 128}) {
        if (gs > D) {
          continue;
        }
        cases.push_back({kv[0], kv[1], gs, D, 1, 300, false, 0, 0}); // decode
        cases.push_back({kv[0], kv[1], gs, D, 7, 90, true, 0, 0}); // causal prefill
      }
    }
    cases.push_back({kv[0], kv[1], 64, 128, 1, 1100, false, 0, 0}); // split across tasks
    cases.push_back({kv[0], kv[1], 64, 128, 5, 200, true, 40, 0}); // window
    cases.push_back({kv[0], kv[1], 32, 64, 3, 150, false, 0, 1}); // float mask
    cases.push_back({kv[0], kv[1], 64, 64, 1, 150, false, 0, 2}); // bool mask
    cases.push_back({kv[0], kv[1], 64, 64, 1, 300, false, 0, 3}); // score bias, decode
    cases.push_back({kv[0], kv[1], 64, 64, 9, 150, true, 50, 3}); // score bias, prefill, window
    if (kv[1] == 8) {
      // Bias, scaled and rotated queries, the output rotated back. 8-bit values
      // only: rotating the output back gathers the int8 weights' rounding of
      // these random (unrotated) values, equal across a group's elements, into
      // a few elements (0.15-0.2 of the largest output with 4-bit values).
      cases.push_back({kv[0], kv[1], 64, 64, 4, 150, true, 0, 4});
    }
    if (kv[0] == 8) {
      // Scores in the thousands (probabilities down to 0 through denormals).
      // With 4-bit keys the int8 queries flip near ties of such peaked
      // softmaxes (every integer set, by 0.06 to 1): 8-bit keys only.
      cases.push_back({kv[0], kv[1], 64, 64, 2, 600, true, 0, 0, 50.f});
    }
  }
  std::map<std::string, double> worst;
  uint32_t seed = 1;
  for (const Case& c : cases) {
    ++seed;
    std::vector<float> ref = run("generic", c, seed);
    double ref_max = 1.0;
    for (float x : ref) {
      ref_max = std::max(ref_max, double(std::abs(x)));
    }
    for (const std::string& set : sets) {
      if (set == "generic") {
        continue;
      }
      std::vector<float> out = run(set, c, seed);
      double err = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        double d = std::abs(double(out[i]) - ref[i]);
        err = std::isfinite(out[i]) ? std::max(err, d) : INFINITY;
      }
      err /= ref_max;
      worst[set] = std::max(worst[set], err);
      if (!(err <= tol)) {
        std::printf(
            "FAIL %s: k%d v%d gs%d D%d L%d T%d causal=%d window=%d mask=%d: error %.3g > %.3g\n",
            set.c_str(), c.k_bits, c.v_bits, c.gs, c.D, c.L, c.T, c.causal, c.window, c.mask,
            err, tol);
        ++failed;
      }
    }
  }
  for (const auto& [set, err] : worst) {
    std::printf("%s: %zu cases, worst error %.3g (tolerance %.3g)\n", set.c_str(), cases.size(), err, tol);
  }
  std::printf(failed ? "kernel_check: %d failures\n" : "kernel_check: ok\n", failed);
  return failed ? 1 : 0;
}
