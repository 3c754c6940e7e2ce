// decode_loop.h -- the whole decoder stack of one decode step in one C++ call (server/model/cpu_ops.py builds it).
//
// A decode step at batch 32 is about 300 small calls (4 projections, 2 norms, rotary, KV write,
// attention, activation per layer); from Python each costs its module call, attribute lookups and
// argument checks, about 2 ms per step in all. Here the same calls, in the same order and with the
// same kernels (model_cpu.cpp, bgmv_cpu.cpp, gemm_bf16.cpp / gemm_f32.cpp / qgemm_cpu.cpp or oneDNN's pre-packed linear), run from
// C++: the results
// are bit-identical to the Python path (tests/model/test_cpu_ops.py), only the overhead goes.
//
// Holds references to the model's tensors (weights, pre-packed weights, KV caches, LoRA slot-pool
// tables), never copies: adapters loaded into slots are seen at once. Built for all-decode steps;
// prefill and mixed steps stay on the Python path.
#pragma once
// Light headers only (see loramux_cpu.h): bindings.cpp, which binds DecodeLoop, is the one translation
// unit that includes torch/extension.h. The class is here, whole, for pybind11 to see it.
#include "loramux_cpu.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace loramux {

struct Proj {
  at::Tensor weight;  // plain [out, in], oneDNN pre-packed, or gemm_bf16.cpp panels (see kind)
  c10::optional<at::Tensor> bias;
  int64_t kind = 0;  // 0: at::linear, 1: oneDNN pre-packed, 2: bf16_gemm, 3: f32_gemm, 4: quantized blocks
  int64_t n_out = 0;
  // kind 4 only (qgemm_cpu.cpp's quant_linear; weight = the uint8 blocks): set by set_quant
  bool quant_set = false;
  int64_t fmt = 0, k_in = 0;
  double absmax_offset = 0.0;
  at::Tensor absmax_q, absmax_scale, dyn_map;
  bool lora = false;
  at::Tensor a_tab, scaling;
  std::vector<at::Tensor> b_tabs;
  std::vector<int64_t> offs;
  int64_t r = 0;
};

struct Layer {
  at::Tensor in_w, post_w, cache;
  Proj qkv, o, gate_up, down;
};

// oneDNN's pre-packed linear (mkldnn::_linear_pointwise) through the dispatcher (decode_loop.cpp)
at::Tensor packed_linear(const at::Tensor& x, const Proj& p);

class DecodeLoop {
 public:
  DecodeLoop(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale,
             at::Tensor final_w)
      : H(heads), KV(kv_heads), D(head_dim), I(intermediate), eps(eps), scale(scale), final_w(std::move(final_w)) {
    TORCH_CHECK(H > 0 && KV > 0 && H % KV == 0 && D > 0 && I > 0, "bad model dimensions");
  }

  using ProjArgs = std::tuple<at::Tensor, c10::optional<at::Tensor>, int64_t, int64_t, c10::optional<at::Tensor>,
                              std::vector<at::Tensor>, std::vector<int64_t>, c10::optional<at::Tensor>, int64_t>;

  // projs: qkv, o, gate_up, down as
  // (weight, bias, kind, out_features, a_tab | None, b_tabs, offs, scaling | None, r)
  void add_layer(at::Tensor in_w, at::Tensor post_w, at::Tensor cache, std::vector<ProjArgs> projs) {
    TORCH_CHECK(projs.size() == 4, "a layer has 4 projections");
    Layer l;
    l.in_w = std::move(in_w);
    l.post_w = std::move(post_w);
    l.cache = std::move(cache);
    Proj* dst[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
    for (int i = 0; i < 4; ++i) {
      auto& [w, b, kind, n_out, a_tab, b_tabs, offs, scaling, r] = projs[i];
      TORCH_CHECK(kind >= 0 && kind <= 4, "unknown projection kind ", kind);
      Proj& p = *dst[i];
      p.weight = w;
      p.bias = b;
      p.kind = kind;
      p.n_out = n_out;
      if (a_tab.has_value()) {
        TORCH_CHECK(scaling.has_value() && b_tabs.size() == offs.size() && !b_tabs.empty(), "bad LoRA tables");
        p.lora = true;
        p.a_tab = *a_tab;
        p.b_tabs = b_tabs;
        p.offs = offs;
        p.scaling = *scaling;
        p.r = r;
      }
    }
    layers.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers.size()); }

