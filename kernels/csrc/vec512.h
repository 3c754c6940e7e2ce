// AVX-512 helpers shared by the CPU kernels: masked 16-lane loads/stores of float and bf16 rows
// (bf16 widened to fp32 on load, rounded to nearest even on store), rounding to bf16 precision,
// and a vectorized exp. LORAMUX_AVX512 is defined when the compiler targets AVX-512 F/BW/VL.
#pragma once
#include <c10/util/BFloat16.h>

#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LORAMUX_AVX512 1
#endif

namespace loramux {
#ifdef LORAMUX_AVX512
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // round to nearest even, NaN kept quiet (what c10::BFloat16's conversion does)
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p), m, h);
}


// v rounded to bf16 precision (nearest even), kept in fp32 lanes; NaN stays NaN.
inline __m512 round_bf16(__m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return round_bf16(v);
  return v;
}

// A list of memory regions fetched into L2 a few cache lines at a time (`step`) while other work
// runs: a steady second stream next to the computation's own, where issuing hundreds of prefetches at
// once stalls behind the miss buffers. Regions beyond kMaxRegions are left to the hardware.
struct Prefetcher {
  static constexpr int kMaxRegions = 64;
  const char* ptr[kMaxRegions];
  int64_t bytes[kMaxRegions];
  int count = 0, cur = 0;
  int64_t off = 0;
  void add(const void* p, int64_t n) {
    if (count < kMaxRegions && n > 0) {
      ptr[count] = static_cast<const char*>(p);
      bytes[count++] = n;
    }
  }
  inline void step(int lines) {
    for (; lines > 0 && cur < count; --lines) {
      _mm_prefetch(ptr[cur] + off, _MM_HINT_T1);
      off += 64;
      if (off >= bytes[cur]) {
        ++cur;
        off = 0;
      }
    }
  }
  void finish() { step(1 << 30); }
};

// exp(x): x clamped to [-87, 88] (0 below -87), Cody-Waite reduction by ln2, degree-6 Taylor
// polynomial on |r| <= ln2/2 (about 1 ulp), 2^n applied with scalef.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}
#endif
}  // namespace loramux
