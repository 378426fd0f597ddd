// Python entry points of the CUDA softmax kernels: check, allocate, launch.
// Signatures as the backend contract's softmax_forward / softmax_backward.
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "softmax_launch.h"

namespace fastnl {

std::vector<at::Tensor> softmax_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                        const c10::optional<at::Tensor>& center,
                                        const c10::optional<at::Tensor>& log_normalizer, double scale) {
  const c10::cuda::CUDAGuard guard(query.device());
  auto outputs = prepare_forward(query, key, value, center, log_normalizer, at::kCUDA);
  launch_softmax_forward(query, key, value, center, outputs[0], outputs[1], log_normalizer.has_value(), scale);
  return outputs;
}

std::vector<at::Tensor> softmax_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const c10::optional<at::Tensor>& center,
                                         const at::Tensor& out, const at::Tensor& log_normalizer, double scale) {
  const c10::cuda::CUDAGuard guard(query.device());
  auto grads = prepare_backward(grad_out, query, key, value, center, out, log_normalizer, at::kCUDA);
  launch_softmax_backward(grad_out, query, key, value, center, out, log_normalizer, at::empty_like(log_normalizer),
                          grads[0], grads[1], grads[2], scale);
  return grads;
}

}  // namespace fastnl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnl's CUDA kernels for the softmax nonlocal operator";
  m.def("softmax_forward", &fastnl::softmax_forward, "(out, log_normalizer) as the backend contract");
  m.def("softmax_backward", &fastnl::softmax_backward, "(grad_query, grad_key, grad_value)");
}
