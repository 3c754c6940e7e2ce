// y = x @ W.T for bf16 x [M, K] and a bf16 weight pre-packed for AVX512-BF16 (vdpbf16ps), fp32
// accumulation, y rounded to bf16 once (nearest even).
//
// Why: at decode the projections are GEMMs with M = batch rows (about 32) and weights streamed from
// memory every step; oneDNN's pre-packed bf16 linears reach 455-633 GFLOP/s there on this CPU (cold
// weights) against about 1 TFLOP/s for a large matmul. This kernel computes 8 x 48 output tiles
// (24 accumulators), walks the weight one 48-column panel at a time (each panel loaded once for all
// rows) and streams the next panel into L2 while the current one computes.
//
// Packed layout: panels of 48 output columns, [num_panels, K/2, 48, 2]: element (p, k2, n, j) is
// W[p*48 + n, 2*k2 + j] (0 beyond N). K must be even.
#include "loramux_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "vec512.h"

#if defined(LORAMUX_AVX512) && defined(__AVX512BF16__)
#define LORAMUX_BF16_GEMM 1
#endif

namespace loramux {
namespace {

constexpr int64_t kNR = 48;  // output columns per panel (3 vectors)
constexpr int64_t kMR = 8;   // rows per tile

#ifdef LORAMUX_BF16_GEMM
// One tile: rows x[0..mr) (mr <= 8) times one panel -> y[0..mr, 0..nr).
inline void tile(const uint16_t* x, int64_t ldx, int64_t mr, const uint16_t* panel, int64_t K2, uint16_t* y,
                 int64_t ldy, int64_t nr, const __m512* bias, Prefetcher& pf, int lines_per_step) {
  const uint16_t* rows[kMR];
  for (int64_t m = 0; m < kMR; ++m) rows[m] = x + (m < mr ? m : 0) * ldx;  // spare rows re-read row 0
  __m512 c[kMR][3];
  for (int64_t m = 0; m < kMR; ++m) c[m][0] = c[m][1] = c[m][2] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    pf.step(lines_per_step);
    const uint16_t* b = panel + k2 * 2 * kNR;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64);
    for (int64_t m = 0; m < kMR; ++m) {
      int32_t pair;
      std::memcpy(&pair, rows[m] + 2 * k2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      c[m][0] = _mm512_dpbf16_ps(c[m][0], a, b0);
      c[m][1] = _mm512_dpbf16_ps(c[m][1], a, b1);
      c[m][2] = _mm512_dpbf16_ps(c[m][2], a, b2);
    }
  }
  for (int64_t m = 0; m < mr; ++m) {
    uint16_t* yr = y + m * ldy;
    for (int64_t j = 0; j < 3; ++j) {
      const __mmask16 mk = lanes(nr - 16 * j);
      if (mk == 0) break;
      // the bias is added before the one rounding, as F.linear does
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(bias != nullptr ? _mm512_add_ps(c[m][j], bias[j]) : c[m][j]);
      _mm256_mask_storeu_epi16(yr + 16 * j, mk, h);
    }
  }
}
#endif

}  // namespace

bool bf16_gemm_available() {
#ifdef LORAMUX_BF16_GEMM
  return true;
#else
  return false;
#endif
}

at::Tensor pack_bf16_weight(at::Tensor w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2, "w must be a CPU bf16 [N, K]");
  TORCH_CHECK(w.size(1) % 2 == 0 && w.size(1) > 0 && w.size(0) > 0, "K must be even and positive");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), K2 = K / 2, P = (N + kNR - 1) / kNR;
  auto packed = w.new_zeros({P, K2, kNR, 2});
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<c10::BFloat16>());
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t n = 0; n < std::min(kNR, N - p * kNR); ++n) {
        const uint16_t* row = src + (p * kNR + n) * K;
        for (int64_t k2 = 0; k2 < K2; ++k2) {
          uint16_t* d = dst + ((p * K2 + k2) * kNR + n) * 2;
          d[0] = row[2 * k2];
          d[1] = row[2 * k2 + 1];
        }
      }
  });
  return packed;
}

at::Tensor bf16_gemm(at::Tensor x, at::Tensor packed, int64_t n_out, c10::optional<at::Tensor> bias) {
  return bf16_gemm_prefetching(x, packed, n_out, bias, {});
}

// `extra`: memory regions (pointer, bytes) that the next op will read (a LoRA adapter's blocks), fetched
// into each thread's L2 a few lines per panel while the GEMM runs.
at::Tensor bf16_gemm_prefetching(at::Tensor x, at::Tensor packed, int64_t n_out,
                                    c10::optional<at::Tensor> bias,
                                    const std::vector<std::pair<const void*, int64_t>>& extra) {
  TORCH_CHECK(bf16_gemm_available(), "this build has no AVX512-BF16 GEMM");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU bf16 [M, K] with contiguous rows");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.size(2) == kNR && packed.size(3) == 2, "bad packed weight");
  const int64_t M = x.size(0), K2 = packed.size(1), P = packed.size(0);
  TORCH_CHECK(x.size(1) == 2 * K2, "x has ", x.size(1), " columns, the weight ", 2 * K2);
  TORCH_CHECK(n_out > (P - 1) * kNR && n_out <= P * kNR, "n_out does not match the packed weight");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == n_out, "bad bias");
  auto y = x.new_empty({M, n_out});
#ifdef LORAMUX_BF16_GEMM
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  const int64_t ldx = x.stride(0), panel_elems = K2 * kNR * 2;
  const int64_t tiles = (M + kMR - 1) / kMR;
  const int64_t panel_lines = panel_elems * 2 / 64;
  const int lines_per_step = static_cast<int>(std::max<int64_t>(1, (panel_lines + tiles * K2 - 1) / (tiles * K2)));
  int64_t extra_lines = 0;
  for (const auto& r : extra) extra_lines += (r.second + 63) / 64;
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    Prefetcher ahead;
    for (const auto& r : extra) ahead.add(r.first, r.second);
    const int per_panel = static_cast<int>((extra_lines + (e - b) - 1) / std::max<int64_t>(1, e - b));
    for (int64_t p = b; p < e; ++p) {
      ahead.step(per_panel);
      const uint16_t* panel = wp + p * panel_elems;
      Prefetcher pf;  // the next panel of this thread's range, spread over this panel's tiles
      if (p + 1 < e) pf.add(panel + panel_elems, panel_elems * 2);
      const int64_t nr = std::min(kNR, n_out - p * kNR);
      __m512 bv[3];
      for (int64_t j = 0; j < 3 && bias.has_value(); ++j)
        bv[j] = load16(bias->data_ptr<c10::BFloat16>() + p * kNR + 16 * j, lanes(nr - 16 * j));
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * kMR;
        tile(xp + m0 * ldx, ldx, std::min(kMR, M - m0), panel, K2, yp + m0 * n_out + p * kNR, n_out, nr, bias.has_value() ? bv : nullptr, pf,
             lines_per_step);
      }
      pf.finish();
    }
  });
#endif
  return y;
}

}  // namespace loramux
