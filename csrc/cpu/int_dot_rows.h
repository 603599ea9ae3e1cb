// The integer-dot attention of a tile, for every instruction set (AVX-512,
// AVX2, NEON: 512-, 256- or 128-bit integer vectors): the math is in
// int_dot_avx512.h (read that first), the instruction set's part in the
// header that includes this one:
//
//   kVecBytes             bytes of an IVec (ValueLayout<kVecBytes> order)
//   kPvRows               rows whose P.V products go through a chunk's code
//                         vectors together (1 to 4; registers allowing)
//   kQueryMax<KB>         the int8 range of queries for KB-bit keys
//   kWeightMax<VB>        the int8 range of P.V weights for VB-bit values
//   kValueCodeOffset<VB>  what interleave4 subtracts from each value code
//                         (128 where codes are taken as signed bytes)
//   ScoreQueries          what int_scores16 reads of the query rows besides
//                         qi, made once per tile by prepare<KB>(qi, R, D)
//   int_scores16<KB, SD>  scores of 16 keys, as in int_dot_avx512.h
//   interleave4<VB>       the codes of 4 value rows in ValueLayout order
//   dot_step<CB>(acc, c, w), dot_finish<CB>(acc)  a chain of at most 8
//                         steps (each adds four code-times-weight products
//                         per lane) on codes of CB bits begun at zero, and
//                         its int32 lanes (AVX2 sums 4-bit steps in int16)
//   lane_weights(w, grp, quad)  lane x = the 4 bytes at w + grp[x] * kChunk
//                         (quad: ValueLayout's, for broadcasts)
//   fma_lanes(out, s, f)  out[x] += float(s[x]) * f[x] (f: floats, or an FVec)
//   lane_steps(step, grp, quad)  the FVec of lane x = step[grp[x]]
//   load_params8<SD>(p, st, G, n, out, ost)  load_params (int_dot_common.h), maybe faster
//
// and, where it defines the macro, its own form of a step:
//
//   KVSNAP_CHUNK_SCORES   int_scores_chunk<KB, SD>: the scores of all the
//                         keys of a chunk in one call (otherwise: below,
//                         int_scores16 per 16 keys)
//   KVSNAP_ROW_SOFTMAX    rows_max(sc, R, out), row_exp(sc, m, lanes): the
//                         largest score of the chunk of each of rows
//                         [0, R); a row's scores to exp(score - m), their
//                         sum added to lanes[16] (any lanes)
//   KVSNAP_BLOCK_WEIGHTS  block_weights(w8, n_groups, group, w, packed):
//                         lane_weights of all the chunk's blocks of 4 keys
//                         at once, or false (the per-block form runs);
//                         packed: a PackedWeights, the weights w8 in a
//                         register where row_weights4 made them
//   KVSNAP_ROW_WEIGHTS    row_weights4(..., packed): a row's int8 P.V
//                         weights, steps and bias sums (into lanes) for
//                         4-bit values (needs KVSNAP_BLOCK_WEIGHTS)
//
// Softmax, masks and the int8 weights are plain 256-bit float code here
// (simd.h): the integer dot products are the larger part.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "int_dot_common.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

using namespace simd;

// x rounded to the nearest integer, ties to even (|x| < 2^22), as
// cvtps2dq does.
inline v8f round_even(v8f x) {
  const v8f magic = splat(12582912.0f); // 1.5 * 2^23
  return (x + magic) - magic;
}

// Eight floats in [-127.5, 127.5) rounded to the nearest integer (ties to
// even) as int8 at p.
inline void store_int8(int8_t* p, v8f x) {
#if defined(__AVX2__)
  // cvtps2dq rounds to nearest even; saturating packs (exact in this
  // range): GCC turns the generic form below into 8 lane extracts and
  // scalar byte moves on x86.
  __m256i i = _mm256_cvtps_epi32(__m256(x));
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
#else
  typedef int8_t v8b __attribute__((vector_size(8)));
  v8b b = __builtin_convertvector(__builtin_convertvector(round_even(x), v8i), v8b);
  std::memcpy(p, &b, sizeof(b));
#endif
}

