// chatfactory's own CPU kernels for int8/int4 weights (model/kernels.py builds this file on first use).
//
// A decode step multiplies a few activation rows by every weight once, so its cost is reading the weights and
// turning their codes into products. These kernels do that as llama.cpp does on a CPU: the activations are
// quantized to int8 in blocks of 32 columns (a scale per block, and the block's exact sum for the int4 offset),
// and each block's products are integer dot products (AVX2's maddubs/madd: 32 codes in a few instructions;
// with AVX-512 VNNI, dpbusd: 64 codes, two blocks, in one), scaled once per block. Without AVX2 the same
// arithmetic runs as plain loops (same results up to fp32 summation order).
//
//   int4_gemv(x (M, K) f32, q (N, K/2) u8, sz (N, K/G, 2) bf16, G) -> (M, N): codes two per byte, column 2j in the
//       low nibble of byte j and 2j + 1 in the high one; w = (code - 8) * scale + offset per group of G columns
//   int8_gemv(x (M, K) f32, q (N, K) i8, scales (N,) f32) -> (M, N): w = code * scale[n]
//   int4_dequant(q, sz, G) -> (N, K) f32: the weight itself (for many rows: one BLAS product on it)
//   simd_bits() -> 512, 256 or 0: the widest integer products this build uses
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CF_AVX2 1
#endif
#if defined(CF_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define CF_AVX512 1  // 512-bit integer dot products (VNNI's dpbusd): two blocks of 32 columns per instruction
#endif

namespace {

constexpr int B = 32;  // activations are quantized to int8 in blocks of 32 columns
constexpr int64_t MAX_BLOCKS = 512;  // blocks in a row the int4 kernel takes (model/kernels.py MAX_WIDTH)
constexpr int PF = 16;  // weight rows ahead that the 512-bit kernels prefetch
constexpr int R = 4;  // activation rows per pass over a weight row (their accumulators stay in registers)

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One int4 group's (scale, offset) pair -> its scale and its low value (offset - 8 scale): w = code * scale + low.
inline void scale_and_low(const uint16_t* pair, float& scale, float& low) {
  scale = bf16_to_float(pair[0]);
  low = bf16_to_float(pair[1]) - 8.f * scale;
}

// One block's integer dot product in plain loops: int4 codes (16 bytes, even columns in the low nibbles) against
// activations stored even columns first; int8 codes against activations in column order.
inline int32_t int4_block_dot(const uint8_t* pb, const int8_t* xb) {
  int32_t dot = 0;
  for (int j = 0; j < B / 2; ++j) dot += (pb[j] & 15) * xb[j] + (pb[j] >> 4) * xb[B / 2 + j];
  return dot;
}

inline int32_t int8_block_dot(const int8_t* w, const int8_t* xb) {
  int32_t dot = 0;
  for (int j = 0; j < B; ++j) dot += w[j] * xb[j];
  return dot;
}

// Activations (M, K) -> int8 codes per block of 32 columns with a scale d (x ~= d * code) and the block's exact sum.
// interleaved: a block's codes are stored even columns first, then odd ones (the int4 codes' nibble order).
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
  QuantX(const float* x, int64_t M, int64_t K, bool interleaved) : q(M * K), d(M * K / B), sum(M * K / B) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < K / B; ++b) {
        const float* xb = x + m * K + b * B;
        float amax = 0.f, s = 0.f;
        for (int j = 0; j < B; ++j) {
          amax = std::max(amax, std::fabs(xb[j]));
          s += xb[j];
        }
        const float dd = amax / 127.f, inv = dd > 0.f ? 1.f / dd : 0.f;
        int8_t* qb = q.data() + m * K + b * B;
        for (int j = 0; j < B; ++j) {
          const int at = interleaved ? (j % 2) * (B / 2) + j / 2 : j;
          qb[at] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
        }
        d[m * (K / B) + b] = dd;
        sum[m * (K / B) + b] = s;
      }
  }
};

