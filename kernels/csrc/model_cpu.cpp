// Fused CPU ops of the Llama decode step (everything of a layer except the linears), so that a
// layer costs about ten op calls instead of about fifty small eager ones:
//   rms_norm(out, x, weight, eps, residual?)   residual += x first when given (vLLM's fused add+norm)
//   rotary_(qkv, cos, sin, heads, head_dim)     in place on the first heads*head_dim columns
//   silu_and_mul(out, gate_up)                  out = silu(gate) * up
//   kv_write(cache, k, v, slots)                the step's K and V rows into the paged cache
//   decode_attention(out, q, rows, cache, tables, lens, heads, scale)   one query token per sequence
//   argmax_rows(x)                              greedy sampling: first maximum per fp32 row
// Numerics follow the Hugging Face eager formulas op by op: every intermediate that HF keeps in the
// model dtype is rounded to it here too (bf16: round to nearest even), statistics and accumulation
// are fp32. Rows are independent (no reduction across rows), so a row's result never depends on the
// batch it is in. The exp-bound and attention loops use AVX-512 intrinsics for float and bf16; without
// AVX-512, fp32 decode attention takes the AVX2 online-softmax path of chunk_attention.cpp (the generic
// loops below are the fallback: other CPUs, bf16 without AVX-512, fp16); the rest is written for gcc's
// auto-vectorizer (-O3 -march=native).
#include "loramux_cpu.h"

#include <ATen/Parallel.h>

#include "vec512.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace loramux {
namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Load / store / round-to-dtype, branch-free so loops over them vectorize.
inline float ld(float v) { return v; }
inline float ld(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
inline float ld(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline float rnd(float v);
template <>
inline float rnd<float>(float v) { return v; }
template <>
inline float rnd<c10::BFloat16>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return v != v ? v : bits_to_float(r);  // NaN stays NaN
}
template <>
inline float rnd<c10::Half>(float v) { return static_cast<float>(static_cast<c10::Half>(v)); }

template <typename T>
inline T st(float v);
template <>
inline float st<float>(float v) { return v; }
template <>
inline c10::BFloat16 st<c10::BFloat16>(float v) {
  return c10::BFloat16(static_cast<uint16_t>(float_to_bits(rnd<c10::BFloat16>(v)) >> 16), c10::BFloat16::from_bits());
}
template <>
inline c10::Half st<c10::Half>(float v) { return static_cast<c10::Half>(v); }

// exp(x) for x <= 88: Cody-Waite range reduction and a degree-6 Taylor polynomial on
// |r| <= ln2/2 (about 1 ulp), arithmetic only so it vectorizes; underflows to 0 below -87.
inline float fast_exp(float x) {
  x = x > 88.0f ? 88.0f : x;
  const bool tiny = x < -87.0f;
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return tiny ? 0.f : p * scale;
}

template <typename T>
constexpr bool kVec =
#ifdef LORAMUX_AVX512
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

template <typename T>
void rms_norm_impl(T* out, int64_t os, const T* x, int64_t xs, T* res, int64_t rs, const T* w, int64_t H,
                   float eps, int64_t rows) {
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    std::vector<float> buf(H);
    float* h = buf.data();
    for (int64_t t = b; t < e; ++t) {
      const T* xr = x + t * xs;
      if (res != nullptr) {  // HF: hidden = residual + hidden, in the model dtype
        T* rr = res + t * rs;
        for (int64_t i = 0; i < H; ++i) {
          const float v = rnd<T>(ld(xr[i]) + ld(rr[i]));
          h[i] = v;
          rr[i] = st<T>(v);
        }
      } else {
        for (int64_t i = 0; i < H; ++i) h[i] = ld(xr[i]);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += h[i] * h[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      T* o = out + t * os;
      for (int64_t i = 0; i < H; ++i) o[i] = st<T>(ld(w[i]) * rnd<T>(h[i] * inv));
    }
  });
}

template <typename T>
void rotary_impl(T* qkv, int64_t qs, const T* cos, const T* sin, int64_t cs, int64_t heads, int64_t D,
                 int64_t rows) {
  const int64_t half = D / 2;
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    std::vector<float> buf(D);
    float* xf = buf.data();
    for (int64_t t = b; t < e; ++t) {
      const T* c = cos + t * cs;
      const T* s = sin + t * cs;
      for (int64_t hd = 0; hd < heads; ++hd) {
        T* x = qkv + t * qs + hd * D;
        for (int64_t i = 0; i < D; ++i) xf[i] = ld(x[i]);
        // HF: x * cos + rotate_half(x) * sin, each product and the sum in the model dtype
        for (int64_t i = 0; i < half; ++i)
          x[i] = st<T>(rnd<T>(xf[i] * ld(c[i])) + rnd<T>(-xf[i + half] * ld(s[i])));
        for (int64_t i = half; i < D; ++i)
          x[i] = st<T>(rnd<T>(xf[i] * ld(c[i])) + rnd<T>(xf[i - half] * ld(s[i])));
      }
    }
  });
}

