// Python entry points of the CUDA softmax kernels: check, allocate, launch.
// Signatures as the backend contract's softmax_forward / softmax_backward.
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "softmax_launch.h"

namespace fastnl {

std::vector<at::Tensor> softmax_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                        const c10::optional<at::Tensor>& center,
                                        const c10::optional<at::Tensor>& log_normalizer, double scale) {
  check_softmax_operands(query, key, value, {{"center", &center}}, log_normalizer, at::kCUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  auto out = at::empty({query.size(0), query.size(1), value.size(2)}, value.options());
  auto stats = log_normalizer.has_value()
                   ? log_normalizer.value()
                   : at::empty({query.size(0), query.size(1)}, query.options().dtype(stats_dtype(query.scalar_type())));
  launch_softmax_forward(query, key, value, center, log_normalizer, out, stats, scale);
  return {out, stats};
}

std::vector<at::Tensor> softmax_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const c10::optional<at::Tensor>& center,
                                         const at::Tensor& out, const at::Tensor& log_normalizer, double scale) {
  const c10::optional<at::Tensor> grad_out_opt(grad_out), out_opt(out);
  check_softmax_operands(query, key, value, {{"grad_out", &grad_out_opt}, {"center", &center}, {"out", &out_opt}},
                         log_normalizer, at::kCUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  auto delta = at::empty_like(log_normalizer);
  auto grad_query = at::empty_like(query), grad_key = at::empty_like(key), grad_value = at::empty_like(value);
  launch_softmax_backward(grad_out, query, key, value, center, out, log_normalizer, delta, grad_query, grad_key,
                          grad_value, scale);
  return {grad_query, grad_key, grad_value};
}

}  // namespace fastnl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnl's CUDA kernels for the softmax nonlocal operator";
  m.def("softmax_forward", &fastnl::softmax_forward, "(out, lse) as the backend contract");
  m.def("softmax_backward", &fastnl::softmax_backward, "(grad_query, grad_key, grad_value)");
}
