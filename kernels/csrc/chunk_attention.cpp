// Attention of a prefill chunk over its paged context, reading the cache in place:
//   chunk_attention(out, q, cache, table, context_len, heads, scale, impl)
// The n query tokens of one sequence sit at positions c-n .. c-1 (c = context_len, their own K/V
// already written) and token j sees keys 0 .. c-n+j. The torch path gathers the whole context into a
// contiguous copy per layer and then runs SDPA, so a chunk deep into a long prompt read its context
// three times (gather read, gather write, attention); at an 8k context that per-step cost alone
// exceeded a whole decode step of the running streams (the long-context stall, issue #17).
//
// Flash-decoding layout: one task per (KV head, key split); a task walks its keys 8 at a time,
// keeps an online softmax (running max m, sum l, fp32 accumulator) per query row -- the G query heads
// of the group times the chunk's tokens -- and writes (m, l, acc) per row; a merge combines the
// splits. The splits give the two cores work when the chunk is one token; a split's K/V stay in L2
// while all the query rows read them. fp32 statistics and accumulation for float and bf16 (bf16
// widened on load, the output rounded to nearest even), as torch's CPU flash attention does.
// AVX2 + FMA where compiled in (x86-64-v3 and every AVX-512 machine), a scalar path otherwise
// (impl 1 forces it, for the tests).
#include "loramux_cpu.h"
#include "avx2_reduce.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORAMUX_CAVX2 1
#endif

namespace loramux {
namespace {

constexpr int64_t kGroup = 8;  // keys per step of the online softmax
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }  // c10::BFloat16: round to nearest even

// exp for x <= 0 (scores minus their running max), 0 below -87: Cody-Waite reduction by ln2 and a
// degree-6 Taylor polynomial on |r| <= ln2/2, about 1 ulp (model_cpu.cpp's fast_exp).
inline float exp_s(float x) {
  if (x < -87.f) return 0.f;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return std::ldexp(p, static_cast<int>(n));
}

// What a task needs to read its keys: the K and V planes of its head, the block table, the geometry.
struct Keys {
  const void* kplane;
  const void* vplane;
  const int32_t* table;
  int64_t bs, D;
};

template <typename T>
inline const T* key_row(const Keys& kz, const void* plane, int64_t j) {
  return static_cast<const T*>(plane) + (static_cast<int64_t>(kz.table[j / kz.bs]) * kz.bs + j % kz.bs) * kz.D;
}

// One query row against keys [k0, k0+8) of which the first `vis` are visible: online-softmax update of
// (m, l, acc). kp/vp: the 8 key/value rows (invisible ones point at a valid row and are masked).
template <typename T>
void step_scalar(const float* q, const T* const* kp, const T* const* vp, int64_t vis, int64_t D, float scale,
                 float& m, float& l, float* acc) {
  float s[kGroup];
  float mx = kNegInf;
  for (int64_t t = 0; t < vis; ++t) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * to_f(kp[t][d]);
    s[t] = dot * scale;
    mx = std::max(mx, s[t]);
  }
  const float mn = std::max(m, mx);
  const float alpha = m == mn ? 1.f : m == kNegInf ? 0.f : exp_s(m - mn);
  float sum = 0.f;
  for (int64_t t = 0; t < vis; ++t) sum += (s[t] = exp_s(s[t] - mn));
  l = l * alpha + sum;
  for (int64_t d = 0; d < D; ++d) {
    float a = acc[d] * alpha;
    for (int64_t t = 0; t < vis; ++t) a += s[t] * to_f(vp[t][d]);
    acc[d] = a;
  }
  m = mn;
}

