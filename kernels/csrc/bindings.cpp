#include <torch/extension.h>

#include "decode_loop.h"
#include "loramux_cpu.h"

// Compute entry points release the GIL (call_guard) so that Python threads -- the structured-output
// mask worker of server/engine/runner.py -- run while a kernel computes. Arguments are converted
// and results wrapped with the GIL held; the kernels themselves touch no Python object.

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bgmv", &loramux::bgmv, "fused LoRA shrink+expand per row over the row-table layout (in place on y)", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("vectorized", &loramux::vectorized, "whether the AVX-512 path of bgmv was compiled in");
  m.def("rms_norm", &loramux::rms_norm, "out = RMSNorm(x) (after residual += x when residual is given)", pybind11::call_guard<pybind11::gil_scoped_release>(),
        pybind11::arg("out"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
        pybind11::arg("residual") = pybind11::none());
  m.def("rotary_", &loramux::rotary_, "rotary embedding in place on the first heads*head_dim columns", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_and_mul", &loramux::silu_and_mul, "out = silu(gate) * up of a fused gate|up row", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("kv_write", &loramux::kv_write, "the step's K and V columns of qkv into the paged cache", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("argmax_rows", &loramux::argmax_rows, "index of the first maximum of each float32 row (NaN wins)", pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<loramux::DecodeLoop>(m, "DecodeLoop", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, double, torch::Tensor>())
      .def("add_layer", &loramux::DecodeLoop::add_layer)
      .def("num_layers", &loramux::DecodeLoop::num_layers)
      .def("set_quant", &loramux::DecodeLoop::set_quant)
      // All layers of a step without the GIL: the structured-output mask worker runs beside it.
      .def("forward", &loramux::DecodeLoop::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bf16_gemm_available", &loramux::bf16_gemm_available, "whether the AVX512-BF16 GEMM was compiled in");
  m.def("f32_gemm_available", &loramux::f32_gemm_available, "whether the AVX-512 fp32 GEMM was compiled in");
  m.def("pack_f32_weight", &loramux::pack_f32_weight, "float32 [N, K] -> panels for f32_gemm", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("f32_gemm", &loramux::f32_gemm, "y = x @ W.T (+ bias) from a pack_f32_weight panel layout", pybind11::call_guard<pybind11::gil_scoped_release>(),
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n_out"), pybind11::arg("bias") = pybind11::none());
  m.def("pack_bf16_weight", &loramux::pack_bf16_weight, "bf16 [N, K] -> panels for bf16_gemm", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bf16_gemm", &loramux::bf16_gemm, "y = x @ W.T (+ bias) from a pack_bf16_weight panel layout", pybind11::call_guard<pybind11::gil_scoped_release>(),
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n_out"), pybind11::arg("bias") = pybind11::none());
  m.def("quant_linear_vectorized", &loramux::quant_linear_vectorized, "whether qgemm_cpu.cpp's AVX2 path was compiled in");
  m.def("quant_linear", &loramux::quant_linear, "y = x @ W.T (+ bias) from quantized blocks (kernels/quant.py)", pybind11::call_guard<pybind11::gil_scoped_release>(),
        pybind11::arg("x"), pybind11::arg("data"), pybind11::arg("fmt"), pybind11::arg("n_out"), pybind11::arg("k_in"),
        pybind11::arg("absmax_q"), pybind11::arg("absmax_scale"), pybind11::arg("absmax_offset"), pybind11::arg("dyn_map"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("impl") = 0);
  m.def("chunk_attention_vectorized", &loramux::chunk_attention_vectorized, "whether chunk_attention.cpp's AVX2 path was compiled in");
  m.def("chunk_attention", &loramux::chunk_attention, "a prefill chunk's attention over its paged context, read in place", pybind11::call_guard<pybind11::gil_scoped_release>(),
        pybind11::arg("out"), pybind11::arg("q"), pybind11::arg("cache"), pybind11::arg("table"), pybind11::arg("context_len"),
        pybind11::arg("heads"), pybind11::arg("scale"), pybind11::arg("impl") = 0);
  m.def("decode_attention", &loramux::decode_attention, "paged attention of one query token per sequence", pybind11::call_guard<pybind11::gil_scoped_release>());
}