template <typename T>
void silu_mul_row(T* o, const T* g, const T* u, int64_t I) {
#ifdef LORAMUX_AVX512
  if constexpr (kVec<T>) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < I; i += 16) {
      const __mmask16 m = lanes(I - i);
      const __m512 gv = load16(g + i, m);
      const __m512 act = round16<T>(_mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
      store16(o + i, _mm512_mul_ps(act, load16(u + i, m)), m);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < I; ++i) {
    const float gv = ld(g[i]);
    o[i] = st<T>(rnd<T>(gv / (1.f + fast_exp(-gv))) * ld(u[i]));  // HF: act(gate) * up
  }
}

template <typename T>
void silu_mul_impl(T* out, int64_t os, const T* gu, int64_t gs, int64_t I, int64_t rows) {
  at::parallel_for(0, rows, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) silu_mul_row<T>(out + t * os, gu + t * gs, gu + t * gs + I, I);
  });
}

// One (sequence, KV head) task: q [G, D] (the group's query heads), keys/values from the blocks of
// `tab`, s a [G, L] scratch, out [G, D].
struct AttnTask {
  int64_t G, D, L, bs;
  const int32_t* tab;
  float scale;
};

template <typename T>
void attend_generic(const AttnTask& a, const T* q, const T* kplane, const T* vplane, float* s, float* acc,
                    T* o) {
  const int64_t G = a.G, D = a.D, L = a.L, bs = a.bs;
  for (int64_t j = 0; j < L; ++j) {  // scores = q . k, rounded to the dtype as a bmm's output is
    const T* k = kplane + (static_cast<int64_t>(a.tab[j / bs]) * bs + j % bs) * D;
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += ld(q[g * D + d]) * ld(k[d]);
      s[g * L + j] = rnd<T>(dot) * a.scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // fp32 softmax, probabilities rounded to the dtype
    float* sg = s + g * L;
    float m = sg[0], sum = 0.f;
    for (int64_t j = 1; j < L; ++j) m = sg[j] > m ? sg[j] : m;
    for (int64_t j = 0; j < L; ++j) sum += (sg[j] = fast_exp(sg[j] - m));
    for (int64_t j = 0; j < L; ++j) sg[j] = rnd<T>(sg[j] / sum);
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t j = 0; j < L; ++j) {  // out = p @ V, fp32 accumulation
    const T* v = vplane + (static_cast<int64_t>(a.tab[j / bs]) * bs + j % bs) * D;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += s[g * L + j] * ld(v[d]);
  }
  for (int64_t j = 0; j < G * D; ++j) o[j] = st<T>(acc[j]);
}

#ifdef LORAMUX_AVX512
// Lane t of the result = the sum of the 16 lanes of a[t]: a transpose-and-add tree (45 shuffles and
// adds for 16 sums, against about 8 per sum for one horizontal reduction each).
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a2i_0+a2i_2, a2i+1_0+a2i+1_2, a2i_1+a2i_3, a2i+1_1+a2i+1_3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sum for a[4i .. 4i+3]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // add the four 128-bit lanes: (0,2,0,2) + (1,3,1,3) twice
  const __m512 f0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 f1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, 0x88), _mm512_shuffle_f32x4(f0, f1, 0xDD));
}