  // A kind-4 projection's quantized format (kernels/quant.py: 0 q8_0, 1 q4_0, 2 q4_1, 3 nf4) and its
  // nf4 tables (empty tensors for the GGUF formats); proj: 0 qkv, 1 o, 2 gate_up, 3 down.
  void set_quant(int64_t layer, int64_t proj, int64_t fmt, int64_t k_in, at::Tensor absmax_q,
                 at::Tensor absmax_scale, double absmax_offset, at::Tensor dyn_map) {
    TORCH_CHECK(layer >= 0 && layer < num_layers() && proj >= 0 && proj < 4, "bad layer/projection index");
    Layer& l = layers[layer];
    Proj* ps[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
    Proj& p = *ps[proj];
    TORCH_CHECK(p.kind == 4, "set_quant on a projection that is not kind 4");
    p.fmt = fmt;
    p.k_in = k_in;
    p.absmax_q = std::move(absmax_q);
    p.absmax_scale = std::move(absmax_scale);
    p.absmax_offset = absmax_offset;
    p.dyn_map = std::move(dyn_map);
    p.quant_set = true;
  }

  // h: the step's embeddings [T, hidden] -> the final normed hidden states [T, hidden]
  at::Tensor forward(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                        at::Tensor q_rows, at::Tensor tables, at::Tensor lens,
                        c10::optional<at::Tensor> lora_slots) {
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [T, hidden]");
    // A few adapters in the step (one shared adapter, a skewed mix): their blocks for each projection
    // are fetched into L2 during that projection's GEMM, not on demand by the LoRA kernel.
    step_slots.clear();
    if (lora_slots.has_value()) {
      TORCH_CHECK(lora_slots->scalar_type() == at::kLong && lora_slots->is_contiguous(), "lora slots must be int64");
      const int64_t* sp = lora_slots->data_ptr<int64_t>();
      for (int64_t t = 0; t < lora_slots->numel() && static_cast<int64_t>(step_slots.size()) <= kPrefetchSlots; ++t)
        if (sp[t] >= 0 && std::find(step_slots.begin(), step_slots.end(), sp[t]) == step_slots.end())
          step_slots.push_back(sp[t]);
      if (static_cast<int64_t>(step_slots.size()) > kPrefetchSlots) step_slots.clear();
    }
    const int64_t T = h.size(0), q_size = H * D, kv_size = KV * D;
    c10::optional<at::Tensor> residual;
    at::Tensor cur = h;
    for (const Layer& l : layers) {
      at::Tensor normed = at::empty_like(cur);
      rms_norm(normed, cur, l.in_w, eps, residual);
      if (!residual.has_value()) residual = cur;
      at::Tensor qkv = project(l.qkv, normed, lora_slots);
      rotary_(qkv, cos, sin, H + KV, D);
      kv_write(l.cache, qkv.narrow(1, q_size, kv_size), qkv.narrow(1, q_size + kv_size, kv_size), slot_mapping);
      at::Tensor attn = qkv.new_empty({T, H, D});
      decode_attention(attn, qkv.narrow(1, 0, q_size), q_rows, l.cache, tables, lens, H, scale);
      at::Tensor o = project(l.o, attn.view({T, q_size}), lora_slots);
      at::Tensor normed2 = at::empty_like(o);
      rms_norm(normed2, o, l.post_w, eps, residual);
      at::Tensor gu = project(l.gate_up, normed2, lora_slots);
      at::Tensor act = gu.new_empty({T, I});
      silu_and_mul(act, gu);
      cur = project(l.down, act, lora_slots);
    }
    at::Tensor out = at::empty_like(cur);
    rms_norm(out, cur, final_w, eps, residual);
    return out;
  }

 private:
  at::Tensor project(const Proj& p, const at::Tensor& x, const c10::optional<at::Tensor>& slots) {
    regions.clear();
    if (p.lora && slots.has_value() && p.kind == 2) {  // (the fp32 GEMM takes no extra regions)
      const int64_t esz = p.a_tab.element_size(), in = x.size(1), nr = p.a_tab.size(1);
      for (int64_t s : step_slots) {
        regions.emplace_back(static_cast<const char*>(p.a_tab.data_ptr()) + s * in * nr * esz, in * nr * esz);
        for (const auto& b : p.b_tabs)
          regions.emplace_back(static_cast<const char*>(b.data_ptr()) + s * p.r * b.size(1) * esz, p.r * b.size(1) * esz);
      }
    }
    TORCH_CHECK(p.kind != 4 || p.quant_set, "a quantized projection was added without set_quant");
    at::Tensor y = p.kind == 4   ? quant_linear(x, p.weight, p.fmt, p.n_out, p.k_in, p.absmax_q, p.absmax_scale,
                                                   p.absmax_offset, p.dyn_map, p.bias, 0)
                      : p.kind == 3 ? f32_gemm(x, p.weight, p.n_out, p.bias)
                      : p.kind == 2 ? bf16_gemm_prefetching(x, p.weight, p.n_out, p.bias, regions)
                      : p.kind == 1 ? packed_linear(x, p)
                                    : at::linear(x, p.weight, p.bias);
    if (p.lora && slots.has_value()) bgmv(y, x, p.a_tab, p.b_tabs, p.offs, p.scaling, *slots, p.r);
    return y;
  }

  static constexpr int64_t kPrefetchSlots = 4;  // more distinct adapters than this: the kernel streams them itself
  int64_t H, KV, D, I;
  double eps, scale;
  at::Tensor final_w;
  std::vector<Layer> layers;
  std::vector<int64_t> step_slots;
  std::vector<std::pair<const void*, int64_t>> regions;
};

}  // namespace loramux