#ifdef CF_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef CF_AVX512
// Activations for the 512-bit kernels, in pairs of blocks (64 columns, one register). Row m's pair p holds, for
// the int4 kernel, [even columns of block 2p, even of 2p+1, odd of 2p, odd of 2p+1] (the order in which two
// blocks' nibbles unpack), for the int8 kernel the 64 columns as they are. Beside each pair, per int32 lane of a
// product (a lane sums 4 columns of one block): that block's scale d and its exact sum X. An odd last block
// keeps QuantX's layout and is done by plain loops.
struct QuantX512 {
  int64_t M, K, NB, NP;
  std::vector<int8_t> q;
  std::vector<float> d, sum;  // per block
  std::vector<__m512> dpat, xpat;  // per row and pair
  QuantX512(const float* x, int64_t M_, int64_t K_, bool int4)
      : M(M_), K(K_), NB(K_ / B), NP(K_ / B / 2), q(M_ * K_), d(M_ * NB), sum(M_ * NB), dpat(M_ * NP), xpat(M_ * NP) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < NB; ++b) {
        const float* xb = x + m * K + b * B;
        const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        const float dd = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi))) / 127.f;
        const __m512 inv = _mm512_set1_ps(dd > 0.f ? 1.f / dd : 0.f);
        d[m * NB + b] = dd;
        sum[m * NB + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        int8_t* row = q.data() + m * K;
        auto put = [&](int64_t at, __m512 h) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(row + at),
                           _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(h, inv))));
        };
        if (!int4) {  // columns as they are
          put(b * B, lo);
          put(b * B + 16, hi);
        } else {  // even columns, then odd ones: in a pair, each half beside the other block's
          const bool paired = b / 2 < NP;
          const int64_t at = paired ? (b / 2) * 2 * B + (b % 2) * 16 : b * B, half = paired ? 32 : 16;
          put(at, _mm512_permutex2var_ps(lo, even, hi));
          put(at + half, _mm512_permutex2var_ps(lo, odd, hi));
        }
      }
      for (int64_t p = 0; p < NP; ++p) {
        const float da = d[m * NB + 2 * p], db = d[m * NB + 2 * p + 1];
        const float xa = sum[m * NB + 2 * p], xb = sum[m * NB + 2 * p + 1];
        // int4 lanes: blocks a, b, a, b (4 lanes each); int8 lanes: a (8), b (8)
        dpat[m * NP + p] = int4 ? _mm512_setr_ps(da, da, da, da, db, db, db, db, da, da, da, da, db, db, db, db)
                                : _mm512_setr_ps(da, da, da, da, da, da, da, da, db, db, db, db, db, db, db, db);
        xpat[m * NP + p] = _mm512_setr_ps(xa, xa, xa, xa, xb, xb, xb, xb, xa, xa, xa, xa, xb, xb, xb, xb);
      }
    }
  }
};