#ifdef LORAMUX_CAVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Lane t = the sum of the 8 lanes of d[t].
inline __m256 sum_lanes8(const __m256* d) {
  const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
  const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// exp_s on 8 lanes (x <= 88); lanes below -87 (masked keys are -inf) give 0.
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// step_scalar with 8 lanes; D a multiple of 8.
template <typename T>
void step_avx2(const float* q, const T* const* kp, const T* const* vp, int64_t vis, int64_t D, float scale,
               float& m, float& l, float* acc) {
  __m256 dots[kGroup];
  for (int t = 0; t < kGroup; ++t) dots[t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += 8) {  // 8 independent chains, one per key
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int t = 0; t < kGroup; ++t) dots[t] = _mm256_fmadd_ps(qc, load8(kp[t] + c), dots[t]);
  }
  const __m256 idx = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 visible = _mm256_cmp_ps(idx, _mm256_set1_ps(static_cast<float>(vis)), _CMP_LT_OQ);
  const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_mul_ps(sum_lanes8(dots), _mm256_set1_ps(scale)),
                                    visible);
  const float mn = std::max(m, hmax8(s));
  const float alpha = m == mn ? 1.f : m == kNegInf ? 0.f : exp_s(m - mn);
  const __m256 p = exp8(_mm256_sub_ps(s, _mm256_set1_ps(mn)));
  l = l * alpha + hsum8(p);
  alignas(32) float pw[kGroup];
  _mm256_store_ps(pw, p);
  const __m256 av = _mm256_set1_ps(alpha);
  for (int64_t c = 0; c < D; c += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + c), av);
    for (int64_t t = 0; t < vis; ++t) a = _mm256_fmadd_ps(_mm256_set1_ps(pw[t]), load8(vp[t] + c), a);
    _mm256_storeu_ps(acc + c, a);
  }
  m = mn;
}
#endif

// Per (head, split, row) partial results: m, l and the unnormalized fp32 accumulator.
struct Partials {
  std::vector<float> m, l, acc;
};

template <typename T>
void chunk_attention_impl(T* out, const T* qall, int64_t qs, const T* cache, int64_t KV, int64_t NB, int64_t bs,
                          int64_t D, const int32_t* table, int64_t n, int64_t c, int64_t H, float scale,
                          bool vec) {
  const int64_t G = H / KV, R = n * G;  // query rows of a group: (token j, head g) -> j * G + g
  const int64_t plane = NB * bs * D;
  // Splits: about eight tasks per thread (a causal chunk's splits differ in work), none under 256 keys.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = std::max<int64_t>(1, (8 * threads + KV - 1) / KV);
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(want, c / 256));
  const int64_t span = ((c + S - 1) / S + kGroup - 1) / kGroup * kGroup;  // keys per split, a multiple of 8
  Partials P;
  P.m.assign(KV * S * R, kNegInf);
  P.l.assign(KV * S * R, 0.f);
  P.acc.assign(KV * S * R * D, 0.f);
  // Query rows widened to fp32 once: [KV][R][D].
  std::vector<float> qf(KV * R * D);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          qf[((h / G) * R + j * G + h % G) * D + d] = to_f(qall[j * qs + h * D + d]);
  });
  const int64_t first_pos = c - n;  // position of query token 0
  at::parallel_for(0, KV * S, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / S, sp = task % S;
      const int64_t k0 = sp * span, k1 = std::min(c, k0 + span);
      if (k0 >= k1) continue;
      const Keys kz{cache + h * plane, cache + (KV + h) * plane, table, bs, D};
      // Rows whose token sees no key of this split keep m = -inf, l = 0.
      const int64_t j_first = std::max<int64_t>(0, k0 - first_pos);  // first token that sees key k0
      const T* kp[kGroup];
      const T* vp[kGroup];
      for (int64_t g0 = k0; g0 < k1; g0 += kGroup) {
        // keys g0 .. g0+7; those at or beyond k1 point at key g0 and are never visible
        for (int64_t t = 0; t < kGroup; ++t) {
          const int64_t j = g0 + t < k1 ? g0 + t : g0;
          kp[t] = key_row<T>(kz, kz.kplane, j);
          vp[t] = key_row<T>(kz, kz.vplane, j);
        }
        // token j sees keys < first_pos + j + 1: the first token that sees key g0 is g0 - first_pos
        for (int64_t j = std::max(j_first, g0 - first_pos); j < n; ++j) {
          const int64_t vis = std::min<int64_t>({kGroup, k1 - g0, first_pos + j + 1 - g0});
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = j * G + g, pi = (h * S + sp) * R + r;
            const float* qr = qf.data() + (h * R + r) * D;
#ifdef LORAMUX_CAVX2
            if (vec) {
              step_avx2<T>(qr, kp, vp, vis, D, scale, P.m[pi], P.l[pi], P.acc.data() + pi * D);
              continue;
            }
#endif
            step_scalar<T>(qr, kp, vp, vis, D, scale, P.m[pi], P.l[pi], P.acc.data() + pi * D);
          }
        }
      }
    }
  });
  // Merge the splits of each (head, row): out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
  at::parallel_for(0, KV * R, 1, [&](int64_t b, int64_t e) {
    std::vector<float> o(D);
    for (int64_t hr = b; hr < e; ++hr) {
      const int64_t h = hr / R, r = hr % R, j = r / G, g = r % G;
      float M = kNegInf;
      for (int64_t sp = 0; sp < S; ++sp) M = std::max(M, P.m[(h * S + sp) * R + r]);
      float L = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t sp = 0; sp < S; ++sp) {
        const int64_t pi = (h * S + sp) * R + r;
        if (P.l[pi] == 0.f) continue;
        const float w = exp_s(P.m[pi] - M);
        L += P.l[pi] * w;
        const float* a = P.acc.data() + pi * D;
        for (int64_t d = 0; d < D; ++d) o[d] += a[d] * w;
      }
      T* dst = out + (j * H + h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_f<T>(o[d] / L);
    }
  });
}

}  // namespace

