// y = x @ W.T (+ bias) with W kept quantized: GGUF q8_0 / q4_0 / q4_1 blocks (the file's bytes) or
// bitsandbytes NF4 (double-quantized absmax). x fp32 or bf16 [M, K]; fp32 accumulation; y in x's dtype
// (bias added before the one rounding). The spec is kernels/quant_reference.py.
//
// Every format is read as groups of 32 weights along K: a group decodes (in registers) to 32 small
// values q (int8 for q8_0, nibble - 8 for q4_0, nibble for q4_1, the NF4 code value for nf4) and
// w = q * d + m with one scale d (nf4: the 64-block's absmax, decoded from its double quantization)
// and one offset m (q4_1 only). The group's 32 values come out in the order the bytes hold them; for
// nf4 (element 2j in the high nibble of byte j) that is not k order, so x is permuted the same way
// once per call (odd elements first, then even ones, within each group) and the dot products agree.
//
// Paths:
//  - M <= 8 (decode): bytes-bound. Each output row's blocks are read once, decoded in registers and
//    dotted with all M rows of x: sum_g d_g * (q_g . x_g) + m_g * sum(x_g). Threads split the rows.
//  - M >= 9: x is packed once in blocks of 16 columns; each thread dequantizes a panel of 24 weight
//    rows x 256 k to fp32 (in L1) once and reuses it for every block of x: 6 x 16 tiles of y.T, each
//    weight broadcast against 16 columns of x (12 accumulators, no horizontal sums).
//  - impl 0 sends 1-8 rows of q8_0 / q4_0 / q4_1 to qgemv_i16.cpp (activation rounded to int16 per
//    group, integer dots: 2.x faster at one row; error bound there); impl 2 keeps fp32 activations.
// Vectorized with AVX2 + FMA + F16C (so x86-64-v3 and every AVX-512 machine); a portable scalar
// path does the same math elsewhere (and can be forced for tests: impl = 1).
#include "loramux_cpu.h"
#include "avx2_reduce.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORAMUX_QAVX2 1
#endif

namespace loramux {
namespace {

enum Fmt : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kNF4 = 3 };
constexpr int64_t kGroup = 32;
constexpr int64_t kPanelRows = 24;  // weight rows per GEMM panel (4 x 6-row tiles)
constexpr int64_t kChunk = 256;     // k per GEMM panel chunk (the panel and a 16-column x block fit L1)
// Up to this many rows, decoding each block once in registers for all rows beats the panel GEMM (q4_0
// 8192x2048, one run: 8 rows 2.7-3.4 ms on the int16 path vs 9 rows 4.9 ms on the panel GEMM).
constexpr int64_t kDecodeRows = 8;
alignas(32) constexpr float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <int F>
constexpr int64_t group_bytes() {
  return F == kQ8_0 ? 34 : F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 16;
}
template <int F>
constexpr int64_t qs_offset() {  // where the group's quants start
  return F == kQ8_0 || F == kQ4_0 ? 2 : F == kQ4_1 ? 4 : 0;
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef LORAMUX_QAVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// The weight and what its groups need.
struct QWeight {
  const uint8_t* data;
  int64_t row_bytes, K;
  const uint8_t* absmax_q;     // nf4
  const float* absmax_scale;   // nf4
  float offset;                // nf4
  const float* dyn;            // nf4: the 256-entry dynamic map
};

// Scale d and offset m of group g of row n.
template <int F>
inline void group_scale(const QWeight& w, int64_t n, int64_t g, float& d, float& m) {
  const uint8_t* gp = w.data + n * w.row_bytes + g * group_bytes<F>();
  m = 0.f;
  if constexpr (F == kNF4) {
    const int64_t blk = n * (w.K / 64) + g / 2;
    d = w.dyn[w.absmax_q[blk]] * w.absmax_scale[blk >> 8] + w.offset;
  } else {
    d = f16(gp);
    if constexpr (F == kQ4_1) m = f16(gp + 2);
  }
}

// The 32 values q of a group, in byte order (q4: the 16 low nibbles, then the 16 high nibbles).
template <int F>
inline void decode_scalar(const uint8_t* gp, float* q) {
  const uint8_t* qs = gp + qs_offset<F>();
  if constexpr (F == kQ8_0) {
    for (int j = 0; j < 32; ++j) q[j] = static_cast<float>(static_cast<int8_t>(qs[j]));
  } else {
    for (int j = 0; j < 16; ++j) {
      const int lo = qs[j] & 0x0F, hi = qs[j] >> 4;
      if constexpr (F == kQ4_0) {
        q[j] = static_cast<float>(lo - 8);
        q[j + 16] = static_cast<float>(hi - 8);
      } else if constexpr (F == kQ4_1) {
        q[j] = static_cast<float>(lo);
        q[j + 16] = static_cast<float>(hi);
      } else {
        q[j] = kNF4Code[lo];
        q[j + 16] = kNF4Code[hi];
      }
    }
  }
}

#ifdef LORAMUX_QAVX2
inline __m256 nf4_lookup(__m128i nib8) {  // 8 nibbles in the low bytes -> 8 code values
  const __m256i idx = _mm256_cvtepu8_epi32(nib8);
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(kNF4Code), idx);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(kNF4Code + 8), idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 picks
}

template <int F>
inline void decode_vec(const uint8_t* gp, __m256 q[4]) {
  const uint8_t* qs = gp + qs_offset<F>();
  if constexpr (F == kQ8_0) {
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i))));
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    if constexpr (F == kNF4) {
      q[0] = nf4_lookup(lo);
      q[1] = nf4_lookup(_mm_srli_si128(lo, 8));
      q[2] = nf4_lookup(hi);
      q[3] = nf4_lookup(_mm_srli_si128(hi, 8));
    } else if constexpr (F == kQ4_0) {
      lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
      hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
      q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
      q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
      q[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
      q[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    } else {
      q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    }
  }
}

