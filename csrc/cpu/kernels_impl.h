// The CPU kernels. Included once per instruction set by kernels_generic.cpp
// and kernels_avx2.cpp, each defining KVSNAP_ISA to its namespace name.
//
// Attention is flash-decoding: the rows of a tile (the query heads of one KV
// head times some query positions) walk the keys in chunks of kChunk tokens;
// each chunk dequantizes one K row at a time into registers/L1, scores it for
// every row, updates the running max and sum of the softmax, then walks the V
// rows of the same chunk. Long contexts are split across tasks whose partial
// (max, sum, accumulator) triples are merged at the end. Float K/V and the
// score matrix are never materialized.
#pragma once

#ifndef KVSNAP_ISA
#error "define KVSNAP_ISA before including kernels_impl.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../layout.h"
#include "kernels.h"
#include "simd.h"
#include "thread_pool.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

using namespace simd;

constexpr int kChunk = 32; // keys per softmax update
constexpr int kMaxRows = 32; // query rows per tile
constexpr int kSplitKeys = 512; // at least this many keys per part of a split tile
// At most this many parts: one per thread (to fill the threads where tiles
// are few), at least 2 and at most 16. Each part costs some microseconds
// besides its keys (setup, its first chunk's fetch, the merge): with 8 KV
// heads on 2 threads, at most 2 parts instead of 4 made a decode call
// 0.3-1.5% faster at 32K and 3-4% at 4K on an Intel Xeon (Sapphire
// Rapids), and at most 4 instead of 16 1.3-3.8% on AMD Zen 3 (RESULTS.md).
// A function of the thread count, fixed for the process: a sequence still
// gets the same bits alone or in any batch; tiles of fewer than 1,536 keys
// are split the same way for any thread count (at most 2 parts of 512).
constexpr int kMinMaxSplits = 2;
constexpr int kMaxSplits = 16;
inline int max_splits() {
  static const int n = std::clamp(num_threads(), kMinMaxSplits, kMaxSplits);
  return n;
}
constexpr int kMaxSplitRows = 8; // tiles of more query rows are not split
constexpr int kMaxDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <DType T>
inline float load_elem(const void* p, int64_t i) {
  if constexpr (T == DType::f32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (T == DType::f16) {
    return half_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

template <DType T>
inline void store_elem(void* p, int64_t i, float x) {
  if constexpr (T == DType::f32) {
    static_cast<float*>(p)[i] = x;
  } else if constexpr (T == DType::f16) {
    static_cast<uint16_t*>(p)[i] = float_to_half(x);
  } else {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(x);
  }
}

// Eight consecutive quantized elements starting at element i of a row.
template <int BITS>
inline v8f unpack8(const uint32_t* row, unsigned i) {
  if constexpr (BITS == 4) {
    const v8u shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    return to_float((splat_u(row[i / 8]) >> shifts) & 0xFu);
  } else if constexpr (BITS == 6) {
    // Elements i .. i + 7 (i a multiple of 8) are the 48 bits at bit 6 * i.
    uint64_t x = 0;
    std::memcpy(&x, reinterpret_cast<const unsigned char*>(row) + size_t(i) / 8 * 6, 6);
    v8u w = {uint32_t(x), uint32_t(x >> 6), uint32_t(x >> 12), uint32_t(x >> 18),
             uint32_t(x >> 24), uint32_t(x >> 30), uint32_t(x >> 36), uint32_t(x >> 42)};
    return to_float(w & 0x3Fu);
  } else {
    uint32_t a = row[i / 4], b = row[i / 4 + 1];
    const v8u shifts = {0, 8, 16, 24, 0, 8, 16, 24};
    v8u w = {a, a, a, a, b, b, b, b};
    return to_float((w >> shifts) & 0xFFu);
  }
}

inline void axpy(float alpha, const float* x, float* y, int D) {
  v8f a = splat(alpha);
  for (int i = 0; i < D; i += 8) {
    store(y + i, load(y + i) + a * load(x + i));
  }
}

inline void scale_row(float alpha, float* y, int D) {
  v8f a = splat(alpha);
  for (int i = 0; i < D; i += 8) {
    store(y + i, load(y + i) * a);
  }
}

// The orthonormal Hadamard transform of x[0..D) in place (Sylvester order,
// as mx.hadamard_transform; D a power of two).
inline void hadamard_row(float* x, int D) {
  for (int h = 1; h < D; h *= 2) {
    for (int i = 0; i < D; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(float(D));
  for (int i = 0; i < D; ++i) {
    x[i] *= norm;
  }
}

// One query row of a tile: its float query (already multiplied by the
// softmax scale), the keys it may see [kmin, kmax), and its mask row.
struct IntQuery; // the int8 form of a query row (int_dot_common.h)

struct Row {
  const float* q;
  const IntQuery* qi; // integer-dot kernel sets only
  int kmin;
  int kmax;
  const void* mask; // element for key t at mask + t * mask_st
  int64_t mask_st;
  const float* coef; // the row's a.bias_rank score-bias coefficients, or null
};

// Adds the score bias of rows [0, R) (their coefficients rows[r].coef) to
// sc[r][j] for the keys t = c0 + j, j < n (-inf, an unseen key, stays -inf):
// sc + c_0 T_0t + c_1 T_1t + ... in that order for every element, whether
// the chunk is one table block or not and whatever rows share it, so a row
// gets the same bits alone or batched. Two rows at a time share each read.
template <int NR>
inline void add_score_bias_rows(
    const AttentionArgs& a, const Row* rows, int c0, int n, float (*sc)[kChunk]) {
  static_assert(kChunk == kBiasBlock);
  constexpr int X = kChunk / 8;
  const int E = a.bias_rank;
#if defined(__AVX512F__)
  // The same multiply-adds in the same order, 16 lanes at a time (the same bits).
  if (n == kChunk && c0 % kBiasBlock == 0) {
    typedef float v16f __attribute__((vector_size(64)));
    constexpr int X16 = kChunk / 16;
    const float* tab = a.bias_table + int64_t(c0) * E;
    v16f acc[NR][X16];
    for (int r = 0; r < NR; ++r) {
      for (int x = 0; x < X16; ++x) {
        std::memcpy(&acc[r][x], sc[r] + 16 * x, sizeof(v16f));
      }
    }
    for (int e = 0; e < E; ++e, tab += kBiasBlock) {
      v16f t[X16];
      for (int x = 0; x < X16; ++x) {
        std::memcpy(&t[x], tab + 16 * x, sizeof(v16f));
      }
      for (int r = 0; r < NR; ++r) {
        const float c = rows[r].coef[e];
        for (int x = 0; x < X16; ++x) {
          acc[r][x] += c * t[x];
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int x = 0; x < X16; ++x) {
        std::memcpy(sc[r] + 16 * x, &acc[r][x], sizeof(v16f));
      }
    }
    return;
  }
#endif
  if (n == kChunk && c0 % kBiasBlock == 0) {
    const float* tab = a.bias_table + int64_t(c0) * E;
    v8f acc[NR][X];
    for (int r = 0; r < NR; ++r) {
      for (int x = 0; x < X; ++x) {
        acc[r][x] = load(sc[r] + 8 * x);
      }
    }
    for (int e = 0; e < E; ++e, tab += kBiasBlock) {
      v8f t[X];
      for (int x = 0; x < X; ++x) {
        t[x] = load(tab + 8 * x);
      }
      for (int r = 0; r < NR; ++r) {
        v8f c = splat(rows[r].coef[e]);
        for (int x = 0; x < X; ++x) {
          acc[r][x] += c * t[x];
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int x = 0; x < X; ++x) {
        store(sc[r] + 8 * x, acc[r][x]);
      }
    }
    return;
  }
  for (int e = 0; e < E; ++e) {
    for (int j = 0; j < n; ++j) {
      const int t = c0 + j;
      const float tv = a.bias_table[(int64_t(t / kBiasBlock) * E + e) * kBiasBlock + t % kBiasBlock];
      for (int r = 0; r < NR; ++r) {
        sc[r][j] += rows[r].coef[e] * tv;
      }
    }
  }
}

inline void add_score_bias(const AttentionArgs& a, const Row* rows, int R, int c0, int n, float (*sc)[kChunk]) {
  int r = 0;
#if defined(__AVX512F__)
  for (; r + 4 <= R; r += 4) {
    add_score_bias_rows<4>(a, rows + r, c0, n, sc + r);
  }
#endif
  for (; r + 2 <= R; r += 2) {
    add_score_bias_rows<2>(a, rows + r, c0, n, sc + r);
  }
  if (r < R) {
    add_score_bias_rows<1>(a, rows + r, c0, n, sc + r);
  }
}

// The score-bias coefficients of query row `q` (scaled) of KV head h.
inline void bias_coefficients(const AttentionArgs& a, int h, const float* q, float* coef) {
  const int D = a.kv.head_dim;
  for (int e = 0; e < a.bias_rank; ++e) {
    const float* w = a.bias_w + (int64_t(h) * a.bias_rank + e) * D;
    v8f acc = splat(0.f);
    for (int i = 0; i < D; i += 8) {
      acc += load(q + i) * load(w + i);
    }
    coef[e] = hsum(acc);
  }
}

// Running softmax state of up to RB rows over keys [t0, t1). The rows' dot
// products and value accumulators are held in registers: each K row is
// dequantized one 8-lane slice at a time and used by every row at once, and
// the value pass walks the head dimension slice by slice with the RB
// accumulators of that slice live across the whole chunk.
template <int KB, int VB, DType SD, int RB>
void attend_block(
    const AttentionArgs& a,
    int b,
    int h,
    const Row* rows_in,
    int R,
    int t0,
    int t1,
    float* m,
    float* l,
    float* acc) {
  const QuantSource& src = a.kv;
  const int D = src.head_dim;
  const int gs = src.group_size;
  const int n_groups = D / gs;
  constexpr int kScaleBytes = SD == DType::f32 ? 4 : 2;
  alignas(64) float sc[RB][kChunk];
  alignas(64) float v_scale[kChunk][kMaxDim / 16];
  alignas(64) float v_bias[kChunk][kMaxDim / 16];
  alignas(64) float spare_acc[kMaxDim];
  Row rows[RB];
  float* acc_row[RB];
  bool active[RB];

  for (int r = 0; r < RB; ++r) {
    rows[r] = rows_in[r < R ? r : 0];
    if (r >= R) {
      rows[r].kmin = rows[r].kmax = 0; // padding: never visible
    }
    acc_row[r] = r < R ? acc + size_t(r) * D : spare_acc;
  }
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
    std::fill(acc_row[r], acc_row[r] + D, 0.f);
  }
  float m_pad = kNegInf, l_pad = 0.f;
  auto row_m = [&](int r) -> float& { return r < R ? m[r] : m_pad; };
  auto row_l = [&](int r) -> float& { return r < R ? l[r] : l_pad; };

  for (int t = t0; t < t1;) {
    RowRun run = row_run(src, b, h, t);
    int run_end = std::min(t1, t + run.run);
    for (int c0 = t; c0 < run_end; c0 += kChunk) {
      int n = std::min(kChunk, run_end - c0);
      int64_t j0 = c0 - t;
      bool any = false;
      for (int r = 0; r < RB; ++r) {
        active[r] = rows[r].kmin < c0 + n && rows[r].kmax > c0;
        any |= active[r];
      }
      if (!any) {
        continue;
      }
      // Scores of every row for each key of the chunk, NT keys at a time so
      // that RB * NT independent FMA chains hide the FMA latency.
      auto score_keys = [&](auto nt_tag, int j) {
        constexpr int NT = decltype(nt_tag)::value;
        const uint32_t* kp[NT];
        const char* ks[NT];
        const char* kb[NT];
        for (int u = 0; u < NT; ++u) {
          int64_t jj = j0 + j + u;
          kp[u] = run.kp + jj * run.st[0];
          ks[u] = static_cast<const char*>(run.ks) + jj * run.st[1] * kScaleBytes;
          kb[u] = static_cast<const char*>(run.kb) + jj * run.st[2] * kScaleBytes;
        }
        v8f dots[NT][RB];
        for (int u = 0; u < NT; ++u) {
          for (int r = 0; r < RB; ++r) {
            dots[u][r] = splat(0.f);
          }
        }
        for (int g = 0; g < n_groups; ++g) {
          v8f s[NT], bias[NT];
          for (int u = 0; u < NT; ++u) {
            s[u] = splat(load_elem<SD>(ks[u], g));
            bias[u] = splat(load_elem<SD>(kb[u], g));
          }
          for (unsigned i = g * gs, end = i + gs; i < end; i += 8) {
            v8f k[NT];
            for (int u = 0; u < NT; ++u) {
              k[u] = unpack8<KB>(kp[u], i) * s[u] + bias[u];
            }
            for (int r = 0; r < RB; ++r) {
              v8f q = load(rows[r].q + i);
              for (int u = 0; u < NT; ++u) {
                dots[u][r] += q * k[u];
              }
            }
          }
        }
        for (int u = 0; u < NT; ++u) {
          int tok = c0 + j + u;
          for (int r = 0; r < RB; ++r) {
            float score = kNegInf;
            if (tok >= rows[r].kmin && tok < rows[r].kmax) {
              score = hsum(dots[u][r]);
              if (rows[r].mask) {
                int64_t mi = int64_t(tok) * rows[r].mask_st;
                if (a.mask_is_bool) {
                  if (!static_cast<const uint8_t*>(rows[r].mask)[mi]) {
                    score = kNegInf;
                  }
                } else {
                  score += static_cast<const float*>(rows[r].mask)[mi];
                }
              }
            }
            sc[r][j + u] = score;
          }
        }
      };
      constexpr int kKeysAtOnce = RB <= 4 ? 2 : 1;
      int j = 0;
      for (; j + kKeysAtOnce <= n; j += kKeysAtOnce) {
        score_keys(std::integral_constant<int, kKeysAtOnce>{}, j);
      }
      for (; j < n; ++j) {
        score_keys(std::integral_constant<int, 1>{}, j);
      }
      if (a.bias_rank > 0) {
        add_score_bias(a, rows, R, c0, n, sc);
      }
      // Softmax update: sc becomes the chunk's probabilities (0 if unseen).
      for (int r = 0; r < RB; ++r) {
        for (int j = n; j < kChunk; ++j) {
          sc[r][j] = kNegInf;
        }
        float cmax = kNegInf;
        for (int j = 0; j < kChunk; j += 8) {
          cmax = std::max(cmax, hmax(load(&sc[r][j])));
        }
        if (cmax == kNegInf) {
          std::fill(sc[r], sc[r] + kChunk, 0.f);
          continue;
        }
        float& mr = row_m(r);
        float m_new = std::max(mr, cmax);
        if (m_new != mr) {
          float corr = std::exp(mr - m_new);
          row_l(r) *= corr;
          scale_row(corr, acc_row[r], D);
          mr = m_new;
        }
        v8f sum = splat(0.f);
        v8f mv = splat(m_new);
        for (int j = 0; j < kChunk; j += 8) {
          v8f p = exp_neg(load(&sc[r][j]) - mv);
          store(&sc[r][j], p);
          sum += p;
        }
        row_l(r) += hsum(sum);
      }
      // Values: acc[r] += sum_j p[r][j] * v_j, one head-dim slice at a time.
      for (int j = 0; j < n; ++j) {
        int64_t jj = j0 + j;
        const char* vs = static_cast<const char*>(run.vs) + jj * run.st[4] * kScaleBytes;
        const char* vb = static_cast<const char*>(run.vb) + jj * run.st[5] * kScaleBytes;
        for (int g = 0; g < n_groups; ++g) {
          v_scale[j][g] = load_elem<SD>(vs, g);
          v_bias[j][g] = load_elem<SD>(vb, g);
        }
      }
      // SV slices at a time: RB * SV independent accumulator chains.
      constexpr int SV = RB <= 4 ? 2 : 1;
      for (unsigned i = 0; i < unsigned(D); i += 8 * SV) {
        const unsigned g = i / gs; // slices i .. i + 8 * SV share a group
        v8f accs[SV][RB];
        for (int x = 0; x < SV; ++x) {
          for (int r = 0; r < RB; ++r) {
            accs[x][r] = load(acc_row[r] + i + 8 * x);
          }
        }
        for (int jv = 0; jv < n; ++jv) {
          const uint32_t* vp = run.vp + (j0 + jv) * run.st[3];
          v8f s = splat(v_scale[jv][g]);
          v8f bias = splat(v_bias[jv][g]);
          v8f v[SV];
          for (int x = 0; x < SV; ++x) {
            v[x] = unpack8<VB>(vp, i + 8 * x) * s + bias;
          }
          for (int r = 0; r < RB; ++r) {
            v8f p = splat(sc[r][jv]);
            for (int x = 0; x < SV; ++x) {
              accs[x][r] += p * v[x];
            }
          }
        }
        for (int x = 0; x < SV; ++x) {
          for (int r = 0; r < RB; ++r) {
            store(acc_row[r] + i + 8 * x, accs[x][r]);
          }
        }
      }
    }
    t = run_end;
  }
}

} // namespace
} // namespace kvsnap::cpu::KVSNAP_ISA

#if defined(KVSNAP_INT_DOT)
#include KVSNAP_INT_DOT // the instruction set's integer kernel, e.g. "int_dot_avx512.h"
#endif

namespace kvsnap::cpu::KVSNAP_ISA {
namespace {

// Runs a tile of R <= kMaxRows rows in register blocks of 4 or 8 rows (the
// integer kernels: all rows at once, each K/V chunk read once for all).
template <int KB, int VB, DType SD>
void attend_range(
    const AttentionArgs& a,
    int b,
    int h,
    const Row* rows,
    int R,
    int t0,
    int t1,
    float* m,
    float* l,
    float* acc) {
  const int D = a.kv.head_dim;
#if defined(KVSNAP_INT_DOT)
  (void)D;
  attend_rows_int<KB, VB, SD>(a, b, h, rows, R, t0, t1, m, l, acc);
#else
  if (R <= 4) {
    attend_block<KB, VB, SD, 4>(a, b, h, rows, R, t0, t1, m, l, acc);
    return;
  }
  for (int r0 = 0; r0 < R; r0 += 8) {
    attend_block<KB, VB, SD, 8>(
        a, b, h, rows + r0, std::min(8, R - r0), t0, t1, m + r0, l + r0,
        acc + size_t(r0) * D);
  }
#endif
}

template <DType OT>
void store_row(void* out, int64_t row, const float* x, float inv, int D, bool rotate) {
  float y[kMaxDim];
  for (int i = 0; i < D; ++i) {
    y[i] = x[i] * inv;
  }
  if (rotate) {
    hadamard_row(y, D); // back from the stored basis
  }
  for (int i = 0; i < D; ++i) {
    store_elem<OT>(out, row * D + i, y[i]);
  }
}

void store_out(const AttentionArgs& a, int64_t row, const float* x, float l) {
  const int D = a.kv.head_dim;
  float inv = l > 0.f ? 1.f / l : 0.f;
  switch (a.q_dtype) {
    case DType::f32:
      store_row<DType::f32>(a.out, row, x, inv, D, a.rotate);
      break;
    case DType::f16:
      store_row<DType::f16>(a.out, row, x, inv, D, a.rotate);
      break;
    case DType::bf16:
      store_row<DType::bf16>(a.out, row, x, inv, D, a.rotate);
      break;
  }
}

// The queries as the kernel uses them: times the key scale of their KV head
// (a.query_scale), rotated (a.rotate), times the softmax scale.
template <DType QT>
void load_queries(const AttentionArgs& a, float* qf) {
  const int D = a.kv.head_dim;
  if (!a.rotate && a.query_scale == nullptr) {
    const int64_t n = int64_t(a.B) * a.Hq * a.L * D;
    for (int64_t i = 0; i < n; ++i) {
      qf[i] = load_elem<QT>(a.q, i) * a.scale;
    }
    return;
  }
  const int G = a.Hq / a.kv.n_kv_heads;
  const int64_t n_rows = int64_t(a.B) * a.Hq * a.L;
  for (int64_t r = 0; r < n_rows; ++r) {
    float* y = qf + r * D;
    const float* s = a.query_scale == nullptr ? nullptr : a.query_scale + int64_t(r / a.L % a.Hq / G) * D;
    for (int i = 0; i < D; ++i) {
      y[i] = s == nullptr ? load_elem<QT>(a.q, r * D + i) : load_elem<QT>(a.q, r * D + i) * s[i];
    }
    if (a.rotate) {
      hadamard_row(y, D);
    }
    for (int i = 0; i < D; ++i) {
      y[i] *= a.scale;
    }
  }
}

struct Tile {
  int b, h; // batch and KV head
  int first; // first row: index into the (l, g) rows of (b, h)
  int R;
  int t0, t1; // union of the rows' key ranges
  int splits = 1; // parts the keys are cut into (kv_splits_for: from t1 - t0 and the thread count)
  int first_task = 0; // index of its first part among all tasks
};

template <int KB, int VB, DType SD>
void attention_impl(const AttentionArgs& a) {
  const QuantSource& src = a.kv;
  const int D = src.head_dim;
  const int Hkv = src.n_kv_heads;
  const int G = a.Hq / Hkv;
  const int rows_per_bh = a.L * G;

  std::vector<float> qf(size_t(a.B) * a.Hq * a.L * D);
  switch (a.q_dtype) {
    case DType::f32:
      load_queries<DType::f32>(a, qf.data());
      break;
    case DType::f16:
      load_queries<DType::f16>(a, qf.data());
      break;
    case DType::bf16:
      load_queries<DType::bf16>(a, qf.data());
      break;
  }
#if defined(KVSNAP_INT_DOT)
  // Each query row in int8, once per call.
  const size_t n_query_rows = size_t(a.B) * a.Hq * a.L;
  std::vector<IntQuery> qi(n_query_rows);
  parallel_for(int((n_query_rows + 63) / 64), [&](int task) {
    size_t end = std::min(n_query_rows, size_t(task + 1) * 64);
    for (size_t i = size_t(task) * 64; i < end; ++i) {
      quantize_query<KB, kQueryMax<KB>>(qf.data() + i * D, D, src.group_size, qi[i]);
    }
  });
  auto int_query = [&](size_t row) -> const IntQuery* { return &qi[row]; };
#else
  auto int_query = [](size_t) -> const IntQuery* { return nullptr; };
#endif
  // Each query row's score-bias coefficients, once per call.
  std::vector<float> coefs;
  if (a.bias_rank > 0) {
    const size_t n_rows = size_t(a.B) * a.Hq * a.L;
    coefs.resize(n_rows * a.bias_rank);
    parallel_for(int((n_rows + 63) / 64), [&](int task) {
      size_t end = std::min(n_rows, size_t(task + 1) * 64);
      for (size_t i = size_t(task) * 64; i < end; ++i) {
        int hq = int(i / a.L % a.Hq);
        bias_coefficients(a, hq / G, qf.data() + i * D, coefs.data() + i * a.bias_rank);
      }
    });
  }

  // Row k of (b, h) is query position l = k / G of head h * G + k % G.
  auto make_row = [&](int b, int h, int k) {
    int l = k / G;
    int hq = h * G + k % G;
    int T = a.kv_len[b];
    Row row;
    size_t q_row = (size_t(b) * a.Hq + hq) * a.L + l;
    row.q = qf.data() + q_row * D;
    row.qi = int_query(q_row);
    row.kmin = kv_key_min(T, a.L, l, a.causal, a.window);
    row.kmax = kv_key_max(T, a.L, l, a.causal);
    row.mask = nullptr;
    row.mask_st = 0;
    row.coef = a.bias_rank > 0 ? coefs.data() + q_row * a.bias_rank : nullptr;
    if (a.mask) {
      int64_t off = b * a.mask_stride[0] + hq * a.mask_stride[1] +
          l * a.mask_stride[2];
      row.mask = static_cast<const char*>(a.mask) +
          off * (a.mask_is_bool ? 1 : 4);
      row.mask_st = a.mask_stride[3];
    }
    return row;
  };
  auto out_row = [&](int b, int h, int k) {
    int l = k / G;
    int hq = h * G + k % G;
    return (int64_t(b) * a.Hq + hq) * a.L + l;
  };

  if (a.B == 0 || a.Hq == 0 || a.L == 0) {
    return;
  }
  std::vector<Tile> tiles;
  for (int b = 0; b < a.B; ++b) {
    for (int h = 0; h < Hkv; ++h) {
      for (int first = 0; first < rows_per_bh; first += kMaxRows) {
        Tile t{b, h, first, std::min(kMaxRows, rows_per_bh - first), 0, 0};
        int lo = std::numeric_limits<int>::max(), hi = 0;
        for (int k = first; k < first + t.R; ++k) {
          Row row = make_row(b, h, k);
          if (row.kmax > row.kmin) {
            lo = std::min(lo, row.kmin);
            hi = std::max(hi, row.kmax);
          }
        }
        t.t0 = hi > 0 ? lo : 0;
        t.t1 = hi;
        tiles.push_back(t);
      }
    }
  }

  // Long key ranges are split into parts run as separate tasks and merged.
  // The split depends on each tile's own span, not on the batch, so a
  // sequence gets the same bits alone or batched (kvsnap.batch relies on it).
  size_t n_tasks = 0;
  for (auto& t : tiles) {
    // Tiles of many query rows (prefill chunks) have work enough per key: only
    // decode-like tiles (a few rows) are split. Both inputs belong to the tile.
    t.splits = t.R > kMaxSplitRows ? 1 : kv_splits_for(t.t1 - t.t0, kSplitKeys, max_splits());
    t.first_task = int(n_tasks);
    n_tasks += t.splits;
  }
  std::vector<int> task_tile(n_tasks);
  for (int i = 0; i < int(tiles.size()); ++i) {
    for (int s = 0; s < tiles[i].splits; ++s) {
      task_tile[tiles[i].first_task + s] = i;
    }
  }

  // Partial results of task (tile i, part s): its tile's R rows from row
  // slot task_row[task] = task_row[tiles[i].first_task + s]. Not zeroed:
  // attend_range writes every row's m, l and acc (decode at 32K has 128
  // tasks of 4 rows: zeroing kMaxRows rows each, 2 MB, cost ~20 us a call).
  std::vector<size_t> task_row(n_tasks + 1, 0);
  for (size_t task = 0; task < n_tasks; ++task) {
    task_row[task + 1] = task_row[task] + size_t(tiles[task_tile[task]].R);
  }
  const size_t n_part_rows = task_row[n_tasks];
  std::unique_ptr<float[]> part_m(new float[n_part_rows]), part_l(new float[n_part_rows]);
  std::unique_ptr<float[]> part_acc(new float[n_part_rows * D]);
  parallel_for(int(n_tasks), [&](int task) {
    const Tile& t = tiles[task_tile[task]];
    int s = task - t.first_task;
    int span = t.t1 - t.t0;
    int step = kv_split_step(span, t.splits, kChunk);
    int lo = std::min(t.t1, t.t0 + s * step);
    int hi = std::min(t.t1, lo + step);
    Row rows[kMaxRows];
    for (int r = 0; r < t.R; ++r) {
      rows[r] = make_row(t.b, t.h, t.first + r);
    }
    attend_range<KB, VB, SD>(
        a,
        t.b,
        t.h,
        rows,
        t.R,
        lo,
        hi,
        &part_m[task_row[task]],
        &part_l[task_row[task]],
        &part_acc[task_row[task] * D]);
  });
  parallel_for(int(tiles.size()), [&](int i) {
    const Tile& t = tiles[i];
    alignas(64) float merged[kMaxDim];
    for (int r = 0; r < t.R; ++r) {
      float m_all = kNegInf;
      for (int s = 0; s < t.splits; ++s) {
        m_all = std::max(m_all, part_m[task_row[t.first_task + s] + r]);
      }
      std::fill(merged, merged + D, 0.f);
      float l_all = 0.f;
      if (m_all != kNegInf) {
        for (int s = 0; s < t.splits; ++s) {
          size_t row = task_row[t.first_task + s] + r;
          float ms = part_m[row];
          if (ms == kNegInf) {
            continue;
          }
          float w = std::exp(ms - m_all);
          l_all += w * part_l[row];
          axpy(w, &part_acc[row * D], merged, D);
        }
      }
      store_out(a, out_row(t.b, t.h, t.first + r), merged, l_all);
    }
  });
}

// MLX's affine quantization of one row (mlx/backend/cpu/quantized.cpp),
// with scales and biases rounded to float16 for storage.
template <int BITS, DType T>
void quantize_row(
    const void* x,
    int64_t x_off,
    int D,
    int gs,
    uint32_t* packed,
    uint16_t* scales,
    uint16_t* biases) {
  constexpr float n_bins = (1 << BITS) - 1;
  constexpr float eps = 1e-7f;
  for (int g = 0; g < D / gs; ++g) {
    float w[kMaxDim];
    float w_min = std::numeric_limits<float>::infinity();
    float w_max = -w_min;
    for (int j = 0; j < gs; ++j) {
      w[j] = load_elem<T>(x, x_off + g * gs + j);
      w_max = std::max(w_max, w[j]);
      w_min = std::min(w_min, w[j]);
    }
    bool mask = std::abs(w_min) > std::abs(w_max);
    float scale = std::max((w_max - w_min) / n_bins, eps);
    scale = mask ? scale : -scale;
    float edge = mask ? w_min : w_max;
    float q0 = std::rint(edge / scale);
    float bias = 0;
    if (q0 != 0) {
      scale = edge / q0;
      bias = edge;
    }
    // The group's codes as one little-endian bit stream: gs * BITS is a
    // multiple of 32 (6 bits: gs a multiple of 16), so a group fills whole words.
    uint32_t* out = packed + g * gs * BITS / 32;
    uint64_t stream = 0;
    int n_bits = 0;
    for (int j = 0; j < gs; ++j) {
      float q = std::rint((w[j] - bias) / scale);
      q = std::min(std::max(q, 0.0f), n_bins);
      stream |= uint64_t(q) << n_bits;
      n_bits += BITS;
      if (n_bits >= 32) {
        *out++ = uint32_t(stream);
        stream >>= 32;
        n_bits -= 32;
      }
    }
    scales[g] = float_to_half(scale);
    biases[g] = float_to_half(bias);
  }
}

// Row x (D elements from x_off) of KV head h at position pos as WriteArgs
// stores it: a key (`key`) shifted and divided by its scale, then rotated
// (a.rotate): the order and operations of kvsnap.cache.store_form.
template <DType T>
void stored_form(const WriteArgs& a, const void* x, int64_t x_off, int D, int h, int pos, bool key, float* out) {
  for (int j = 0; j < D; ++j) {
    out[j] = load_elem<T>(x, x_off + j);
  }
  if (key && a.shift_const != nullptr) {
    const float* c = a.shift_const + int64_t(h) * D;
    // Position pos's entries: block pos / 32, element pos % 32 of each row e.
    const float* t = a.shift_table == nullptr
        ? nullptr
        : a.shift_table + int64_t(pos / kBiasBlock) * a.shift_rank * kBiasBlock + pos % kBiasBlock;
    for (int i = 0; i < D; i += 8) {
      v8f y = load(out + i) - load(c + i);
      for (int e = 0; e < a.shift_rank; ++e) {
        y -= splat(t[e * kBiasBlock]) * load(a.shift_w + (int64_t(h) * a.shift_rank + e) * D + i);
      }
      store(out + i, y);
    }
  }
  if (key && a.key_scale != nullptr) {
    const float* s = a.key_scale + int64_t(h) * D;
    for (int i = 0; i < D; i += 8) {
      store(out + i, load(out + i) / load(s + i));
    }
  }
  if (a.rotate) {
    hadamard_row(out, D);
  }
}

template <int KB, int VB, DType T>
void kv_write_impl(const WriteArgs& a) {
  const QuantSource& dst = a.dst;
  const int D = dst.head_dim;
  const int Hkv = dst.n_kv_heads;
  const int bt = dst.block_tokens;
  const int wpr[2] = {kv_words_per_row(D, KB), kv_words_per_row(D, VB)};
  const int gpr = kv_groups_per_row(D, dst.group_size);
  const int64_t n_rows = int64_t(a.B) * Hkv * a.L;
  const int64_t rows_per_task = std::max<int64_t>(1, 4096 / D);
  const int n_tasks = int((n_rows + rows_per_task - 1) / rows_per_task);
  parallel_for(n_tasks, [&](int task) {
    int64_t end = std::min(n_rows, (task + 1) * rows_per_task);
    for (int64_t row = task * rows_per_task; row < end; ++row) {
      int b = int(row / (int64_t(Hkv) * a.L));
      int h = int(row / a.L % Hkv);
      int l = int(row % a.L);
      if (l >= a.counts[b]) {
        continue; // padding: its position may lie past the block table row
      }
      int pos = a.offsets[b] + l;
      int slot = dst.block_table[kv_table_index(b, dst.max_blocks, pos, bt)];
      uint8_t* base = a.arena + kv_slot_offset(slot, long(dst.slot_bytes));
      int64_t r = kv_row_in_block(h, pos, bt);
      for (int kv = 0; kv < 2; ++kv) {
        const size_t* off = dst.off + 3 * kv;
        const bool formed = a.rotate || (kv == 0 && (a.shift_const != nullptr || a.key_scale != nullptr));
        float form[kMaxDim];
        if (formed) {
          stored_form<T>(a, kv == 0 ? a.keys : a.values, row * D, D, h, pos, kv == 0, form);
        }
        auto quantize = kv == 0 ? (formed ? quantize_row<KB, DType::f32> : quantize_row<KB, T>)
                                : (formed ? quantize_row<VB, DType::f32> : quantize_row<VB, T>);
        quantize(
            formed ? static_cast<const void*>(form) : (kv == 0 ? a.keys : a.values),
            formed ? 0 : row * D,
            D,
            dst.group_size,
            reinterpret_cast<uint32_t*>(base + off[0]) + r * wpr[kv],
            reinterpret_cast<uint16_t*>(base + off[1]) + r * gpr,
            reinterpret_cast<uint16_t*>(base + off[2]) + r * gpr);
      }
    }
  });
}

template <int KB, int VB>
void attention_bits(const AttentionArgs& a) {
  switch (a.kv.scale_dtype) {
    case DType::f32:
      return attention_impl<KB, VB, DType::f32>(a);
    case DType::f16:
      return attention_impl<KB, VB, DType::f16>(a);
    case DType::bf16:
      return attention_impl<KB, VB, DType::bf16>(a);
  }
}

template <int KB, int VB>
void kv_write_bits(const WriteArgs& a) {
  switch (a.dtype) {
    case DType::f32:
      return kv_write_impl<KB, VB, DType::f32>(a);
    case DType::f16:
      return kv_write_impl<KB, VB, DType::f16>(a);
    case DType::bf16:
      return kv_write_impl<KB, VB, DType::bf16>(a);
  }
}

} // namespace

// Keys and values may have different bits (e.g. 8-bit keys, 4-bit values).
void attention(const AttentionArgs& a) {
  const int kb = a.kv.k_bits, vb = a.kv.v_bits;
  if (kb == 4 && vb == 4) {
    attention_bits<4, 4>(a);
  } else if (kb == 8 && vb == 4) {
    attention_bits<8, 4>(a);
  } else if (kb == 6 && vb == 4) {
    attention_bits<6, 4>(a);
  } else if (kb == 4 && vb == 8) {
    attention_bits<4, 8>(a);
  } else if (kb == 6 && vb == 8) {
    attention_bits<6, 8>(a);
  } else {
    attention_bits<8, 8>(a);
  }
}

void kv_write(const WriteArgs& a) {
  const int kb = a.dst.k_bits, vb = a.dst.v_bits;
  if (kb == 4 && vb == 4) {
    kv_write_bits<4, 4>(a);
  } else if (kb == 8 && vb == 4) {
    kv_write_bits<8, 4>(a);
  } else if (kb == 6 && vb == 4) {
    kv_write_bits<6, 4>(a);
  } else if (kb == 4 && vb == 8) {
    kv_write_bits<4, 8>(a);
  } else if (kb == 6 && vb == 8) {
    kv_write_bits<6, 8>(a);
  } else {
    kv_write_bits<8, 8>(a);
  }
}

} // namespace kvsnap::cpu::KVSNAP_ISA