// NT output rows (n0, n0 + 1, ...) of the int4 product for RM activation rows (m0, ...), 512-bit. Per pair of
// blocks (64 codes, 32 bytes of a weight row) the codes and the weight's scale s and offset o per lane are made
// once and serve every activation row. A lane's 4 columns of block b add s * d * dot + (o / 8 - s) * X, whose sum
// over the block's 8 lanes is s * d * dot + (o - 8 s) * X, the block's share (w = (code - 8) s + o). Several
// weight rows at once: independent accumulators, so a row's additions do not wait on each other.
template <int NT, int RM>
void int4_tile512(const QuantX512& xq, const uint8_t* __restrict p, const uint16_t* __restrict sz, int64_t NG,
                  int64_t per_group, int64_t m0, int64_t n0, int64_t N, float* __restrict y) {
  const int64_t K = xq.K, NP = xq.NP;
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m512i is = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
  const __m512i io = _mm512_add_epi32(is, _mm512_set1_epi32(1));
  const __m512 eighth = _mm512_set1_ps(0.125f);
  __m512 acc[NT][RM];
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < RM; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < NP; ++j) {
    __m512i c[NT];
    __m512 s[NT], u[NT];
    for (int t = 0; t < NT; ++t) {
      // the weight rows after these, read ahead (PF rows on): a decode step streams weights it has not seen
      _mm_prefetch(reinterpret_cast<const char*>(p + (n0 + t + PF) * (K / 2) + j * B), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(sz + (n0 + t + PF) * NG * 2 + 2 * ((2 * j) / per_group)), _MM_HINT_T0);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (n0 + t) * (K / 2) + j * B));
      c[t] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, m4)),
                                _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), 1);
      int32_t pa, pb;  // the (scale, offset) bf16 pairs of blocks 2j and 2j + 1
      const uint16_t* zn = sz + (n0 + t) * NG * 2;
      std::memcpy(&pa, zn + 2 * ((2 * j) / per_group), 4);
      std::memcpy(&pb, zn + 2 * ((2 * j + 1) / per_group), 4);
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_zextsi128_si256(_mm_setr_epi32(pa, pb, 0, 0))), 16));  // sa, oa, sb, ob
      s[t] = _mm512_permutexvar_ps(is, v);
      u[t] = _mm512_fmsub_ps(_mm512_permutexvar_ps(io, v), eighth, s[t]);
    }
    for (int i = 0; i < RM; ++i) {
      const __m512i x = _mm512_loadu_si512(xq.q.data() + (m0 + i) * K + j * 2 * B);
      const __m512 dp = xq.dpat[(m0 + i) * NP + j], xp = xq.xpat[(m0 + i) * NP + j];
      for (int t = 0; t < NT; ++t) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c[t], x));
        acc[t][i] = _mm512_fmadd_ps(u[t], xp, _mm512_fmadd_ps(s[t], _mm512_mul_ps(dot, dp), acc[t][i]));
      }
    }
  }
  const int64_t tail = xq.NB % 2 ? xq.NB - 1 : -1;  // an odd last block: plain loops
  for (int t = 0; t < NT; ++t) {
    float tscale = 0.f, tlow = 0.f;
    const uint8_t* pn = p + (n0 + t) * (K / 2);
    if (tail >= 0) scale_and_low(sz + (n0 + t) * NG * 2 + 2 * (tail / per_group), tscale, tlow);
    for (int i = 0; i < RM; ++i) {
      const int64_t m = m0 + i;
      float r = _mm512_reduce_add_ps(acc[t][i]);
      if (tail >= 0) {
        const int32_t dot = int4_block_dot(pn + tail * (B / 2), xq.q.data() + m * K + tail * B);
        r += tscale * xq.d[m * xq.NB + tail] * static_cast<float>(dot) + tlow * xq.sum[m * xq.NB + tail];
      }
      y[m * N + n0 + t] = r;
    }
  }
}

// NT output rows of the int8 product for RM activation rows, 512-bit: |w| times x with w's sign (dpbusd
// multiplies unsigned by signed bytes)
template <int NT, int RM>
void int8_tile512(const QuantX512& xq, const int8_t* __restrict q, const float* __restrict scales, int64_t m0,
                  int64_t n0, int64_t N, float* __restrict y) {
  const int64_t K = xq.K, NP = xq.NP;
  __m512 acc[NT][RM];
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < RM; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < NP; ++j) {
    __m512i wabs[NT];
    __mmask64 neg[NT];
    for (int t = 0; t < NT; ++t) {
      _mm_prefetch(reinterpret_cast<const char*>(q + (n0 + t + PF) * K + j * 2 * B), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(q + (n0 + t) * K + j * 2 * B);
      wabs[t] = _mm512_abs_epi8(wv);
      neg[t] = _mm512_movepi8_mask(wv);
    }
    for (int i = 0; i < RM; ++i) {
      const __m512i x = _mm512_loadu_si512(xq.q.data() + (m0 + i) * K + j * 2 * B);
      const __m512 dp = xq.dpat[(m0 + i) * NP + j];
      for (int t = 0; t < NT; ++t) {
        const __m512i sx = _mm512_mask_sub_epi8(x, neg[t], _mm512_setzero_si512(), x);
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs[t], sx));
        acc[t][i] = _mm512_fmadd_ps(dot, dp, acc[t][i]);
      }
    }
  }
  const int64_t tail = xq.NB % 2 ? xq.NB - 1 : -1;
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < RM; ++i) {
      const int64_t m = m0 + i;
      float r = _mm512_reduce_add_ps(acc[t][i]);
      if (tail >= 0) {
        const int32_t dot = int8_block_dot(q + (n0 + t) * K + tail * B, xq.q.data() + m * K + tail * B);
        r += xq.d[m * xq.NB + tail] * static_cast<float>(dot);
      }
      y[m * N + n0 + t] = r * scales[n0 + t];
    }
}

