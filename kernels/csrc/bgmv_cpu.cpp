// Fused CPU BGMV: for every row t with slot s >= 0 and every slice i of one fused projection,
//   y[t, off_i : off_i + out_i] += scaling[i, s] * (x[t] @ A_i[s].T) @ B_i[s].T
// in one call, over the row-table layout of kernels/layout.py:
//   A of all n slices: a_tab [S*in, n*r]  (row s*in + k holds x-coefficient k of every rank of every slice)
//   B of slice i:      b_tab_i [S*r, out_i] (row s*r + j is rank j's output vector)
// Rows are independent and split over ATen's thread pool. Per row: the shrink accumulates
// v[n*r] = x[t] @ A_tab[s] in fp32 (four independent accumulators over k), then for each slice and
// each 16-wide chunk of its output, y_chunk (fp32) += sum_j (scaling * v[j]) * B_row_j[chunk] and is
// rounded to y's dtype once. With AVX-512 (F/BW/VL) this uses intrinsics; otherwise plain loops.
#include "loramux_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "vec512.h"

namespace loramux {
namespace {

constexpr int64_t kMaxNR = 256;  // n * r_max handled per row (3 slices x rank 64 = 192)

#if defined(LORAMUX_AVX512) && defined(__AVX512BF16__)
#define LORAMUX_BGMV_DPBF16 1
// bf16 shrink with vdpbf16ps: v[q][c..c+16) = x_q @ A[:, c..c+16) for R rows of one slot. A's rows k
// and k+1 are interleaved into (k, k+1) pairs per rank with one permute; the pair (x[k], x[k+1]) is
// broadcast as a dword. Two accumulators per (row, 16 ranks): k-pairs alternate between them; the
// sum is acc0 + acc1. Single rows and groups of four both come here, so a row's result does not
// depend on its neighbours.
template <int R>
inline void shrink_dpbf16(const c10::BFloat16* const* xr, int64_t in, const c10::BFloat16* a, int64_t nr, float* v,
                          Prefetcher* pf) {
  alignas(64) static const uint16_t kIdx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(kIdx);
  const uint16_t* au = reinterpret_cast<const uint16_t*>(a);
  for (int64_t c = 0; c < nr; c += 16) {
    const __mmask16 m = lanes(nr - c);
    __m512 acc[R][2];
    for (int q = 0; q < R; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= in; k += 4) {
      if (pf != nullptr) pf->step(1);
      for (int u = 0; u < 2; ++u) {
        const int64_t kk = k + 2 * u;
        const __m256i r0 = _mm256_maskz_loadu_epi16(m, au + kk * nr + c);
        const __m256i r1 = _mm256_maskz_loadu_epi16(m, au + (kk + 1) * nr + c);
        const __m512bh b = (__m512bh)_mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx, _mm512_castsi256_si512(r1));
        for (int q = 0; q < R; ++q) {
          int32_t pair;
          std::memcpy(&pair, xr[q] + kk, 4);
          acc[q][u] = _mm512_dpbf16_ps(acc[q][u], (__m512bh)_mm512_set1_epi32(pair), b);
        }
      }
    }
    for (; k < in; k += 2) {  // tail pairs; an odd last k pairs with a zero
      const bool odd = k + 1 >= in;
      const __m256i r0 = _mm256_maskz_loadu_epi16(m, au + k * nr + c);
      const __m256i r1 = odd ? _mm256_setzero_si256() : _mm256_maskz_loadu_epi16(m, au + (k + 1) * nr + c);
      const __m512bh b = (__m512bh)_mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx, _mm512_castsi256_si512(r1));
      for (int q = 0; q < R; ++q) {
        uint32_t pair = reinterpret_cast<const uint16_t*>(xr[q])[k];
        if (!odd) pair |= static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(xr[q])[k + 1]) << 16;
        acc[q][0] = _mm512_dpbf16_ps(acc[q][0], (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair)), b);
      }
    }
    for (int q = 0; q < R; ++q) _mm512_mask_storeu_ps(v + q * kMaxNR + c, m, _mm512_add_ps(acc[q][0], acc[q][1]));
  }
}
#endif