#endif

// Decode-sized inputs: out[r * N + n] (fp32) for rows n in [n0, n1), MR rows of xf.
template <int F, int MR, bool VEC>
void gemv_rows(const QWeight& w, const float* xf, const float* xsum, int64_t n0, int64_t n1, float* out,
               int64_t N) {
  const int64_t G = w.K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.row_bytes;
    float macc[MR] = {};
    float sacc[MR] = {};
#ifdef LORAMUX_QAVX2
    if constexpr (VEC) {
      __m256 acc[MR];
      for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m256 q[4];
        decode_vec<F>(row + g * group_bytes<F>(), q);
        float d, m;
        group_scale<F>(w, n, g, d, m);
        const __m256 dv = _mm256_set1_ps(d);
        for (int r = 0; r < MR; ++r) {
          const float* xr = xf + r * w.K + g * kGroup;
          __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xr));
          t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xr + 8), t);
          t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xr + 16), t);
          t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xr + 24), t);
          acc[r] = _mm256_fmadd_ps(dv, t, acc[r]);
          if constexpr (F == kQ4_1) macc[r] += m * xsum[r * G + g];
        }
      }
      for (int r = 0; r < MR; ++r) sacc[r] = hsum8(acc[r]);
    }
#endif
    if constexpr (!VEC) {
      float q[32];
      for (int64_t g = 0; g < G; ++g) {
        decode_scalar<F>(row + g * group_bytes<F>(), q);
        float d, m;
        group_scale<F>(w, n, g, d, m);
        for (int r = 0; r < MR; ++r) {
          const float* xr = xf + r * w.K + g * kGroup;
          float t = 0.f;
          for (int j = 0; j < 32; ++j) t += q[j] * xr[j];
          sacc[r] += d * t;
          if constexpr (F == kQ4_1) macc[r] += m * xsum[r * G + g];
        }
      }
    }
    for (int r = 0; r < MR; ++r) out[r * N + n] = sacc[r] + macc[r];
  }
}

// Dequantize rows [n0, n0 + rows) x k [k0, k0 + kc) into buf [kPanelRows][kChunk] (rows past N: 0).
template <int F, bool VEC>
void dequant_panel(const QWeight& w, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* buf) {
  for (int64_t i = 0; i < kPanelRows; ++i) {
    float* dst = buf + i * kChunk;
    if (i >= rows) {
      std::fill(dst, dst + kc, 0.f);
      continue;
    }
    const uint8_t* row = w.data + (n0 + i) * w.row_bytes;
    for (int64_t g = k0 / kGroup; g < (k0 + kc) / kGroup; ++g, dst += kGroup) {
      float d, m;
      group_scale<F>(w, n0 + i, g, d, m);
#ifdef LORAMUX_QAVX2
      if constexpr (VEC) {
        __m256 q[4];
        decode_vec<F>(row + g * group_bytes<F>(), q);
        const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + 8 * j, _mm256_fmadd_ps(q[j], dv, mv));
      }
#endif
      if constexpr (!VEC) {
        float q[32];
        decode_scalar<F>(row + g * group_bytes<F>(), q);
        for (int j = 0; j < 32; ++j) dst[j] = q[j] * d + m;
      }
    }
  }
}

