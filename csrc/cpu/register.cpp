// Operator schemas (namespace fastnl_cpp), their CPU implementations, and the
// argument checks shared by all of them. fastnl/backends/cpp.py calls these through
// torch.ops.fastnl_cpp; fastnl's Python custom ops stay the public operators.
#include "ops.h"
#include "tile_math.h"

#include <torch/library.h>

namespace fastnl {

void check_like(const char* name, const Tensor& tensor, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor, got ", tensor.device());
  TORCH_CHECK(tensor.sizes() == shape, name, " must have shape ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

bool bfloat16_native() {
#if defined(FASTNL_AVX512_BF16)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool bfloat16_amx() { return bfloat16_native() && amx_products<c10::BFloat16>(2, 2); }

void check_operands(const Tensor& query, const Tensor& key, const Tensor& value, const OptionalTensor& center,
                    bool bfloat16) {
  TORCH_CHECK(query.dim() == 3, "query must be (B, N, D), got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3, "key must be (B, M, D), got shape ", key.sizes());
  TORCH_CHECK(value.dim() == 3, "value must be (B, M, E), got shape ", value.sizes());
  const auto dtype = query.scalar_type();
  if (bfloat16) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                "query must be float32, float64 or bfloat16 (convert float16 first), got ", dtype);
  } else {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
                "query must be float32 or float64 (convert half precision first), got ", dtype);
  }
  const int64_t batch = query.size(0), num_queries = query.size(1), width = query.size(2);
  const int64_t num_keys = key.size(1);
  TORCH_CHECK(num_keys > 0, "key must have at least one position (M > 0)");
  check_like("query", query, query.sizes(), dtype);
  check_like("key", key, {batch, num_keys, width}, dtype);
  check_like("value", value, {batch, num_keys, value.size(2)}, dtype);
  if (center) check_like("center", *center, {batch, num_queries, value.size(2)}, dtype);
}

}  // namespace fastnl

TORCH_LIBRARY(fastnl_cpp, m) {
  m.def("bfloat16_native() -> bool", &fastnl::bfloat16_native);  // no tensors: one kernel for every device
  m.def("bfloat16_amx() -> bool", &fastnl::bfloat16_amx);
  m.def("bfloat16_dot_speedup() -> float", &fastnl::bfloat16_dot_speedup);
  m.def("exp_rate() -> float", &fastnl::exp_rate);
  m.def(
      "softmax_forward(Tensor query, Tensor key, Tensor value, Tensor? center, "
      "Tensor? log_normalizer, float scale) -> (Tensor, Tensor)");
  m.def(
      "softmax_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? center, "
      "Tensor out, Tensor log_normalizer, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "softmax_shared_backward(Tensor[] grad_outs, Tensor query, Tensor key, Tensor[] values, Tensor[] centers, "
      "Tensor[] outs, Tensor log_normalizer, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "softmax_values_backward(Tensor grad_out, Tensor query, Tensor key, Tensor log_normalizer, float scale) "
      "-> Tensor");
  m.def(
      "dot_forward(Tensor query, Tensor key, Tensor value, Tensor? center, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "dot_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? center, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "concat_forward(Tensor query, Tensor key, Tensor value, Tensor? center, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "concat_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? center, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "projected_batch_norm_forward(Tensor y, Tensor? residual, Tensor weight, Tensor bias, Tensor gamma, "
      "Tensor beta, float eps, Tensor? next_weight=None, Tensor? next_bias=None, bool bfloat16_products=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "projected_batch_norm_backward(Tensor grad_out, Tensor y, Tensor weight, Tensor gamma, Tensor offset, "
      "Tensor covariance, Tensor invstd, Tensor? grad_next_values=None, Tensor? out=None, "
      "Tensor? next_weight=None, bool bfloat16_products=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def("linear_parts_forward(Tensor rows, Tensor weight, Tensor bias, int[] widths) -> Tensor[]");
  m.def("linear_parts_backward(Tensor[] grads, Tensor rows, Tensor weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnl_cpp, CPU, m) {
  m.impl("softmax_forward", &fastnl::softmax_forward);
  m.impl("softmax_backward", &fastnl::softmax_backward);
  m.impl("softmax_shared_backward", &fastnl::softmax_shared_backward);
  m.impl("softmax_values_backward", &fastnl::softmax_values_backward);
  m.impl("dot_forward", &fastnl::dot_forward);
  m.impl("dot_backward", &fastnl::dot_backward);
  m.impl("concat_forward", &fastnl::concat_forward);
  m.impl("concat_backward", &fastnl::concat_backward);
  m.impl("projected_batch_norm_forward", &fastnl::projected_batch_norm_forward);
  m.impl("projected_batch_norm_backward", &fastnl::projected_batch_norm_backward);
  m.impl("linear_parts_forward", &fastnl::linear_parts_forward);
  m.impl("linear_parts_backward", &fastnl::linear_parts_backward);
}