#ifdef LORAMUX_AVX512
// `pf` streams the next row's adapter blocks (its A block, one B block per slice) into L2 while this
// row computes: one line per four shrink steps and 16 per 64 expanded outputs, the rest at the row's
// end. Measured best of (0-4, 4-16) on 30 layers x 4 projections with 32 distinct adapters: 5.2 ms
// against 8.1 ms for one burst of prefetches per row (bf16).
template <typename scalar_t>
void row_kernel(scalar_t* yr, const scalar_t* xr, float* xf, int64_t in, const scalar_t* a, int64_t nr,
                const std::vector<const scalar_t*>& bs, const std::vector<int64_t>& offs,
                const std::vector<int64_t>& sizes, const float* sc, int64_t r, Prefetcher& pf) {
  alignas(64) float v[kMaxNR];
#ifdef LORAMUX_BGMV_DPBF16
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    shrink_dpbf16<1>(&xr, in, a, nr, v, &pf);
  } else
#endif
  {
  for (int64_t k = 0; k < in; k += 16) store16(xf + k, load16(xr + k, lanes(in - k)), lanes(in - k));
  for (int64_t c = 0; c < nr; c += 16) {  // shrink, 16 ranks at a time
    const __mmask16 m = lanes(nr - c);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const scalar_t* ac = a + c;
    int64_t k = 0;
    for (; k + 4 <= in; k += 4) {
      pf.step(1);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(xf[k]), load16(ac + k * nr, m), a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(xf[k + 1]), load16(ac + (k + 1) * nr, m), a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(xf[k + 2]), load16(ac + (k + 2) * nr, m), a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(xf[k + 3]), load16(ac + (k + 3) * nr, m), a3);
    }
    for (; k < in; ++k) a0 = _mm512_fmadd_ps(_mm512_set1_ps(xf[k]), load16(ac + k * nr, m), a0);
    _mm512_mask_storeu_ps(v + c, m, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
  }
  const int64_t n = static_cast<int64_t>(bs.size());
  for (int64_t i = 0; i < n; ++i) {  // expand, 64 outputs at a time (4 independent FMA chains)
    if (sc[i] == 0.f) continue;
    alignas(64) float w[kMaxNR];
    for (int64_t j = 0; j < r; ++j) w[j] = v[i * r + j] * sc[i];
    const int64_t out = sizes[i];
    const scalar_t* b = bs[i];
    scalar_t* y = yr + offs[i];
    for (int64_t o = 0; o < out; o += 64) {
      const __mmask16 m0 = lanes(out - o), m1 = lanes(out - o - 16), m2 = lanes(out - o - 32), m3 = lanes(out - o - 48);
      pf.step(16);
      __m512 y0 = load16(y + o, m0), y1 = load16(y + o + 16, m1), y2 = load16(y + o + 32, m2),
             y3 = load16(y + o + 48, m3);
      __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
      for (int64_t j = 0; j < r; ++j) {
        const __m512 wj = _mm512_set1_ps(w[j]);
        const scalar_t* br = b + j * out + o;
        d0 = _mm512_fmadd_ps(wj, load16(br, m0), d0);
        d1 = _mm512_fmadd_ps(wj, load16(br + 16, m1), d1);
        d2 = _mm512_fmadd_ps(wj, load16(br + 32, m2), d2);
        d3 = _mm512_fmadd_ps(wj, load16(br + 48, m3), d3);
      }
      store16(y + o, _mm512_add_ps(y0, d0), m0);
      store16(y + o + 16, _mm512_add_ps(y1, d1), m1);
      store16(y + o + 32, _mm512_add_ps(y2, d2), m2);
      store16(y + o + 48, _mm512_add_ps(y3, d3), m3);
    }
  }
  pf.finish();
}
// Four rows with the same slot (one adapter's segment): each A and B vector is loaded once for the
// four rows. Every row's arithmetic is exactly row_kernel's (same accumulators, same order), so a
// row's result does not depend on whether it was grouped with its neighbours.
template <typename scalar_t>
void rows4_kernel(scalar_t* const* yr, const scalar_t* const* xr, float* xf, int64_t in, const scalar_t* a,
                  int64_t nr, const std::vector<const scalar_t*>& bs, const std::vector<int64_t>& offs,
                  const std::vector<int64_t>& sizes, const float* sc, int64_t r) {
  constexpr int R = 4;
  const int64_t xs = in + 16;
  alignas(64) float v[R][kMaxNR];
#ifdef LORAMUX_BGMV_DPBF16
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    shrink_dpbf16<R>(xr, in, a, nr, &v[0][0], nullptr);
  } else