// c[j][0..8*NB) += sum_k w[j][k] * xp[k][0..8*NB) for the 6 weight rows j of w (stride ldw): a 6 x 8NB
// tile of y.T, the weight value broadcast, x packed 8*NB columns wide (6 * NB accumulators).
template <int NB, bool VEC>
inline void tile_6(const float* w, int64_t ldw, const float* xp, int64_t kc, float* c, int64_t ldc) {
#ifdef LORAMUX_QAVX2
  if constexpr (VEC) {
    __m256 acc[6][NB];
    for (int j = 0; j < 6; ++j)
      for (int b = 0; b < NB; ++b) acc[j][b] = _mm256_loadu_ps(c + j * ldc + 8 * b);
    for (int64_t k = 0; k < kc; ++k) {
      __m256 xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(xp + k * 8 * NB + 8 * b);
      for (int j = 0; j < 6; ++j) {
        const __m256 wv = _mm256_broadcast_ss(w + j * ldw + k);
        for (int b = 0; b < NB; ++b) acc[j][b] = _mm256_fmadd_ps(wv, xv[b], acc[j][b]);
      }
    }
    for (int j = 0; j < 6; ++j)
      for (int b = 0; b < NB; ++b) _mm256_storeu_ps(c + j * ldc + 8 * b, acc[j][b]);
  }
#endif
  if constexpr (!VEC) {
    for (int j = 0; j < 6; ++j)
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < 8 * NB; ++i) c[j * ldc + i] += w[j * ldw + k] * xp[k * 8 * NB + i];
  }
}

template <int F, bool VEC>
void run(const QWeight& w, const float* xf, const float* xsum, int64_t M, int64_t N, float* out) {
  const int64_t K = w.K;
  if (M <= kDecodeRows) {
    auto body = [&](int64_t b, int64_t e) {
      switch (M) {
        case 1: gemv_rows<F, 1, VEC>(w, xf, xsum, b, e, out, N); break;
        case 2: gemv_rows<F, 2, VEC>(w, xf, xsum, b, e, out, N); break;
        case 3: gemv_rows<F, 3, VEC>(w, xf, xsum, b, e, out, N); break;
        case 4: gemv_rows<F, 4, VEC>(w, xf, xsum, b, e, out, N); break;
        case 5: gemv_rows<F, 5, VEC>(w, xf, xsum, b, e, out, N); break;
        case 6: gemv_rows<F, 6, VEC>(w, xf, xsum, b, e, out, N); break;
        case 7: gemv_rows<F, 7, VEC>(w, xf, xsum, b, e, out, N); break;
        default: gemv_rows<F, 8, VEC>(w, xf, xsum, b, e, out, N); break;
      }
    };
    at::parallel_for(0, N, 16, body);
    return;
  }
  // x packed in blocks of 16 columns (the last one 8 when M % 16 <= 8): block b is [K][width], zero-padded.
  const int64_t Mp = (M + 7) / 8 * 8;
  std::vector<float> xp(Mp * K, 0.f);
  at::parallel_for(0, K, 256, [&](int64_t kb, int64_t ke) {
    for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
      const int64_t width = std::min<int64_t>(16, Mp - m0);
      float* blk = xp.data() + m0 * K;
      for (int64_t k = kb; k < ke; ++k)
        for (int64_t i = 0; i < width && m0 + i < M; ++i) blk[k * width + i] = xf[(m0 + i) * K + k];
    }
  });
  const int64_t P = (N + kPanelRows - 1) / kPanelRows;
  // Columns of x in chunks of 256 (the packed chunk <= 8 MiB at K 8192 stays in L3 across all panels;
  // all of x at 1024 rows x 8192 did not: 0.8x oneDNN there, ~1.1x elsewhere).
  for (int64_t mc0 = 0; mc0 < Mp; mc0 += 256) {
    const int64_t mc1 = std::min<int64_t>(Mp, mc0 + 256);
    at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
      std::vector<float> buf(kPanelRows * kChunk), ct(kPanelRows * Mp);  // ct = this panel's y.T
      for (int64_t p = pb; p < pe; ++p) {
        const int64_t n0 = p * kPanelRows, rows = std::min(kPanelRows, N - n0);
        std::fill(ct.begin(), ct.end(), 0.f);
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
          const int64_t kc = std::min(kChunk, K - k0);
          dequant_panel<F, VEC>(w, n0, rows, k0, kc, buf.data());
          for (int64_t m0 = mc0; m0 < mc1; m0 += 16) {
            const int64_t width = std::min<int64_t>(16, Mp - m0);
            const float* xb = xp.data() + m0 * K + k0 * width;
            for (int64_t j0 = 0; j0 < rows; j0 += 6) {
              if (width == 16)
                tile_6<2, VEC>(buf.data() + j0 * kChunk, kChunk, xb, kc, ct.data() + j0 * Mp + m0, Mp);
              else
                tile_6<1, VEC>(buf.data() + j0 * kChunk, kChunk, xb, kc, ct.data() + j0 * Mp + m0, Mp);
            }
          }
        }
        for (int64_t m = mc0; m < std::min(mc1, M); ++m)
          for (int64_t j = 0; j < rows; ++j) out[m * N + n0 + j] = ct[j * Mp + m];
      }
    });
  }
}

template <bool VEC>
void dispatch(int fmt, const QWeight& w, const float* xf, const float* xsum, int64_t M, int64_t N, float* out) {
  switch (fmt) {
    case kQ8_0: run<kQ8_0, VEC>(w, xf, xsum, M, N, out); break;
    case kQ4_0: run<kQ4_0, VEC>(w, xf, xsum, M, N, out); break;
    case kQ4_1: run<kQ4_1, VEC>(w, xf, xsum, M, N, out); break;
    default: run<kNF4, VEC>(w, xf, xsum, M, N, out); break;
  }
}

}  // namespace

bool quant_linear_vectorized() {
#ifdef LORAMUX_QAVX2
  return true;
#else
  return false;
#endif
}

at::Tensor quant_linear(at::Tensor x, at::Tensor data, int64_t fmt, int64_t n_out, int64_t k_in,
                           at::Tensor absmax_q, at::Tensor absmax_scale, double absmax_offset,
                           at::Tensor dyn_map, c10::optional<at::Tensor> bias, int64_t impl) {
  TORCH_CHECK(fmt >= 0 && fmt <= 3, "unknown quantized format id ", fmt);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a CPU float32 or bfloat16 [M, K]");
  TORCH_CHECK(x.size(1) == k_in, "x has ", x.size(1), " columns, the weight ", k_in);
  const int64_t block = fmt == kNF4 ? 64 : 32;
  TORCH_CHECK(k_in > 0 && k_in % block == 0 && n_out > 0, "K must be a positive multiple of ", block);
  const int64_t gb = fmt == kQ8_0 ? 34 : fmt == kQ4_0 ? 18 : fmt == kQ4_1 ? 20 : 16;
  const int64_t row_bytes = k_in / kGroup * gb;
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.is_contiguous() &&
                  data.numel() == n_out * row_bytes, "data must be contiguous uint8 with ", n_out * row_bytes, " bytes");
  QWeight w{data.data_ptr<uint8_t>(), row_bytes, k_in, nullptr, nullptr, static_cast<float>(absmax_offset), nullptr};
  if (fmt == kNF4) {
    const int64_t nb = n_out * k_in / 64;
    TORCH_CHECK(absmax_q.scalar_type() == at::kByte && absmax_q.is_contiguous() && absmax_q.numel() == nb, "bad nf4 absmax");
    TORCH_CHECK(absmax_scale.scalar_type() == at::kFloat && absmax_scale.is_contiguous() &&
                    absmax_scale.numel() == (nb + 255) / 256, "bad nf4 absmax_scale");
    TORCH_CHECK(dyn_map.scalar_type() == at::kFloat && dyn_map.is_contiguous() && dyn_map.numel() == 256, "bad dynamic map");
    w.absmax_q = absmax_q.data_ptr<uint8_t>();
    w.absmax_scale = absmax_scale.data_ptr<float>();
    w.dyn = dyn_map.data_ptr<float>();
  }
  c10::optional<at::Tensor> bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n_out && bias->dim() == 1, "bias must have ", n_out, " values");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const int64_t M = x.size(0), K = k_in, G = K / kGroup;
  // x as fp32 in the weight's group order (nf4: odd elements then even ones), and per-group sums (q4_1).
  auto xf_t = x.to(at::kFloat).contiguous();
  if (fmt == kNF4) xf_t = xf_t.view({M, G, 16, 2}).transpose(2, 3).flip(2).contiguous().view({M, K});
  at::Tensor xsum_t;
  if (fmt == kQ4_1) xsum_t = xf_t.view({M, G, kGroup}).sum(2).contiguous();
  auto out = x.new_empty({M, n_out}, x.options().dtype(at::kFloat));
  if (M > 0) {
    const float* xsum = fmt == kQ4_1 ? xsum_t.data_ptr<float>() : nullptr;
    if (impl == 0 && quant_gemv_i16(w.data, fmt, row_bytes, K, xf_t.data_ptr<float>(), xsum, M, n_out,
                                    out.data_ptr<float>())) {
      // done: 1-8 rows of q8_0 / q4_0 / q4_1 on the int16-activation path (qgemv_i16.cpp)
    } else if (impl != 1 && quant_linear_vectorized())
      dispatch<true>(static_cast<int>(fmt), w, xf_t.data_ptr<float>(), xsum, M, n_out, out.data_ptr<float>());
    else
      dispatch<false>(static_cast<int>(fmt), w, xf_t.data_ptr<float>(), xsum, M, n_out, out.data_ptr<float>());
  }
  if (bias_f.has_value()) out.add_(*bias_f);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace loramux
