// The fused CPU ops of loramux, one extension module (bindings.cpp): the LoRA BGMV kernel
// (bgmv_cpu.cpp), the decode-step model ops (model_cpu.cpp) and the decoder loop that chains them
// (decode_loop.cpp).
#pragma once
#include <torch/extension.h>

#include <utility>
#include <vector>

namespace loramux {
void bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor a_tab, std::vector<torch::Tensor> b_tabs,
          std::vector<int64_t> offs, torch::Tensor scaling, torch::Tensor slots, int64_t r);
bool vectorized();
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps,
              c10::optional<torch::Tensor> residual);
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t head_dim);
void silu_and_mul(torch::Tensor out, torch::Tensor gate_up);
void kv_write(torch::Tensor cache, torch::Tensor k, torch::Tensor v, torch::Tensor slots);
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor rows, torch::Tensor cache,
                      torch::Tensor tables, torch::Tensor lens, int64_t heads, double scale);
torch::Tensor argmax_rows(torch::Tensor x);
void bind_decode_loop(pybind11::module& m);
bool bf16_gemm_available();
bool f32_gemm_available();
torch::Tensor pack_f32_weight(torch::Tensor w);
torch::Tensor f32_gemm(torch::Tensor x, torch::Tensor packed, int64_t n_out, c10::optional<torch::Tensor> bias);
torch::Tensor pack_bf16_weight(torch::Tensor w);
torch::Tensor bf16_gemm(torch::Tensor x, torch::Tensor packed, int64_t n_out, c10::optional<torch::Tensor> bias);
torch::Tensor bf16_gemm_prefetching(torch::Tensor x, torch::Tensor packed, int64_t n_out,
                                    c10::optional<torch::Tensor> bias,
                                    const std::vector<std::pair<const void*, int64_t>>& extra);
// qgemm_cpu.cpp: y = x @ W.T from quantized blocks (fmt 0 q8_0, 1 q4_0, 2 q4_1, 3 nf4); impl 1 forces the scalar path
bool quant_linear_vectorized();
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor data, int64_t fmt, int64_t n_out, int64_t k_in,
                           torch::Tensor absmax_q, torch::Tensor absmax_scale, double absmax_offset,
                           torch::Tensor dyn_map, c10::optional<torch::Tensor> bias, int64_t impl);
}  // namespace loramux