// Same math with ND = D / 16 vectors per head row, one query head at a time so that its query and
// accumulators stay in registers (the group's K/V rows stay in L1 between heads); softmax 16 keys at
// a time.
template <typename T, int ND>
void attend_vec(const AttnTask& a, const T* q, const T* kplane, const T* vplane, float* s, T* o, Prefetcher& pf) {
  const int64_t G = a.G, L = a.L, bs = a.bs;
  constexpr int64_t D = 16 * ND;
  const __mmask16 all = 0xFFFF;
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * L;
    __m512 qv[ND];
    for (int c = 0; c < ND; ++c) qv[c] = load16(q + g * D + 16 * c, all);
    for (int64_t j0 = 0, blk = 0; j0 < L; j0 += bs, ++blk) {  // scores, rounded as a bmm output is
      const T* kb = kplane + static_cast<int64_t>(a.tab[blk]) * bs * D;
      const int64_t n = std::min(bs, L - j0);
      for (int64_t jj0 = 0; jj0 < n; jj0 += 16) {  // 16 keys: 16 partial-sum vectors, one transpose-sum
        const int64_t m = std::min<int64_t>(16, n - jj0);
        __m512 dots[16];
        for (int64_t t = 0; t < 16; ++t) {
          if (t >= m) {
            dots[t] = _mm512_setzero_ps();
            continue;
          }
          const T* k = kb + (jj0 + t) * D;
          pf.step(1);
          __m512 d0 = _mm512_mul_ps(qv[0], load16(k, all));
          for (int c = 1; c < ND; ++c) d0 = _mm512_fmadd_ps(qv[c], load16(k + 16 * c, all), d0);
          dots[t] = d0;
        }
        const __m512 sc = _mm512_mul_ps(round16<T>(sum_lanes16(dots)), _mm512_set1_ps(a.scale));
        _mm512_mask_storeu_ps(sg + j0 + jj0, lanes(m), sc);
      }
    }
    __m512 mx = ninf;  // fp32 softmax, probabilities rounded to the dtype
    for (int64_t j = 0; j < L; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, lanes(L - j), sg + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 msk = lanes(L - j);
      const __m512 e = _mm512_maskz_mov_ps(msk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(msk, sg + j), m)));
      _mm512_mask_storeu_ps(sg + j, msk, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 msk = lanes(L - j);
      _mm512_mask_storeu_ps(sg + j, msk, round16<T>(_mm512_div_ps(_mm512_maskz_loadu_ps(msk, sg + j), total)));
    }
    __m512 acc[ND];  // out = p @ V, fp32 accumulation
    for (int c = 0; c < ND; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j0 = 0, blk = 0; j0 < L; j0 += bs, ++blk) {
      const T* vb = vplane + static_cast<int64_t>(a.tab[blk]) * bs * D;
      const int64_t n = std::min(bs, L - j0);
      for (int64_t jj = 0; jj < n; ++jj) {
        pf.step(1);
        const __m512 p = _mm512_set1_ps(sg[j0 + jj]);
        for (int c = 0; c < ND; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vb + jj * D + 16 * c, all), acc[c]);
      }
    }
    for (int c = 0; c < ND; ++c) store16(o + g * D + 16 * c, acc[c], all);
  }
  pf.finish();
}

template <typename T>
bool attend_vec_dispatch(const AttnTask& a, const T* q, const T* kp, const T* vp, float* s, T* o, Prefetcher& pf) {
  switch (a.D) {
    case 64: attend_vec<T, 4>(a, q, kp, vp, s, o, pf); return true;
    case 128: attend_vec<T, 8>(a, q, kp, vp, s, o, pf); return true;
    case 96: attend_vec<T, 6>(a, q, kp, vp, s, o, pf); return true;
    case 256: attend_vec<T, 16>(a, q, kp, vp, s, o, pf); return true;
    default: return false;
  }
}
#endif