// Weight rows [b0, b1) for activation rows m0 .. m0 + RM - 1: 4 weight rows at a time for one activation row
// (the accumulators of one row alone would wait on each other), 2 for more.
template <int RM, typename Tile>
void tile_rows(int64_t m0, int64_t b0, int64_t b1, Tile& tile) {
  constexpr int NT = RM == 1 ? 4 : 2;
  int64_t n = b0;
  for (; n + NT <= b1; n += NT) tile(std::integral_constant<int, NT>{}, std::integral_constant<int, RM>{}, m0, n);
  for (; n < b1; ++n) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, RM>{}, m0, n);
}

// Weight rows [lo, hi) for every activation row: blocks of weight rows small enough to stay in cache while each
// group of up to R512 activation rows passes over them.
constexpr int R512 = 8;
template <typename Tile>
void tiles512(int64_t M, int64_t lo, int64_t hi, Tile tile) {
  constexpr int64_t NBLK = 32;
  for (int64_t b0 = lo; b0 < hi; b0 += NBLK) {
    const int64_t b1 = std::min(hi, b0 + NBLK);
    for (int64_t m0 = 0; m0 < M; m0 += R512) {
      switch (std::min<int64_t>(R512, M - m0)) {
        case 1: tile_rows<1>(m0, b0, b1, tile); break;
        case 2: tile_rows<2>(m0, b0, b1, tile); break;
        case 3: tile_rows<3>(m0, b0, b1, tile); break;
        case 4: tile_rows<4>(m0, b0, b1, tile); break;
        case 5: tile_rows<5>(m0, b0, b1, tile); break;
        case 6: tile_rows<6>(m0, b0, b1, tile); break;
        case 7: tile_rows<7>(m0, b0, b1, tile); break;
        default: tile_rows<8>(m0, b0, b1, tile);
      }
    }
  }
}
#endif

// one output row n of the int4 product, for every activation row
void int4_row(const QuantX& xq, const uint8_t* __restrict p, const uint16_t* __restrict sz, int64_t per_group,
              int64_t M, int64_t K, int64_t N, int64_t n, float* __restrict y) {
  const int64_t NB = K / B;
  float scale[MAX_BLOCKS], lo[MAX_BLOCKS];  // per block of 32 columns
  for (int64_t b = 0; b < NB; ++b) scale_and_low(sz + 2 * (b / per_group), scale[b], lo[b]);
  const int8_t* __restrict xqq = xq.q.data();
  const float* __restrict xd = xq.d.data();
  const float* __restrict xs = xq.sum.data();
  for (int64_t m0 = 0; m0 < M; m0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, M - m0));
    float low[R] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < rows; ++i) {
      float t = 0.f;
      const float* s = xs + (m0 + i) * NB;
#pragma omp simd reduction(+ : t)
      for (int64_t b = 0; b < NB; ++b) t += lo[b] * s[b];
      low[i] = t;
    }
#ifdef CF_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    const __m128i mask = _mm_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* x0 = xqq + m0 * K;
    const float* d0 = xd + m0 * NB;
#define CF_ROW(I, ACC)                                                                                   \
  if (rows > I) {                                                                                        \
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + I * K + b * B));          \
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones));         \
    ACC = _mm256_fmadd_ps(_mm256_set1_ps(scale[b] * d0[I * NB + b]), dot, ACC);                          \
  }
    for (int64_t b = 0; b < NB; ++b) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b * (B / 2)));
      const __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
      CF_ROW(0, acc0)
      CF_ROW(1, acc1)
      CF_ROW(2, acc2)
      CF_ROW(3, acc3)
    }
#undef CF_ROW
    const __m256 accs[R] = {acc0, acc1, acc2, acc3};
    for (int i = 0; i < rows; ++i) y[(m0 + i) * N + n] = hsum(accs[i]) + low[i];
#else
    for (int i = 0; i < rows; ++i) {
      const int8_t* xm = xqq + (m0 + i) * K;
      const float* dm = xd + (m0 + i) * NB;
      float acc = 0.f;
      for (int64_t b = 0; b < NB; ++b) {
        const int32_t dot = int4_block_dot(p + b * (B / 2), xm + b * B);
        acc += scale[b] * dm[b] * static_cast<float>(dot);
      }
      y[(m0 + i) * N + n] = acc + low[i];
    }
#endif
  }
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_gemv: x must be 2-D float32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "int4_gemv: codes (N, K/2) uint8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) * 2 == K && group % B == 0 && K % group == 0 && K <= MAX_BLOCKS * B,
              "int4_gemv: shapes do not match");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == N * (K / group) * 2,
              "int4_gemv: scales (N, K/G, 2) bfloat16");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t per_group = group / B, NG = K / group;
