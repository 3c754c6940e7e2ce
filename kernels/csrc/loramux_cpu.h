// The fused CPU ops of loramux, one extension module (bindings.cpp): the LoRA BGMV kernel
// (bgmv_cpu.cpp), the decode-step model ops (model_cpu.cpp) and the decoder loop that chains them
// (decode_loop.cpp), prefill-chunk attention (chunk_attention.cpp).
#pragma once
// Light ATen headers only: torch/extension.h (pybind11 and the whole C++ frontend) costs about 35 s of
// parsing per translation unit, so only bindings.cpp (the pybind11 module) includes it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <utility>
#include <vector>

namespace loramux {
void bgmv(at::Tensor y, at::Tensor x, at::Tensor a_tab, std::vector<at::Tensor> b_tabs,
          std::vector<int64_t> offs, at::Tensor scaling, at::Tensor slots, int64_t r);
bool vectorized();
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps,
              c10::optional<at::Tensor> residual);
void rotary_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t head_dim);
void silu_and_mul(at::Tensor out, at::Tensor gate_up);
void kv_write(at::Tensor cache, at::Tensor k, at::Tensor v, at::Tensor slots);
void decode_attention(at::Tensor out, at::Tensor q, at::Tensor rows, at::Tensor cache,
                      at::Tensor tables, at::Tensor lens, int64_t heads, double scale);
at::Tensor argmax_rows(at::Tensor x);
// chunk_attention.cpp: a prefill chunk's attention over its paged context; impl 1 forces the scalar path
bool chunk_attention_vectorized();
// The decode kernel's fp32 path where AVX-512 is absent: G query heads of one token against keys [0, L)
// of one KV head (online softmax, chunk_attention.cpp's 8-key step); false when not compiled in or D % 8.
bool attend_decode_avx2(const float* q, const float* kplane, const float* vplane, const int32_t* table, int64_t bs,
                        int64_t D, int64_t G, int64_t L, float scale, float* out);
void chunk_attention(at::Tensor out, at::Tensor q, at::Tensor cache, at::Tensor table, int64_t context_len,
                     int64_t heads, double scale, int64_t impl);
bool bf16_gemm_available();
bool f32_gemm_available();
at::Tensor pack_f32_weight(at::Tensor w);
at::Tensor f32_gemm(at::Tensor x, at::Tensor packed, int64_t n_out, c10::optional<at::Tensor> bias);
at::Tensor pack_bf16_weight(at::Tensor w);
at::Tensor bf16_gemm(at::Tensor x, at::Tensor packed, int64_t n_out, c10::optional<at::Tensor> bias);
at::Tensor bf16_gemm_prefetching(at::Tensor x, at::Tensor packed, int64_t n_out,
                                    c10::optional<at::Tensor> bias,
                                    const std::vector<std::pair<const void*, int64_t>>& extra);
// qgemm_cpu.cpp: y = x @ W.T from quantized blocks (fmt 0 q8_0, 1 q4_0, 2 q4_1, 3 nf4); impl 0: the fastest
// path (int16 activations at 1-8 rows of q8_0/q4_*), 1: the scalar fp32 path, 2: the vectorized fp32 path
bool quant_gemv_i16(const uint8_t* data, int64_t fmt, int64_t row_bytes, int64_t K, const float* xf,
                    const float* xsum, int64_t M, int64_t N, float* out);
bool quant_linear_vectorized();
at::Tensor quant_linear(at::Tensor x, at::Tensor data, int64_t fmt, int64_t n_out, int64_t k_in,
                           at::Tensor absmax_q, at::Tensor absmax_scale, double absmax_offset,
                           at::Tensor dyn_map, c10::optional<at::Tensor> bias, int64_t impl);
}  // namespace loramux
