// What the CUDA entry points and their host-compiled twin share: argument checks whose
// errors name the offending argument (as flash-attention's flash_api.cpp does), and
// the allocation of the outputs.
#pragma once

#include <torch/extension.h>

#include <initializer_list>
#include <utility>

#include "nonlocal_math.h"

namespace fastnl {

// The row statistics' dtype: float64 for float64 inputs, else float32 (the backend contract).
inline at::ScalarType accumulate_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_tensor(const at::Tensor& tensor, const char* name, at::IntArrayRef shape, at::DeviceType device,
                         at::ScalarType dtype) {
  TORCH_CHECK(tensor.sizes() == shape, name, " must have shape ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(tensor.device().type() == device, name, " must be on ", device, ", got ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", tensor.scalar_type());
}

using NamedRows = std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>>;

// query (B, N, D), key (B, M, D), value (B, M, E); each of `rows` (B, N, E) when given;
// log_normalizer (B, N) in the statistics dtype when given.
inline void check_softmax_operands(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   NamedRows rows, const c10::optional<at::Tensor>& log_normalizer,
                                   at::DeviceType device) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "query, key, value must be (B, N, D), (B, M, D), (B, M, E)");
  const auto batch = query.size(0), num_queries = query.size(1), width_qk = query.size(2);
  const auto num_keys = key.size(1), width_v = value.size(2);
  TORCH_CHECK(width_qk <= kMaxWidth && width_v <= kMaxWidth, "widths D and E must be at most ", kMaxWidth,
              ", got D=", width_qk, ", E=", width_v);
  const auto dtype = query.scalar_type();
  check_tensor(query, "query", {batch, num_queries, width_qk}, device, dtype);
  check_tensor(key, "key", {batch, num_keys, width_qk}, device, dtype);
  check_tensor(value, "value", {batch, num_keys, width_v}, device, dtype);
  for (const auto& [name, tensor] : rows) {
    if (tensor->has_value()) check_tensor(tensor->value(), name, {batch, num_queries, width_v}, device, dtype);
  }
  if (log_normalizer.has_value()) {
    check_tensor(log_normalizer.value(), "log_normalizer", {batch, num_queries}, device, accumulate_dtype(dtype));
  }
}

// Checks a forward call; returns {out (B, N, E), log_normalizer (B, N)}: the given one, or a new one to fill.
inline std::vector<at::Tensor> prepare_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                               const c10::optional<at::Tensor>& center,
                                               const c10::optional<at::Tensor>& log_normalizer, at::DeviceType device) {
  check_softmax_operands(query, key, value, {{"center", &center}}, log_normalizer, device);
  auto out = at::empty({query.size(0), query.size(1), value.size(2)}, value.options());
  auto log_normalizer_out =
      log_normalizer.has_value()
          ? log_normalizer.value()
          : at::empty({query.size(0), query.size(1)}, query.options().dtype(accumulate_dtype(query.scalar_type())));
  return {out, log_normalizer_out};
}

// Checks a backward call; returns zeroed {grad_query, grad_key, grad_value}.
inline std::vector<at::Tensor> prepare_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                                const at::Tensor& key, const at::Tensor& value,
                                                const c10::optional<at::Tensor>& center, const at::Tensor& out,
                                                const at::Tensor& log_normalizer, at::DeviceType device) {
  const c10::optional<at::Tensor> grad_out_given(grad_out), out_given(out);
  check_softmax_operands(query, key, value, {{"grad_out", &grad_out_given}, {"center", &center}, {"out", &out_given}},
                         log_normalizer, device);
  return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
}

}  // namespace fastnl
