// The fastnl_cpp operators (registered in register.cpp) and the checks every entry
// runs first. Shapes as in fastnl/backends/__init__.py: query (B, N, D), key (B, M, D),
// value (B, M, E), center (B, N, E) or none; float32 or float64, on the CPU, and
// bfloat16 for the softmax operators where built with AVX512-BF16 (bfloat16_native).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastnl {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> softmax_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                           const OptionalTensor& center, const OptionalTensor& log_normalizer,
                                           double scale);
std::tuple<Tensor, Tensor, Tensor> softmax_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                    const Tensor& value, const OptionalTensor& center,
                                                    const Tensor& out, const Tensor& log_normalizer, double scale);
// K blocks sharing one affinity (query, key, log_normalizer), each with its value,
// center (all or none) and out, all (.., E): dQ and dK of all K, and the first block's dV.
std::tuple<Tensor, Tensor, Tensor> softmax_shared_backward(at::TensorList grad_outs, const Tensor& query,
                                                           const Tensor& key, at::TensorList values,
                                                           at::TensorList centers, at::TensorList outs,
                                                           const Tensor& log_normalizer, double scale);
// dV = P^T grad_out alone, P = exp(scale q.k - log_normalizer) (B, N, M)
Tensor softmax_values_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                               const Tensor& log_normalizer, double scale);
std::tuple<Tensor, Tensor> dot_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                       const OptionalTensor& center, double scale);
std::tuple<Tensor, Tensor, Tensor> dot_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                const Tensor& value, const OptionalTensor& center, double scale);
std::tuple<Tensor, Tensor> concat_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                          const OptionalTensor& center, double scale);
std::tuple<Tensor, Tensor, Tensor> concat_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                   const Tensor& value, const OptionalTensor& center, double scale);

// The nonlocal modules' W_z branch in training (batch_norm.cpp): residual +
// BatchNorm(y W^T + b) with batch statistics, over rows y (R, E) of float32, float64 or
// bfloat16, residual (R, C) like y or none, and W (C, E), b, gamma, beta (C) and every
// statistic in the accumulation dtype (float32, float64 for float64 rows). With
// next_weight (F, C) and next_bias (F), also the next block's values out W_next^T +
// b_next (R, F), from the same operator. Forward: (out, the next values ((0, F) without
// them), u's mean and biased variance, y's mean less its first row, y's covariance,
// invstd); backward: (dy, dW, dgamma, dbeta, the gradient reaching out from both its
// uses, dW_next, db_next: the last three empty without the next values, the residual's
// gradient then being grad_out), b's gradient being zero. bfloat16_products: bfloat16
// rows projected on vdpbf16ps (built with AVX512-BF16), their operands rounded to
// bfloat16 as under autocast; else in float32.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> projected_batch_norm_forward(
    const Tensor& y, const OptionalTensor& residual, const Tensor& weight, const Tensor& bias, const Tensor& gamma,
    const Tensor& beta, double eps, const OptionalTensor& next_weight, const OptionalTensor& next_bias,
    bool bfloat16_products);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> projected_batch_norm_backward(
    const Tensor& grad_out, const Tensor& y, const Tensor& weight, const Tensor& gamma, const Tensor& offset,
    const Tensor& covariance, const Tensor& invstd, const OptionalTensor& grad_next_values, const OptionalTensor& out,
    const OptionalTensor& next_weight, bool bfloat16_products);

// The modules' embeddings (linear_parts.cpp): rows x (R, P) of float32 or float64
// times weight (Q, P) plus bias (Q) like them, the Q columns cut into parts of `widths`
// (summing to Q), each returned contiguous (R, width). Backward, from the parts'
// gradients: (dx, dW, db).
std::vector<Tensor> linear_parts_forward(const Tensor& rows, const Tensor& weight, const Tensor& bias,
                                         at::IntArrayRef widths);
std::tuple<Tensor, Tensor, Tensor> linear_parts_backward(at::TensorList grads, const Tensor& rows,
                                                         const Tensor& weight);

// Whether the softmax operators take bfloat16 here: built with FASTNL_AVX512_BF16
// (fastnl/backends/cpp.py adds it, and -mavx512bf16, for a CPU that has the
// instructions), and the CPU running the library has them (cpuid).
bool bfloat16_native();
// Whether their bfloat16 products run on AMX tiles (oneDNN's brgemm) for even D and E:
// the CPU and OS allow AMX and torch.backends.mkldnn is enabled; else on vdpbf16ps.
bool bfloat16_amx();
// The FLOP rate of vdpbf16ps over a float32 FMA's on this core, timed (0 where the
// bfloat16 kernels are not built or not runnable): whether they pay without AMX.
double bfloat16_dot_speedup();
// Exponentials per second on one core of the softmax kernels' own exp (ShiftedExp),
// timed in registers: the rate their exps can reach at best (instruction_rates.cpp).
double exp_rate();

// Shapes, dtype, device and contiguity of the operands (bfloat16 among the dtypes when
// `bfloat16` is true); errors name the argument.
void check_operands(const Tensor& query, const Tensor& key, const Tensor& value, const OptionalTensor& center,
                    bool bfloat16 = false);
// A (B, N, E) per-query tensor (grad_out, out) or a (B, N) row statistic.
void check_like(const char* name, const Tensor& tensor, at::IntArrayRef shape, at::ScalarType dtype);
// The dtype of the accumulators and row statistics (log_normalizer): float64 stays, else float32.
inline at::ScalarType accumulate_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace fastnl