bool attend_decode_avx2(const float* q, const float* kplane, const float* vplane, const int32_t* table, int64_t bs,
                        int64_t D, int64_t G, int64_t L, float scale, float* out) {
#ifdef LORAMUX_CAVX2
  if (D % 8 != 0 || L < 1) return false;
  thread_local std::vector<float> buf;
  buf.assign(G * (D + 2), 0.f);
  float* acc = buf.data();
  float* m = acc + G * D;
  float* l = m + G;
  std::fill(m, m + G, kNegInf);
  const Keys kz{kplane, vplane, table, bs, D};
  const float* kp[kGroup];
  const float* vp[kGroup];
  for (int64_t g0 = 0; g0 < L; g0 += kGroup) {
    const int64_t vis = std::min<int64_t>(kGroup, L - g0);
    for (int64_t t = 0; t < kGroup; ++t) {
      const int64_t j = t < vis ? g0 + t : g0;
      kp[t] = key_row<float>(kz, kz.kplane, j);
      vp[t] = key_row<float>(kz, kz.vplane, j);
    }
    for (int64_t g = 0; g < G; ++g) step_avx2<float>(q + g * D, kp, vp, vis, D, scale, m[g], l[g], acc + g * D);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] / l[g];
  return true;
#else
  return false;
#endif
}

bool chunk_attention_vectorized() {
#ifdef LORAMUX_CAVX2
  return true;
#else
  return false;
#endif
}

void chunk_attention(at::Tensor out, at::Tensor q, at::Tensor cache, at::Tensor table, int64_t context_len,
                     int64_t heads, double scale, int64_t impl) {
  TORCH_CHECK(out.device().is_cpu() && q.device().is_cpu() && cache.device().is_cpu() && table.device().is_cpu(),
              "chunk_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1, "q must be 2-D with contiguous rows");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(),
              "cache must be a contiguous [2, kv_heads, blocks, block_size, head_dim]");
  const int64_t KV = cache.size(1), NB = cache.size(2), bs = cache.size(3), D = cache.size(4);
  const int64_t n = q.size(0), c = context_len;
  TORCH_CHECK(heads > 0 && heads % KV == 0 && heads * D <= q.size(1), "heads must be a multiple of kv_heads");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == n && out.size(1) == heads && out.size(2) == D,
              "out must be a contiguous [n, heads, head_dim]");
  TORCH_CHECK(n >= 1 && c >= n, "context_len must be at least the chunk's length");
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 1 && table.is_contiguous() &&
                  (c + bs - 1) / bs <= table.numel(),
              "table must be int32 [>= ceil(context_len / block_size)]");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && cache.scalar_type() == q.scalar_type(), "one dtype");
  const int32_t* tb = table.data_ptr<int32_t>();
  for (int64_t j = 0; j < (c + bs - 1) / bs; ++j)  // validate every block the tasks will read
    TORCH_CHECK(tb[j] >= 0 && tb[j] < NB, "block outside the cache");
  const bool vec = impl != 1 && chunk_attention_vectorized() && D % 8 == 0;
  AT_DISPATCH_SWITCH(q.scalar_type(), "loramux_chunk_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       chunk_attention_impl<float>(out.data_ptr<float>(), q.data_ptr<float>(), q.stride(0),
                                                   cache.data_ptr<float>(), KV, NB, bs, D, tb, n, c, heads,
                                                   static_cast<float>(scale), vec);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       using B = c10::BFloat16;
                       chunk_attention_impl<B>(out.data_ptr<B>(), q.data_ptr<B>(), q.stride(0), cache.data_ptr<B>(),
                                               KV, NB, bs, D, tb, n, c, heads, static_cast<float>(scale), vec);
                     }));
}

}  // namespace loramux