#ifdef CF_AVX512
  const QuantX512 xq5(xc.data_ptr<float>(), M, K, true);
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    tiles512(M, lo, hi, [&](auto nt, auto rm, int64_t m0, int64_t n0) {
      int4_tile512<decltype(nt)::value, decltype(rm)::value>(xq5, qp, zp, NG, per_group, m0, n0, N, yp);
    });
  });
#else
  const QuantX xq(xc.data_ptr<float>(), M, K, true);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) int4_row(xq, qp + n * (K / 2), zp + n * NG * 2, per_group, M, K, N, n, yp);
  });
#endif
  return y;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_gemv: x must be 2-D float32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "int8_gemv: codes (N, K) int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), NB = K / B;
  TORCH_CHECK(q.size(1) == K && K % B == 0 && scales.numel() == N && scales.scalar_type() == at::kFloat, "int8_gemv: shapes");
  at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* sp = sc.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
#ifdef CF_AVX512
  const QuantX512 xq5(xc.data_ptr<float>(), M, K, false);
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    tiles512(M, lo, hi, [&](auto nt, auto rm, int64_t m0, int64_t n0) {
      int8_tile512<decltype(nt)::value, decltype(rm)::value>(xq5, qp, sp, m0, n0, N, yp);
    });
  });
#else
  const QuantX xq(xc.data_ptr<float>(), M, K, false);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = qp + n * K;
      for (int64_t m0 = 0; m0 < M; m0 += R) {
        const int rows = static_cast<int>(std::min<int64_t>(R, M - m0));
#ifdef CF_AVX2
        __m256 acc[R] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        const __m256i ones = _mm256_set1_epi16(1);
        for (int64_t b = 0; b < NB; ++b) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * B));
          const __m256i wabs = _mm256_sign_epi8(wv, wv);
          for (int i = 0; i < rows; ++i) {
            const int64_t m = m0 + i;
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + m * K + b * B));
            const __m256i prod = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv)), ones);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(xq.d[m * NB + b]), _mm256_cvtepi32_ps(prod), acc[i]);
          }
        }
        for (int i = 0; i < rows; ++i) yp[(m0 + i) * N + n] = hsum(acc[i]) * sp[n];
#else
        float acc[R] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t b = 0; b < NB; ++b)
          for (int i = 0; i < rows; ++i) {
            const int8_t* xb = xq.q.data() + (m0 + i) * K + b * B;
            const int32_t dot = int8_block_dot(w + b * B, xb);
            acc[i] += xq.d[(m0 + i) * NB + b] * static_cast<float>(dot);
          }
        for (int i = 0; i < rows; ++i) yp[(m0 + i) * N + n] = acc[i] * sp[n];
#endif
      }
    }
  });
#endif
  return y;
}

at::Tensor int4_dequant(const at::Tensor& q, const at::Tensor& sz, int64_t group) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "int4_dequant: codes (N, K/2) uint8");
  const int64_t N = q.size(0), K = q.size(1) * 2, NG = K / group;
  TORCH_CHECK(K % group == 0 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == N * NG * 2,
              "int4_dequant: scales (N, K/G, 2) bfloat16");
  at::Tensor w = at::empty({N, K}, q.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < NG; ++g) {
        float scale, lo;
        scale_and_low(zp + (n * NG + g) * 2, scale, lo);
        const uint8_t* pg = qp + n * (K / 2) + g * (group / 2);
        float* out = wp + n * K + g * group;
#pragma omp simd
        for (int64_t j = 0; j < group / 2; ++j) {
          out[2 * j] = static_cast<float>(pg[j] & 15) * scale + lo;
          out[2 * j + 1] = static_cast<float>(pg[j] >> 4) * scale + lo;
        }
      }
  });
  return w;
}

}  // namespace

static int64_t simd_bits() {
#if defined(CF_AVX512)
  return 512;
#elif defined(CF_AVX2)
  return 256;
#else
  return 0;
#endif
}

TORCH_LIBRARY(chatfactory, m) {
  m.def("simd_bits() -> int", &simd_bits);
  m.def("int4_gemv(Tensor x, Tensor q, Tensor sz, int group) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_dequant(Tensor q, Tensor sz, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatfactory, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_dequant", &int4_dequant);
}
