// chatfactory's own CPU kernels for int8/int4 weights (model/kernels.py builds this file on first use).
//
// A decode step multiplies a few activation rows by every weight once, so its cost is reading the weights and
// turning their codes into products. These kernels do that as llama.cpp does on a CPU: the activations are
// quantized to int8 in blocks of 32 columns (a scale per block, and the block's exact sum for the int4 offset),
// and each block's products are integer dot products (AVX2's maddubs/madd: 32 codes in a few instructions),
// scaled once per block. Without AVX2 the same arithmetic runs as plain loops (same results up to fp32
// summation order).
//
//   int4_gemv(x (M, K) f32, q (N, K/2) u8, sz (N, K/G, 2) bf16, G) -> (M, N): codes two per byte, column 2j in the
//       low nibble of byte j and 2j + 1 in the high one; w = (code - 8) * scale + offset per group of G columns
//   int8_gemv(x (M, K) f32, q (N, K) i8, scales (N,) f32) -> (M, N): w = code * scale[n]
//   int4_dequant(q, sz, G) -> (N, K) f32: the weight itself (for many rows: one BLAS product on it)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CF_AVX2 1
#endif

namespace {

constexpr int B = 32;  // activations are quantized to int8 in blocks of 32 columns
constexpr int64_t MAX_BLOCKS = 512;  // blocks in a row the int4 kernel takes (model/kernels.py MAX_WIDTH)
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

  // activation rows per pass over a weight row (their accumulators stay in registers)

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
        int32_t dot = 0;
        const uint8_t* pb = p + b * (B / 2);
        const int8_t* xb = xm + b * B;
        for (int j = 0; j < B / 2; ++j) dot += (pb[j] & 15) * xb[j] + (pb[j] >> 4) * xb[B / 2 + j];
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
  const QuantX xq(xc.data_ptr<float>(), M, K, true);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t per_group = group / B, NG = K / group;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) int4_row(xq, qp + n * (K / 2), zp + n * NG * 2, per_group, M, K, N, n, yp);
  });
  return y;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_gemv: x must be 2-D float32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "int8_gemv: codes (N, K) int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), NB = K / B;
  TORCH_CHECK(q.size(1) == K && K % B == 0 && scales.numel() == N && scales.scalar_type() == at::kFloat, "int8_gemv: shapes");
  at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  const QuantX xq(xc.data_ptr<float>(), M, K, false);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* sp = sc.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
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
            int32_t dot = 0;
            for (int j = 0; j < B; ++j) dot += w[b * B + j] * xb[j];
            acc[i] += xq.d[(m0 + i) * NB + b] * static_cast<float>(dot);
          }
        for (int i = 0; i < rows; ++i) yp[(m0 + i) * N + n] = acc[i] * sp[n];
#endif
      }
    }
  });
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

TORCH_LIBRARY(chatfactory, m) {
  m.def("int4_gemv(Tensor x, Tensor q, Tensor sz, int group) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_dequant(Tensor q, Tensor sz, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatfactory, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_dequant", &int4_dequant);
}