// The cache line holding p, fetched into L1 ahead of its use. Inline
// assembly: with __builtin_prefetch in these loops GCC 12 emitted no
// prefetch instruction at all (objdump of the extension found none).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__aarch64__)
  asm volatile("prfm pldl1keep, %0" : : "Q"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// The lines of n >= 1 rows of row_bytes bytes, st bytes apart, from p.
inline void prefetch_rows(const void* p, int64_t st, int n, int row_bytes) {
  const char* c = static_cast<const char*>(p);
  if (st <= row_bytes + 64) { // dense: every line of the span
    const int64_t span = (n - 1) * st + row_bytes;
    int64_t i = 0;
    for (; i + 256 <= span; i += 256) { // 4 lines a step: the loop's own instructions were 2/3 of it
      prefetch_line(c + i);
      prefetch_line(c + i + 64);
      prefetch_line(c + i + 128);
      prefetch_line(c + i + 192);
    }
    for (; i < span; i += 64) {
      prefetch_line(c + i);
    }
    prefetch_line(c + span - 1);
    return;
  }
  for (int u = 0; u < n; ++u, c += st) {
    for (int i = 0; i < row_bytes; i += 64) {
      prefetch_line(c + i);
    }
    prefetch_line(c + row_bytes - 1);
  }
}

// The codes and scales/biases of keys [j, j + n) of a run: K's (values
// false) or V's. The chunk loop asks for the next chunk's while it works on
// this one: without it a 32K decode call took 1.6x as long, waiting on
// lines the CPU's own prefetchers had not fetched (RESULTS.md).
inline void prefetch_chunk(const RowRun& run, int64_t j, int n, bool values, int row_bytes, int n_groups, int scale_bytes) {
  if (n <= 0) {
    return;
  }
  const int c = values ? 3 : 0; // codes' stride in run.st (words); scales', biases' follow
  prefetch_rows(reinterpret_cast<const char*>(values ? run.vp : run.kp) + j * run.st[c] * 4, run.st[c] * 4, n, row_bytes);
  const void* meta[2] = {values ? run.vs : run.ks, values ? run.vb : run.kb};
  for (int i = 0; i < 2; ++i) {
    const int64_t st = run.st[c + 1 + i] * scale_bytes;
    prefetch_rows(static_cast<const char*>(meta[i]) + j * st, st, n, n_groups * scale_bytes);
  }
}

#if !defined(KVSNAP_CHUNK_SCORES)
// The scores of the n <= kChunk keys of a chunk (as int_dot_avx512.h's), by
// int_scores16 16 keys at a time.
template <int KB, DType SD>
inline void int_scores_chunk(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, const ScoreQueries& sq, int R, float* out, int out_st) {
  for (int j = 0; j < n; j += 16) {
    int_scores16<KB, SD>(keys.from<SD>(j), std::min(16, n - j), D, gs, qi, sq, R, out + j, out_st);
  }
}
#endif

// attend_block's job for all R <= kMaxRows rows of a tile at once, in integers.
template <int KB, int VB, DType SD>
void attend_rows_int(
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
  using Layout = ValueLayout<kVecBytes>;
  constexpr int kLanes = Layout::kLanes;
  constexpr int kWMax = kWeightMax<VB>;
  constexpr float kCodeOffset = float(kValueCodeOffset<VB>);
  const QuantSource& src = a.kv;
  const int D = src.head_dim;
  const int gs = src.group_size;
  const int n_groups = D / gs;
  const int k_row_bytes = D * KB / 8, v_row_bytes = D * VB / 8;
  constexpr int kScaleBytes = SD == DType::f32 ? 4 : 2;
  constexpr int kBlocks = kChunk / 4; // blocks of 4 keys in a chunk
  static_assert(kChunk == 32);
  if (t0 < t1) { // the first chunk's keys and values, while the tile sets up
    const RowRun first = row_run(src, b, h, t0);
    const int n_first = std::min({kChunk - t0 % kChunk, t1 - t0, first.run});
    prefetch_chunk(first, 0, n_first, false, k_row_bytes, n_groups, kScaleBytes);
    prefetch_chunk(first, 0, n_first, true, v_row_bytes, n_groups, kScaleBytes);
  }
  const Layout layout(D, gs, VB);
  const int NV = layout.n_vec;

  alignas(64) float acc_perm[kMaxRows][kMaxDim]; // sum_t w_t c_t, ValueLayout order
  // The sums over keys of p_t (l_lanes[r]) and p_t b_tg (b_lanes[r][g]) are
  // kept in 16 lanes and added up once at the end: a horizontal sum per row
  // and chunk took ~4% of a 32K decode call (RESULTS.md).
  alignas(64) float l_lanes[kMaxRows][16];
  alignas(64) float b_lanes[kMaxRows][16][16];
  alignas(64) float sc[kMaxRows][kChunk];
  alignas(64) IVec xv[kBlocks][Layout::kMaxVec]; // the chunk's value codes, interleaved
  alignas(64) float v_scale[16][kChunk], v_bias[16][kChunk]; // [group][key of chunk]
  alignas(64) static constexpr uint8_t kZeroRow[kMaxDim] = {}; // the codes of keys past n
  const IntQuery* qi[kMaxRows];
  bool active[kMaxRows];
  for (int r = 0; r < R; ++r) {
    qi[r] = rows[r].qi;
    m[r] = kNegInf;
    std::fill(acc_perm[r], acc_perm[r] + NV * kLanes, 0.f);
    std::fill(l_lanes[r], l_lanes[r] + 16, 0.f);
    std::fill(b_lanes[r][0], b_lanes[r][0] + 16 * n_groups, 0.f);
  }
  ScoreQueries sq;
  sq.prepare<KB>(qi, R, D);

  for (int t = t0; t < t1;) {
    RowRun run = row_run(src, b, h, t);
    int run_end = std::min(t1, t + run.run);
    const KeyRun keys{
        run.kp, static_cast<const char*>(run.ks), static_cast<const char*>(run.kb), run.st[0], run.st[1], run.st[2]};
    // Chunks at multiples of kChunk: a key falls in the same chunk whatever
    // the tile's other rows (the weights' int8 steps are per chunk), so a
    // row gets the same bits alone or batched.
    for (int c0 = t, n = 0; c0 < run_end; c0 += n) {
      n = std::min((c0 / kChunk + 1) * kChunk, run_end) - c0;
      int64_t j0 = c0 - t;
      bool any = false;
      for (int r = 0; r < R; ++r) {
        active[r] = rows[r].kmin < c0 + n && rows[r].kmax > c0;
        any |= active[r];
      }
      if (!any) {
        continue;
      }
      // The next chunk's keys (its values: below): in this run, or the first
      // of the next one (the paged arena's next block).
      RowRun ahead = run;
      int64_t j_next = j0 + n;
      int n_next = int(std::min<int64_t>(kChunk, run_end - t - j_next));
      if (n_next <= 0 && run_end < t1) {
        ahead = row_run(src, b, h, run_end);
        j_next = 0;
        n_next = std::min({kChunk, t1 - run_end, ahead.run});
      }
      prefetch_chunk(ahead, j_next, n_next, false, k_row_bytes, n_groups, kScaleBytes);
      // Scores, then key ranges and masks.
      int_scores_chunk<KB, SD>(keys.from<SD>(j0), n, D, gs, qi, sq, R, &sc[0][0], kChunk);
      for (int r = 0; r < R; ++r) {
        const Row& row = rows[r];
        // Keys [lo, hi) of the chunk are in the row's range; the rest -inf.
        int lo = std::clamp(row.kmin - c0, 0, n), hi = std::clamp(row.kmax - c0, 0, n);
        std::fill(sc[r], sc[r] + lo, kNegInf);
        std::fill(sc[r] + hi, sc[r] + kChunk, kNegInf);
        // Masks: added to (or, bool, taking out) the scores of keys [lo, hi).
        if (row.mask) {
          for (int j = lo; j < hi; ++j) {
            int64_t mi = int64_t(c0 + j) * row.mask_st;
            if (a.mask_is_bool) {
              if (!static_cast<const uint8_t*>(row.mask)[mi]) {
                sc[r][j] = kNegInf;
              }
            } else {
              sc[r][j] += static_cast<const float*>(row.mask)[mi];
            }
          }
        }
      }
      if (a.bias_rank > 0) {
        add_score_bias(a, rows, R, c0, n, sc); // the key-offset correction (kernels_impl.h)
      }
      // Softmax update: sc becomes the chunk's probabilities. Every row's
      // largest score first, then the (rare) rescaling of rows with a new
      // max, then the exps: in a loop of their own, with no call in it,
      // the exp's constants stay in registers (a vbroadcastss of each per
      // row before).
      float cmax[kMaxRows];
#if defined(KVSNAP_ROW_SOFTMAX)
      rows_max(sc, R, cmax); // the instruction set's form of the loop below
#else
      for (int r = 0; r < R; ++r) {
        v8f vmax = load(&sc[r][0]);
        for (int j = 8; j < kChunk; j += 8) {
          v8f x = load(&sc[r][j]);
          vmax = vmax > x ? vmax : x;
        }
        cmax[r] = hmax(vmax);
      }
#endif
      for (int r = 0; r < R; ++r) {
        if (cmax[r] == kNegInf) {
          active[r] = false;
          continue;
        }
        const float m_new = std::max(m[r], cmax[r]);
        if (m_new != m[r]) {
          float corr = std::exp(m[r] - m_new);
          scale_row(corr, l_lanes[r], 16);
          scale_row(corr, b_lanes[r][0], 16 * n_groups);
          scale_row(corr, acc_perm[r], NV * kLanes);
          m[r] = m_new;
        }
      }
      for (int r = 0; r < R; ++r) {
        if (!active[r]) {
          continue;
        }
#if defined(KVSNAP_ROW_SOFTMAX)
        row_exp(sc[r], m[r], l_lanes[r]);
#else
        v8f sum = splat(0.f), mv = splat(m[r]);
        for (int j = 0; j < kChunk; j += 8) {
          v8f p = simd::exp_neg(load(&sc[r][j]) - mv);
          store(&sc[r][j], p);
          sum += p;
        }
        store(l_lanes[r], load(l_lanes[r]) + sum);
#endif
      }
      prefetch_chunk(ahead, j_next, n_next, true, v_row_bytes, n_groups, kScaleBytes);
      // Values of the chunk: scales/biases by group (0 past n), codes interleaved.
      for (int j = 0; j < kChunk; j += 8) {
        const int nj = std::clamp(n - j, 0, 8);
        load_params8<SD>(
            static_cast<const char*>(run.vs) + (j0 + j) * run.st[4] * kScaleBytes, run.st[4], n_groups, nj, &v_scale[0][j], kChunk);
        load_params8<SD>(
            static_cast<const char*>(run.vb) + (j0 + j) * run.st[5] * kScaleBytes, run.st[5], n_groups, nj, &v_bias[0][j], kChunk);
      }
      const int n_blocks = (n + 3) / 4;
      const uint8_t* const v0 = reinterpret_cast<const uint8_t*>(run.vp + j0 * run.st[3]);
      const int64_t v_st = run.st[3] * 4;
      if (n == kChunk) { // a whole chunk: no key past n, the rows by one stepped pointer
        // The row length a constant where it is one of the common ones (head
        // dim 64 or 128 at 4 bits): interleave4's loop over its 64-byte
        // parts, and their masks, then go away.
        const auto whole = [&](auto row_bytes) __attribute__((always_inline)) {
          const uint8_t* vb = v0;
          for (int blk = 0; blk < kBlocks; ++blk, vb += 4 * v_st) {
            const uint8_t* v[4] = {vb, vb + v_st, vb + 2 * v_st, vb + 3 * v_st};
            interleave4<VB>(v, int(row_bytes), xv[blk]);
          }
        };
        if (v_row_bytes == 64) {
          whole(std::integral_constant<int, 64>{});
        } else if (v_row_bytes == 32) {
          whole(std::integral_constant<int, 32>{});
        } else {
          whole(v_row_bytes);
        }
      } else {
        for (int blk = 0; blk < n_blocks; ++blk) {
          const uint8_t* v[4];
          for (int u = 0; u < 4; ++u) {
            int j = 4 * blk + u;
            v[u] = j < n ? v0 + j * v_st : kZeroRow;
          }
          interleave4<VB>(v, v_row_bytes, xv[blk]);
        }
      }
      for (int blk = n_blocks; blk < kBlocks; ++blk) {
        std::fill(xv[blk], xv[blk] + NV, IVec{});
      }
      // Weights w_tg = p_t s_tg in int8, one step per group; bias sums
      // (with the code offset's share: sum_t w_t * offset). Every row's
      // first, then the rows' P.V products: a row's weights are a chain of
      // dependent steps (largest |w|, its inverse, the rounding), and made
      // between two rows' products they held the next row back; in a loop
      // of their own the rows' chains overlap (a 32K decode call 0.95x as
      // long, RESULTS.md).
      constexpr int WP = VB == 8 ? 2 : 1; // weight planes (8 bits: int8 + residual)
      alignas(64) int8_t w8s[kMaxRows][WP][16][kChunk];
      float steps[kMaxRows][WP][16]; // [row][plane][group]: the int8 weights' step (8 bits: the residual plane's too)
#if defined(KVSNAP_BLOCK_WEIGHTS)
      PackedWeights packs[kMaxRows]; // [row]: the weights w8[0] in a register, if row_weights4 made them (ok)
#endif
      int act[kMaxRows]; // the active rows
      int n_act = 0;
      for (int r = 0; r < R; ++r) {
        if (!active[r]) {
          continue;
        }
        act[n_act++] = r;
        auto& w8 = w8s[r];
        auto& step = steps[r];
        std::fill(step[0], step[0] + WP * 16, 0.f);
#if defined(KVSNAP_BLOCK_WEIGHTS)
        auto& packed = packs[r];
        packed.ok = false;
#endif
#if defined(KVSNAP_ROW_WEIGHTS)
        // The instruction set's own form of the loop below (4-bit values).
        if constexpr (VB == 4 && kCodeOffset == 0.f) {
          row_weights4(sc[r], v_scale, v_bias, n_groups, w8[0], step[0], b_lanes[r], packed);
        } else
#endif
        for (int g = 0; g < n_groups; ++g) {
          v8f w[kChunk / 8];
          v8f bs = splat(0.f), amax = splat(0.f);
          for (int j = 0; j < kChunk; j += 8) {
            v8f p = load(&sc[r][j]);
            w[j / 8] = p * load(&v_scale[g][j]);
            bs += p * load(&v_bias[g][j]);
            v8f a = reinterpret_cast<v8f>(reinterpret_cast<v8i>(w[j / 8]) & 0x7fffffff); // |w|
            amax = amax > a ? amax : a;
          }
          float w_max = hmax(amax);
          // Weights below 1e-30 (denormal probabilities; kWMax / w_max would
          // overflow) count as 0: the largest probability of a chunk with a
          // new max is 1.
          float inv = w_max > 1e-30f ? float(kWMax) / w_max : 0.f;
          step[0][g] = w_max / float(kWMax);
          step[WP - 1][g] = WP == 2 ? step[0][g] / float(2 * kWMax) : step[0][g];
          v8f w_sum[WP] = {};
          for (int j = 0; j < kChunk; j += 8) {
            v8f x = w[j / 8] * splat(inv);
            store_int8(&w8[0][g][j], x);
            if constexpr (VB == 8 || kCodeOffset != 0.f) {
              w_sum[0] += round_even(x);
            }
            if constexpr (VB == 8) {
              v8f xr = round_even(x);
              v8f res = round_even((x - xr) * splat(float(2 * kWMax)));
              res = res > splat(float(kWMax)) ? splat(float(kWMax)) : res;
              res = res < splat(float(-kWMax)) ? splat(float(-kWMax)) : res;
              store_int8(&w8[WP - 1][g][j], res);
              w_sum[WP - 1] += res;
            }
          }
          store(b_lanes[r][g], load(b_lanes[r][g]) + bs);
          if constexpr (kCodeOffset != 0.f) {
            float b_sum = kCodeOffset * step[0][g] * hsum(w_sum[0]);
            if constexpr (VB == 8) {
              b_sum += kCodeOffset * step[WP - 1][g] * hsum(w_sum[WP - 1]);
            }
            b_lanes[r][g][0] += b_sum;
          }
        }
      }
      if (layout.blocks_uniform) {
        // Column block by column block: one weight vector per block of 4
        // keys serves all the column block's vectors (whole chunks: the
        // codes of keys past n are zeros). kPvRows rows at a time: each
        // code vector is loaded once for them, and the rows' weight vectors
        // are read by the dot products themselves (AVX-512, 4 rows: a row at
        // a time, every code vector was loaded once per row, 14% more
        // instructions in this loop; AVX2's 16 registers hold one row's).
        constexpr int VPB = VB == 4 ? 8 : 4; // layout.vec_per_block
        const auto rows_pv = [&](const int* rs, auto nr) __attribute__((always_inline)) {
          constexpr int NR = decltype(nr)::value;
          for (int k0 = 0, cb = 0; k0 < NV; k0 += VPB, ++cb) {
            for (int plane = 0; plane < WP; ++plane) {
              FVec f[NR];
              alignas(64) IVec w[NR][kBlocks];
              for (int q = 0; q < NR; ++q) {
                const int r = rs[q];
                f[q] = lane_steps(steps[r][plane], layout.block_group[cb], layout.block_quad[cb]);
#if defined(KVSNAP_BLOCK_WEIGHTS)
                if (!block_weights(w8s[r][plane], n_groups, layout.block_group[cb], w[q], plane == 0 ? packs[r] : PackedWeights{}))
#endif
                for (int blk = 0; blk < kBlocks; ++blk) {
                  w[q][blk] = lane_weights(&w8s[r][plane][0][4 * blk], layout.block_group[cb], layout.block_quad[cb]);
                }
              }
              // Unrolled by two on AVX2: fully unrolled (8 x 8 steps), a
              // decode call took 1-3% longer on AMD Zen 3 (same bits).
#if defined(__AVX2__) && !defined(__AVX512F__)
#pragma GCC unroll 2
#endif
              for (int i = 0; i < VPB; ++i) {
                IVec s[NR];
                for (int q = 0; q < NR; ++q) {
                  s[q] = IVec{};
                }
                for (int blk = 0; blk < kBlocks; ++blk) {
                  const IVec codes = xv[blk][k0 + i];
                  for (int q = 0; q < NR; ++q) {
                    s[q] = dot_step<VB>(s[q], codes, w[q][blk]);
                  }
                }
                for (int q = 0; q < NR; ++q) {
                  fma_lanes(acc_perm[rs[q]] + kLanes * (k0 + i), dot_finish<VB>(s[q]), f[q]);
                }
              }
            }
          }
        };
        for (int a0 = 0; a0 < n_act; a0 += kPvRows) {
          const int nr = std::min(kPvRows, n_act - a0);
          if constexpr (kPvRows >= 4) {
            if (nr == 4) {
              rows_pv(act + a0, std::integral_constant<int, 4>{});
              continue;
            }
          }
          if constexpr (kPvRows >= 3) {
            if (nr == 3) {
              rows_pv(act + a0, std::integral_constant<int, 3>{});
              continue;
            }
          }
          if constexpr (kPvRows >= 2) {
            if (nr == 2) {
              rows_pv(act + a0, std::integral_constant<int, 2>{});
              continue;
            }
          }
          rows_pv(act + a0, std::integral_constant<int, 1>{});
        }
        continue;
      }
      for (int a0 = 0; a0 < n_act; ++a0) {
        const int r = act[a0];
        auto& w8 = w8s[r];
        auto& step = steps[r];
        float* out = acc_perm[r];
        // Otherwise (4-bit groups of 16) per vector: each pattern's steps
        // per lane, and its weights for each block of 4 keys, first.
        alignas(64) float f[WP][Layout::kMaxVec][kLanes];
        for (int p = 0; p < layout.n_pat; ++p) {
          for (int x = 0; x < kLanes; ++x) {
            for (int plane = 0; plane < WP; ++plane) {
              f[plane][p][x] = step[plane][layout.group[p][x]];
            }
          }
        }
        alignas(64) IVec wl[WP][kBlocks][Layout::kMaxVec];
        for (int plane = 0; plane < WP; ++plane) {
          for (int blk = 0; blk < n_blocks; ++blk) {
            for (int p = 0; p < layout.n_pat; ++p) {
              wl[plane][blk][p] = lane_weights(&w8[plane][0][4 * blk], layout.group[p], layout.quad[p]);
            }
          }
        }
        for (int k = 0; k < NV; ++k) {
          const int p = layout.pat[k];
          for (int plane = 0; plane < WP; ++plane) {
            IVec s = {};
            for (int blk = 0; blk < n_blocks; ++blk) {
              s = dot_step<VB>(s, xv[blk][k], wl[plane][blk][p]);
            }
            fma_lanes(out + kLanes * k, dot_finish<VB>(s), f[plane][p]);
          }
        }
      }
    }
    t = run_end;
  }
  // Back to element order, bias sums added.
  const int gs_shift = __builtin_ctz(unsigned(gs)); // group sizes are powers of 2
  for (int r = 0; r < R; ++r) {
    l[r] = hsum(load(l_lanes[r]) + load(l_lanes[r] + 8));
    float bias_sum[16];
    for (int g = 0; g < n_groups; ++g) {
      bias_sum[g] = hsum(load(b_lanes[r][g]) + load(b_lanes[r][g] + 8));
    }
    float* out = acc + size_t(r) * D;
    int d = 0;
#if defined(__AVX512F__)
    // 16 elements (one group's) by a gather: the scalar loop took ~1% of a
    // decode call (split into parts of 512 keys, each part does this).
    for (; gs >= 16 && d + 16 <= D; d += 16) {
      const __m512i idx = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(layout.lane + d)));
      const __m512 x = _mm512_i32gather_ps(idx, acc_perm[r], 4);
      _mm512_storeu_ps(out + d, _mm512_add_ps(x, _mm512_set1_ps(bias_sum[d >> gs_shift])));
    }
#endif
    for (; d < D; ++d) {
      out[d] = acc_perm[r][layout.lane[d]] + bias_sum[d >> gs_shift];
    }
  }
}

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA
