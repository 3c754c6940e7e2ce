// y = x @ W.T (+ bias) in fp32 over a weight pre-packed in 48-column panels: the fp32 sibling of
// gemm_bf16.cpp (same 8 x 48 tiles of 24 accumulators, each panel loaded once for all rows, the next
// panel streamed into L2 meanwhile), with vfmadd231ps on broadcast x values.
//
// Packed layout: [num_panels, K, 48]: element (p, k, n) is W[p*48 + n, k] (0 beyond N).
#include "loramux_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "vec512.h"

namespace loramux {
namespace {

constexpr int64_t kNR = 48;
constexpr int64_t kMR = 8;

#ifdef LORAMUX_AVX512
inline void tile_f32(const float* x, int64_t ldx, int64_t mr, const float* panel, int64_t K, float* y, int64_t ldy,
                     int64_t nr, const float* bias, Prefetcher& pf, int lines_per_step) {
  const float* rows[kMR];
  for (int64_t m = 0; m < kMR; ++m) rows[m] = x + (m < mr ? m : 0) * ldx;  // spare rows re-read row 0
  __m512 c[kMR][3];
  for (int64_t m = 0; m < kMR; ++m) c[m][0] = c[m][1] = c[m][2] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    pf.step(lines_per_step);
    const float* b = panel + k * kNR;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32);
    for (int64_t m = 0; m < kMR; ++m) {
      const __m512 a = _mm512_set1_ps(rows[m][k]);
      c[m][0] = _mm512_fmadd_ps(a, b0, c[m][0]);
      c[m][1] = _mm512_fmadd_ps(a, b1, c[m][1]);
      c[m][2] = _mm512_fmadd_ps(a, b2, c[m][2]);
    }
  }
  for (int64_t m = 0; m < mr; ++m)
    for (int64_t j = 0; j < 3; ++j) {
      const __mmask16 mk = lanes(nr - 16 * j);
      if (mk == 0) break;
      const __m512 v = bias != nullptr ? _mm512_add_ps(c[m][j], _mm512_maskz_loadu_ps(mk, bias + 16 * j)) : c[m][j];
      _mm512_mask_storeu_ps(y + m * ldy + 16 * j, mk, v);
    }
}
#endif

}  // namespace

bool f32_gemm_available() {
#ifdef LORAMUX_AVX512
  return true;
#else
  return false;
#endif
}

at::Tensor pack_f32_weight(at::Tensor w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.numel() > 0,
              "w must be a CPU float32 [N, K]");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + kNR - 1) / kNR;
  auto packed = w.new_zeros({P, K, kNR});
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t n = 0; n < std::min(kNR, N - p * kNR); ++n)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kNR + n] = src[(p * kNR + n) * K + k];
  });
  return packed;
}

at::Tensor f32_gemm(at::Tensor x, at::Tensor packed, int64_t n_out, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(f32_gemm_available(), "this build has no AVX-512 fp32 GEMM");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] with contiguous rows");
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kNR,
              "bad packed weight");
  const int64_t M = x.size(0), K = packed.size(1), P = packed.size(0);
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(n_out > (P - 1) * kNR && n_out <= P * kNR, "n_out does not match the packed weight");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n_out, "bad bias");
  auto y = x.new_empty({M, n_out});
#ifdef LORAMUX_AVX512
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t ldx = x.stride(0), panel_elems = K * kNR, tiles = (M + kMR - 1) / kMR;
  const int64_t panel_lines = panel_elems * 4 / 64;
  const int lines_per_step = static_cast<int>(std::max<int64_t>(1, (panel_lines + tiles * K - 1) / (tiles * K)));
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const float* panel = wp + p * panel_elems;
      Prefetcher pf;  // the next panel of this thread's range, spread over this panel's tiles
      if (p + 1 < e) pf.add(panel + panel_elems, panel_elems * 4);
      const int64_t nr = std::min(kNR, n_out - p * kNR);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * kMR;
        tile_f32(xp + m0 * ldx, ldx, std::min(kMR, M - m0), panel, K, yp + m0 * n_out + p * kNR, n_out, nr,
                 bp != nullptr ? bp + p * kNR : nullptr, pf, lines_per_step);
      }
      pf.finish();
    }
  });
#endif
  return y;
}

}  // namespace loramux
