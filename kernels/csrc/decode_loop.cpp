// decode_loop.cpp: the one out-of-line piece of DecodeLoop (decode_loop.h), the oneDNN call through
// the dispatcher (its header is the heavy part, kept out of bindings.cpp).
#include "decode_loop.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace loramux {

at::Tensor packed_linear(const at::Tensor& x, const Proj& p) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(p.weight);
  stack.emplace_back(p.bias.has_value() ? c10::IValue(*p.bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace loramux