template <typename T>
void decode_attention_impl(T* out, const T* qall, int64_t qs, const int64_t* rows, const T* cache,
                           int64_t KV, int64_t NB, int64_t bs, int64_t D, const int32_t* tables,
                           int64_t tstride, const int64_t* lens, int64_t B, int64_t H, float scale) {
  const int64_t G = H / KV;
  const int64_t plane = NB * bs * D;  // one (K|V, head) plane of the cache
  at::parallel_for(0, B * KV, 1, [&](int64_t b, int64_t e) {
    std::vector<float> acc(G * D), sbuf;
    for (int64_t task = b; task < e; ++task) {
      const int64_t i = task / KV, kvh = task % KV;
      const AttnTask a{G, D, lens[i], bs, tables + i * tstride, scale};
      sbuf.resize(G * a.L + 16);
      const T* q = qall + rows[i] * qs + kvh * G * D;
      const T* kplane = cache + kvh * plane;
      const T* vplane = cache + (KV + kvh) * plane;
      T* o = out + (i * H + kvh * G) * D;
#ifdef LORAMUX_AVX512
      if constexpr (kVec<T>) {
        // the next task's K and V blocks stream into L2 while this one computes
        Prefetcher pf;
        if (task + 1 < e) {
          const int64_t i2 = (task + 1) / KV, h2 = (task + 1) % KV, L2 = lens[i2];
          const int32_t* tab2 = tables + i2 * tstride;
          for (int64_t j0 = 0, blk = 0; j0 < L2; j0 += bs, ++blk) {
            const int64_t off = static_cast<int64_t>(tab2[blk]) * bs * D;
            const int64_t bytes = std::min(bs, L2 - j0) * D * static_cast<int64_t>(sizeof(T));
            pf.add(cache + h2 * plane + off, bytes);
            pf.add(cache + (KV + h2) * plane + off, bytes);
          }
        }
        if (attend_vec_dispatch<T>(a, q, kplane, vplane, sbuf.data(), o, pf)) continue;
      }
#endif
      if constexpr (std::is_same_v<T, float>) {  // AVX2 machines (chunk_attention.cpp); bf16/fp16 stay generic
        if (attend_decode_avx2(q, kplane, vplane, a.tab, bs, D, G, a.L, scale, o)) continue;
      }
      attend_generic<T>(a, q, kplane, vplane, sbuf.data(), acc.data(), o);
    }
  });
}

// float, bfloat16 and half (the model dtypes); double models take the torch path.
#define LORAMUX_DISPATCH(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Index of the first maximum of a float row; NaN counts as the maximum (torch.argmax's rule), so a
// row with a NaN gives its first NaN.
int64_t argmax_row(const float* x, int64_t n) {
#ifdef LORAMUX_AVX512
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  float best = _mm512_reduce_max_ps(mx);
  bool has_nan = nan != 0;
  for (int64_t j = i; j < n; ++j) {
    has_nan |= x[j] != x[j];
    best = x[j] > best ? x[j] : best;
  }
  if (!has_nan) {  // first index holding `best`
    const __m512 b = _mm512_set1_ps(best);
    for (i = 0; i + 16 <= n; i += 16) {
      const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), b, _CMP_EQ_OQ);
      if (eq) return i + __builtin_ctz(static_cast<unsigned>(eq));
    }
    for (; i < n; ++i)
      if (x[i] == best) return i;
  }
#endif
  int64_t arg = 0;  // generic path, and rows with a NaN
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] != x[j]) return j;
    if (x[j] > x[arg]) arg = j;
  }
  return arg;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_rows(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

}  // namespace

void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps,
              c10::optional<at::Tensor> residual) {
  check_rows(out, "out");
  check_rows(x, "x");
  check_cpu(weight, "weight");
  const int64_t H = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == H, "weight must be [hidden]");
  TORCH_CHECK(out.sizes() == x.sizes(), "out must be shaped like x");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && weight.scalar_type() == x.scalar_type(), "one dtype");
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "bad residual");
  }
  LORAMUX_DISPATCH(x.scalar_type(), "loramux_rms_norm", [&] {
    scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    const int64_t rs = residual.has_value() ? residual->stride(0) : 0;
    rms_norm_impl<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(), x.stride(0), res, rs,
                            weight.data_ptr<scalar_t>(), H, static_cast<float>(eps), x.size(0));
  });
}

void rotary_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0 && heads >= 0 && heads * head_dim <= qkv.size(1), "bad heads");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.stride(1) == 1 && sin.stride(1) == 1 &&
                  cos.stride(0) == sin.stride(0) && cos.size(0) == qkv.size(0) && cos.size(1) == head_dim,
              "cos/sin must be [T, head_dim] with contiguous rows and one row stride");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "one dtype");
  LORAMUX_DISPATCH(qkv.scalar_type(), "loramux_rotary", [&] {
    rotary_impl<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0), cos.data_ptr<scalar_t>(),
                          sin.data_ptr<scalar_t>(), cos.stride(0), heads, head_dim, qkv.size(0));
  });
}

