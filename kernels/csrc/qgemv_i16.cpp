// Decode-sized (1-8 rows) quantized matmul for q8_0 / q4_0 / q4_1 with the activation rounded to
// int16 per group of 32: the integer-dot path of qgemm_cpu.cpp's quant_linear (impl 0, AVX2).
//
// Why: at one row the fp32 path spends ~25 instructions per 32 weights widening nibbles to floats,
// so a 4-bit base ran at 3x its bytes floor. Here a group's 32 weights widen to two vectors of int16
// (3-5 instructions) and vpmaddwd multiplies 16 pairs per instruction against the int16 activation;
// one float conversion and one FMA per group apply the scales.
//
// Numerics: x_k = s_g * xi_k with s_g = max|x| over the group / 32767 and xi_k = round(x_k / s_g),
// so |x_k - s_g xi_k| <= s_g / 2 (a relative error of at most 2^-16 of the group's largest value:
// 256x finer than llama.cpp's int8 activations, and finer than bf16's own rounding of x). Integer
// sums are exact (|partial| < 2^24, so the int32 -> float conversion is exact too); the rest is
// fp32. Per output: |y - x @ W.T| <= sum_g (s_g / 2) sum_{k in g} |w_k| + fp32 summation error.
// q4_1's offset term m_g * sum(x_g) uses the exact fp32 group sums.
#include "loramux_cpu.h"
#include "avx2_reduce.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORAMUX_I16 1
#endif

namespace loramux {

#ifdef LORAMUX_I16
namespace {

constexpr int64_t kGroup = 32;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One group of x (32 floats) -> 32 int16 and its scale.
inline float quantize_group(const float* x, int16_t* xi) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], abs_mask));
  }
  const float amax = hmax8(mx);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
  for (int i = 0; i < 2; ++i) {  // round to nearest (MXCSR default), pack with saturation, undo the lane interleave
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], inv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xi + 16 * i),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
  }
  return amax / 32767.f;
}

// Software prefetch this far ahead of the group being decoded: each core's hardware prefetch alone
// kept one thread's stream at ~7.7 GB/s; with it the 1B shape's 663 MiB of q4_0 stream 1.2-1.4x faster
// (noisy shared machine: 1024-2048 bytes all helped).
constexpr int64_t kPrefetchBytes = 1536;

template <int F>
constexpr int64_t group_bytes() {
  return F == 0 ? 34 : F == 1 ? 18 : 20;
}

// out[r * N + n] for rows n in [n0, n1), MR rows of the int16 activation. U accumulators per row take
// turns (groups g, g+1, ...), so at 1-2 rows the FMA's latency does not serialize the groups.
template <int F, int MR>
void gemv_i16(const uint8_t* data, int64_t row_bytes, int64_t K, const int16_t* xi, const float* xs,
              const float* xsum, int64_t n0, int64_t n1, float* out, int64_t N) {
  constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  const int64_t G = K / kGroup;
  const __m256i nib = _mm256_set1_epi16(0x0F), eight = _mm256_set1_epi16(8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = data + n * row_bytes;
    __m256 acc[MR][U];
    float macc[MR] = {};
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    auto group = [&](int64_t g, int u) {
      const uint8_t* gp = row + g * group_bytes<F>();
      _mm_prefetch(reinterpret_cast<const char*>(gp + kPrefetchBytes), _MM_HINT_T0);
      __m256i lo, hi;  // weights k 0..15 and 16..31 of the group, as int16
      if constexpr (F == 0) {
        lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + 2)));
        hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + 18)));
      } else {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + (F == 1 ? 2 : 4))));
        lo = _mm256_and_si256(b, nib);
        hi = _mm256_srli_epi16(b, 4);
        if constexpr (F == 1) {
          lo = _mm256_sub_epi16(lo, eight);
          hi = _mm256_sub_epi16(hi, eight);
        }
      }
      const float d = half_at(gp);
      for (int r = 0; r < MR; ++r) {
        const int16_t* xr = xi + r * K + g * kGroup;
        const __m256i p = _mm256_add_epi32(
            _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
        acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xs[r * G + g]), acc[r][u]);
        if constexpr (F == 2) macc[r] += half_at(gp + 2) * xsum[r * G + g];
      }
    };
    int64_t g = 0;
    for (; g + U <= G; g += U)
      for (int u = 0; u < U; ++u) group(g + u, u);
    for (; g < G; ++g) group(g, 0);
    for (int r = 0; r < MR; ++r) {
      __m256 a = acc[r][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[r][u]);
      out[r * N + n] = hsum8(a) + macc[r];
    }
  }
}

template <int F>
void run_i16(const uint8_t* data, int64_t row_bytes, int64_t K, const int16_t* xi, const float* xs,
             const float* xsum, int64_t M, int64_t N, float* out) {
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: gemv_i16<F, 1>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      case 2: gemv_i16<F, 2>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      case 3: gemv_i16<F, 3>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      case 4: gemv_i16<F, 4>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      case 5: gemv_i16<F, 5>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      case 6: gemv_i16<F, 6>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      case 7: gemv_i16<F, 7>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
      default: gemv_i16<F, 8>(data, row_bytes, K, xi, xs, xsum, b, e, out, N); break;
    }
  });
}

}  // namespace
#endif

bool quant_gemv_i16(const uint8_t* data, int64_t fmt, int64_t row_bytes, int64_t K, const float* xf,
                    const float* xsum, int64_t M, int64_t N, float* out) {
#ifdef LORAMUX_I16
  if (fmt > 2 || M < 1 || M > 8 || K % kGroup != 0) return false;
  const int64_t G = K / kGroup;
  std::vector<int16_t> xi(M * K);
  std::vector<float> xs(M * G);
  for (int64_t i = 0; i < M * G; ++i) xs[i] = quantize_group(xf + i * kGroup, xi.data() + i * kGroup);
  switch (fmt) {
    case 0: run_i16<0>(data, row_bytes, K, xi.data(), xs.data(), xsum, M, N, out); break;
    case 1: run_i16<1>(data, row_bytes, K, xi.data(), xs.data(), xsum, M, N, out); break;
    default: run_i16<2>(data, row_bytes, K, xi.data(), xs.data(), xsum, M, N, out); break;
  }
  return true;
#else
  (void)data, (void)fmt, (void)row_bytes, (void)K, (void)xf, (void)xsum, (void)M, (void)N, (void)out;
  return false;
#endif
}

}  // namespace loramux
