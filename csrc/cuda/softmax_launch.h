// The launchers of softmax_kernels.cu, called by softmax_api.cpp after its checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastnl {

// Fills out (B, N, E); reads log_normalizer (B, N) when known, else fills it.
void launch_softmax_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& center, const at::Tensor& out,
                            const at::Tensor& log_normalizer, bool known, double scale);

// Fills grad_query, grad_key, grad_value; delta (B, N) is scratch in the accumulator dtype.
void launch_softmax_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const c10::optional<at::Tensor>& center, const at::Tensor& out,
                             const at::Tensor& log_normalizer, const at::Tensor& delta, const at::Tensor& grad_query,
                             const at::Tensor& grad_key, const at::Tensor& grad_value, double scale);

}  // namespace fastnl