#endif
  {
  for (int q = 0; q < R; ++q)
    for (int64_t k = 0; k < in; k += 16) store16(xf + q * xs + k, load16(xr[q] + k, lanes(in - k)), lanes(in - k));
  for (int64_t c = 0; c < nr; c += 16) {  // shrink, 16 ranks at a time
    const __mmask16 m = lanes(nr - c);
    __m512 acc[R][4];
    for (int q = 0; q < R; ++q)
      for (int u = 0; u < 4; ++u) acc[q][u] = _mm512_setzero_ps();
    const scalar_t* ac = a + c;
    int64_t k = 0;
    for (; k + 4 <= in; k += 4) {
      __m512 av[4];
      for (int u = 0; u < 4; ++u) av[u] = load16(ac + (k + u) * nr, m);
      for (int q = 0; q < R; ++q)
        for (int u = 0; u < 4; ++u) acc[q][u] = _mm512_fmadd_ps(_mm512_set1_ps(xf[q * xs + k + u]), av[u], acc[q][u]);
    }
    for (; k < in; ++k) {
      const __m512 ak = load16(ac + k * nr, m);
      for (int q = 0; q < R; ++q) acc[q][0] = _mm512_fmadd_ps(_mm512_set1_ps(xf[q * xs + k]), ak, acc[q][0]);
    }
    for (int q = 0; q < R; ++q)
      _mm512_mask_storeu_ps(v[q] + c, m, _mm512_add_ps(_mm512_add_ps(acc[q][0], acc[q][1]), _mm512_add_ps(acc[q][2], acc[q][3])));
  }
  }
  const int64_t n = static_cast<int64_t>(bs.size());
  for (int64_t i = 0; i < n; ++i) {  // expand, 64 outputs of four rows at a time
    if (sc[i] == 0.f) continue;
    alignas(64) float w[R][kMaxNR];
    for (int q = 0; q < R; ++q)
      for (int64_t j = 0; j < r; ++j) w[q][j] = v[q][i * r + j] * sc[i];
    const int64_t out = sizes[i];
    const scalar_t* b = bs[i];
    for (int64_t o = 0; o < out; o += 64) {
      __mmask16 mk[4];
      for (int u = 0; u < 4; ++u) mk[u] = lanes(out - o - 16 * u);
      __m512 d[R][4];
      for (int q = 0; q < R; ++q)
        for (int u = 0; u < 4; ++u) d[q][u] = _mm512_setzero_ps();
      for (int64_t j = 0; j < r; ++j) {
        const scalar_t* br = b + j * out + o;
        __m512 bv[4];
        for (int u = 0; u < 4; ++u) bv[u] = load16(br + 16 * u, mk[u]);
        for (int q = 0; q < R; ++q) {
          const __m512 wj = _mm512_set1_ps(w[q][j]);
          for (int u = 0; u < 4; ++u) d[q][u] = _mm512_fmadd_ps(wj, bv[u], d[q][u]);
        }
      }
      for (int q = 0; q < R; ++q) {
        scalar_t* y = yr[q] + offs[i] + o;
        for (int u = 0; u < 4; ++u) store16(y + 16 * u, _mm512_add_ps(load16(y + 16 * u, mk[u]), d[q][u]), mk[u]);
      }
    }
  }
}
#endif


template <typename scalar_t>
void row_kernel_generic(scalar_t* yr, const scalar_t* xr, int64_t in, const scalar_t* a, int64_t nr,
                        const std::vector<const scalar_t*>& bs, const std::vector<int64_t>& offs,
                        const std::vector<int64_t>& sizes, const float* sc, int64_t r) {
  float v[kMaxNR] = {0.f};
  for (int64_t k = 0; k < in; ++k) {
    const float xk = static_cast<float>(xr[k]);
    for (int64_t j = 0; j < nr; ++j) v[j] += xk * static_cast<float>(a[k * nr + j]);
  }
  for (size_t i = 0; i < bs.size(); ++i) {
    if (sc[i] == 0.f) continue;
    for (int64_t o = 0; o < sizes[i]; ++o) {
      float d = 0.f;
      for (int64_t j = 0; j < r; ++j) d += v[i * r + j] * sc[i] * static_cast<float>(bs[i][j * sizes[i] + o]);
      yr[offs[i] + o] = static_cast<scalar_t>(static_cast<float>(yr[offs[i] + o]) + d);
    }
  }
}