void silu_and_mul(at::Tensor out, at::Tensor gate_up) {
  check_rows(out, "out");
  check_rows(gate_up, "gate_up");
  const int64_t I = out.size(1);
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(0) == out.size(0), "gate_up must be [T, 2 * out width]");
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), "one dtype");
  LORAMUX_DISPATCH(out.scalar_type(), "loramux_silu_mul", [&] {
    silu_mul_impl<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), gate_up.data_ptr<scalar_t>(),
                            gate_up.stride(0), I, out.size(0));
  });
}

void kv_write(at::Tensor cache, at::Tensor k, at::Tensor v, at::Tensor slots) {
  check_rows(k, "k");
  check_rows(v, "v");
  check_cpu(cache, "cache");
  check_cpu(slots, "slot_mapping");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(),
              "cache must be a contiguous [2, kv_heads, blocks, block_size, head_dim]");
  TORCH_CHECK(cache.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type(), "one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == k.size(0) &&
                  v.size(0) == k.size(0), "slot_mapping must be int64 [T]");
  const int64_t KV = cache.size(1), NB = cache.size(2), bs = cache.size(3), D = cache.size(4);
  TORCH_CHECK(k.size(1) == KV * D && v.size(1) == KV * D, "k and v must be [T, kv_heads * head_dim]");
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t T = k.size(0);
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < NB * bs, "slot ", sl[t], " outside the cache");
  LORAMUX_DISPATCH(k.scalar_type(), "loramux_kv_write", [&] {
    scalar_t* c = cache.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t ks = k.stride(0), vs = v.stride(0), plane = NB * bs * D;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < KV; ++h) {
        std::memcpy(c + h * plane + sl[t] * D, kp + t * ks + h * D, D * sizeof(scalar_t));
        std::memcpy(c + (KV + h) * plane + sl[t] * D, vp + t * vs + h * D, D * sizeof(scalar_t));
      }
  });
}

void decode_attention(at::Tensor out, at::Tensor q, at::Tensor rows, at::Tensor cache,
                      at::Tensor tables, at::Tensor lens, int64_t heads, double scale) {
  check_rows(q, "q");
  check_cpu(out, "out");
  check_cpu(rows, "rows");
  check_cpu(tables, "block_tables");
  check_cpu(lens, "context_lens");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(),
              "cache must be a contiguous [2, kv_heads, blocks, block_size, head_dim]");
  const int64_t KV = cache.size(1), NB = cache.size(2), bs = cache.size(3), D = cache.size(4);
  const int64_t B = rows.numel();
  TORCH_CHECK(heads > 0 && heads % KV == 0 && heads * D == q.size(1), "heads must be a multiple of kv_heads");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == B && out.size(1) == heads && out.size(2) == D,
              "out must be a contiguous [B, heads, head_dim]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == B, "lens must be int64 [B]");
  TORCH_CHECK(tables.scalar_type() == at::kInt && tables.dim() == 2 && tables.size(0) == B && tables.stride(1) == 1,
              "block_tables must be int32 [B, max_blocks]");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && cache.scalar_type() == q.scalar_type(), "one dtype");
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* l = lens.data_ptr<int64_t>();
  const int32_t* tb = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i) {  // validate every index the parallel loop will follow
    TORCH_CHECK(r[i] >= 0 && r[i] < q.size(0), "row ", r[i], " outside q");
    TORCH_CHECK(l[i] >= 1 && (l[i] + bs - 1) / bs <= tables.size(1), "context length ", l[i], " beyond the table");
    for (int64_t j = 0; j < (l[i] + bs - 1) / bs; ++j)
      TORCH_CHECK(tb[i * tables.stride(0) + j] >= 0 && tb[i * tables.stride(0) + j] < NB, "block outside the cache");
  }
  LORAMUX_DISPATCH(q.scalar_type(), "loramux_decode_attention", [&] {
    decode_attention_impl<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), q.stride(0), r,
                                    cache.data_ptr<scalar_t>(), KV, NB, bs, D, tb, tables.stride(0), l, B, heads,
                                    static_cast<float>(scale));
  });
}

at::Tensor argmax_rows(at::Tensor x) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(1) > 0, "x must be float32 [N, V > 0]");
  auto out = x.new_empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* p = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), stride = x.stride(0);
  at::parallel_for(0, x.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) o[r] = argmax_row(p + r * stride, n);
  });
  return out;
}

}  // namespace loramux
