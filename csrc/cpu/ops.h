// The fastnl_cpp operators (registered in register.cpp) and the checks every entry
// runs first. Shapes as in fastnl/backends/__init__.py: query (B, N, D), key (B, M, D),
// value (B, M, E), center (B, N, E) or none; float32 or float64, on the CPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastnl {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> softmax_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                           const OptionalTensor& center, const OptionalTensor& log_normalizer,
                                           double scale);
std::tuple<Tensor, Tensor, Tensor> softmax_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                    const Tensor& value, const OptionalTensor& center,
                                                    const Tensor& out, const Tensor& log_normalizer, double scale);
std::tuple<Tensor, Tensor> dot_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                       const OptionalTensor& center, double scale);
std::tuple<Tensor, Tensor, Tensor> dot_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                const Tensor& value, const OptionalTensor& center, double scale);
std::tuple<Tensor, Tensor> concat_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                          const OptionalTensor& center, double scale);
std::tuple<Tensor, Tensor, Tensor> concat_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                   const Tensor& value, const OptionalTensor& center, double scale);

// Shapes, dtype, device and contiguity of the operands; errors name the argument.
void check_operands(const Tensor& query, const Tensor& key, const Tensor& value, const OptionalTensor& center);
// A (B, N, E) per-query tensor (grad_out, out) or a (B, N) row statistic.
void check_like(const char* name, const Tensor& tensor, at::IntArrayRef shape, at::ScalarType dtype);

}  // namespace fastnl