template <typename scalar_t>
void bgmv_rows(scalar_t* y, int64_t y_stride, const scalar_t* x, int64_t x_stride, int64_t in,
               const scalar_t* a_tab, const std::vector<const scalar_t*>& b_tabs,
               const std::vector<int64_t>& offs, const std::vector<int64_t>& sizes, const float* scaling,
               int64_t scaling_stride, const int64_t* slots, int64_t rows, int64_t r) {
  const int64_t n = static_cast<int64_t>(b_tabs.size());
  const int64_t nr = n * r;
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(4 * (in + 16));
    std::vector<const scalar_t*> bs(n);
    float sc[kMaxNR];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      // four rows of one adapter (an identical or skewed mix): one pass over its blocks for all four
      [[maybe_unused]] const bool group = t + 4 <= end && slots[t + 1] == s && slots[t + 2] == s && slots[t + 3] == s;
      for (int64_t i = 0; i < n; ++i) {
        bs[i] = b_tabs[i] + s * r * sizes[i];
        sc[i] = scaling[i * scaling_stride + s];
      }
      const scalar_t* a = a_tab + s * in * nr;
#ifdef LORAMUX_AVX512
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
        if (group) {
          scalar_t* ys[4];
          const scalar_t* xs[4];
          for (int q = 0; q < 4; ++q) {
            ys[q] = y + (t + q) * y_stride;
            xs[q] = x + (t + q) * x_stride;
          }
          rows4_kernel<scalar_t>(ys, xs, xf.data(), in, a, nr, bs, offs, sizes, sc, r);
          t += 3;
          continue;
        }
        // Distinct adapters: each row jumps to another slot's blocks (tens of KB across several pages),
        // which the hardware prefetcher only picks up late: stream the next row's in during this one.
        Prefetcher pf;
        if (t + 1 < end && slots[t + 1] >= 0 && slots[t + 1] != s) {
          const int64_t s2 = slots[t + 1];
          pf.add(a_tab + s2 * in * nr, in * nr * static_cast<int64_t>(sizeof(scalar_t)));
          for (int64_t i = 0; i < n; ++i)
            pf.add(b_tabs[i] + s2 * r * sizes[i], r * sizes[i] * static_cast<int64_t>(sizeof(scalar_t)));
        }
        row_kernel<scalar_t>(y + t * y_stride, x + t * x_stride, xf.data(), in, a, nr, bs, offs, sizes, sc, r, pf);
        continue;
      }
#endif
      row_kernel_generic<scalar_t>(y + t * y_stride, x + t * x_stride, in, a, nr, bs, offs, sizes, sc, r);
    }
  });
}

}  // namespace

void bgmv(at::Tensor y, at::Tensor x, at::Tensor a_tab, std::vector<at::Tensor> b_tabs,
          std::vector<int64_t> offs, at::Tensor scaling, at::Tensor slots, int64_t r) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x, y must be [T, *]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y rows must be contiguous");
  TORCH_CHECK(a_tab.is_contiguous() && a_tab.size(1) == static_cast<int64_t>(b_tabs.size()) * r, "bad A table");
  TORCH_CHECK(a_tab.size(1) <= kMaxNR, "n * r_max above ", kMaxNR);
  TORCH_CHECK(scaling.scalar_type() == at::kFloat && scaling.dim() == 2 && scaling.stride(1) == 1, "bad scaling");
  TORCH_CHECK(scaling.size(0) == static_cast<int64_t>(b_tabs.size()), "one scaling row per slice");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == x.size(0), "bad slots");
  TORCH_CHECK(offs.size() == b_tabs.size(), "one offset per slice");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a_tab.scalar_type() == x.scalar_type(), "one dtype");
  const int64_t rows = x.size(0), in = x.size(1), num_slots = scaling.size(1);
  TORCH_CHECK(a_tab.size(0) == num_slots * in, "A table rows must be slots * in");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t) TORCH_CHECK(sp[t] < num_slots, "slot ", sp[t], " outside the ", num_slots, " slots");
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < b_tabs.size(); ++i) {
    const auto& b = b_tabs[i];
    TORCH_CHECK(b.is_contiguous() && b.scalar_type() == x.scalar_type() && b.size(0) == num_slots * r, "bad B table");
    TORCH_CHECK(offs[i] >= 0 && offs[i] + b.size(1) <= y.size(1), "slice outside y");
    sizes.push_back(b.size(1));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "loramux_bgmv", [&] {
    std::vector<const scalar_t*> bp;
    for (const auto& b : b_tabs) bp.push_back(b.data_ptr<scalar_t>());
    bgmv_rows<scalar_t>(y.data_ptr<scalar_t>(), y.stride(0), x.data_ptr<scalar_t>(), x.stride(0), in,
                        a_tab.data_ptr<scalar_t>(), bp, offs, sizes, scaling.data_ptr<float>(),
                        scaling.stride(0), slots.data_ptr<int64_t>(), rows, r);
  });
}

bool vectorized() {
#ifdef LORAMUX_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace loramux
