// The W_z branch of the nonlocal modules in training on the CPU (fastnl/batch_norm.py):
// residual + BatchNorm(y W^T + b) over position rows with batch statistics, one operator
// each way, and u = y W^T + b never stored. u's mean is W mean(y) + b and its variance
// diag(W Cov(y) W^T), so the statistics come from y's own moments (y has C' = C / 2
// columns); the normalised output is one more projection of y with the BatchNorm folded
// into its weight, and the backward's sums over rows are grad^T y. Where the projection
// and nn.BatchNorm write u and read it twice more each way, this is two passes over y.
// At the model's rows (32768, 16 -> 32), fwd+bwd of the stage's three blocks: 1.09x in
// float32, 1.00x in bfloat16 (paired, against the projection and a fused BatchNorm).
// In a stage it also projects out into the next block's values (next_values_kernel),
// and its backward sums the gradient of out over both uses (next_values_backward_kernel).
//
// Rows are contiguous; the moments and projections are row_products.h's, bitwise the
// same for any thread count. Sums, statistics and projections are float32 (float64 for
// float64 rows); bfloat16 rows are converted as they are read, or with
// bfloat16_products their projections, and the next values' moments (no shifts), run on
// vdpbf16ps (Product<BFloat16>; the Python side chooses as for the softmax kernels). The
// moments on vdpbf16ps took the operator's backward with next values from 1.12 to 1.04 ms
// (bf16, 32768 rows, 16 -> 32, paired).
#include "ops.h"
#include "row_products.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace fastnl {
namespace {

// project_kernel with operands Op: A, or bfloat16 on vdpbf16ps.
template <typename Op, typename T, typename A>
void project_with(const T* x, const A* x_shift, const A* weight, const A* bias, const T* x2, const A* x2_shift,
                  const A* weight2, const T* residual, T* out, int64_t R, int64_t P, int64_t P2, int64_t Q) {
  const int64_t ldw = padded<A>(Q);
  const Buffer<Op> w = packed_weight<Op>(weight, P, Q, ldw);
  const Buffer<Op> w2 = x2 ? packed_weight<Op>(weight2, P2, Q, ldw) : Buffer<Op>();
  at::parallel_for(0, R, kChunkRows, [&](int64_t begin, int64_t end) {
    constexpr bool kConverts = !std::is_same_v<Op, A>;  // operands rounded from shifted floats
    Buffer<A> shifted(kConverts ? kChunkRows * std::max(P, P2) : 0);
    Buffer<Op> x_scratch(kChunkRows * P), x2_scratch(x2 ? kChunkRows * P2 : 0);
    Buffer<A> residual_scratch(residual ? kChunkRows * Q : 0), out_scratch(std::is_same_v<T, A> ? 0 : kChunkRows * Q);
    for (int64_t r0 = begin; r0 < end; r0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, end - r0);
      A* result = std::is_same_v<T, A> ? reinterpret_cast<A*>(out) + r0 * Q : out_scratch.data();
      project_rows_of(
          rows, operand_rows(x, r0, rows, P, x_shift, shifted, x_scratch), P, w.data(), ldw, bias,
          residual ? rows_as(residual, r0, rows, Q, Q, static_cast<const A*>(nullptr), residual_scratch) : nullptr,
          result, Q);
      if (x2)
        project_rows_of(rows, operand_rows(x2, r0, rows, P2, x2_shift, shifted, x2_scratch), P2, w2.data(), ldw,
                        static_cast<const A*>(nullptr), result, result, Q);
      if constexpr (!std::is_same_v<T, A>) at::vec::convert(out_scratch.data(), out + r0 * Q, rows * Q);
    }
  });
}

// out = (x - x_shift) weight + (x2 - x2_shift) weight2 + bias + residual, a chunk of rows
// at a time (x2's product added to the first's in place); x2, residual and the shifts
// optional. bfloat16_products: bfloat16 rows and weights (x less its shift, rounded) on
// vdpbf16ps, as a matmul under autocast rounds its operands; half the instructions of
// the float32 FMAs, and an unshifted x read in place.
template <typename T, typename A>
void project_kernel(const T* x, const A* x_shift, const A* weight, const A* bias, const T* x2, const A* x2_shift,
                    const A* weight2, const T* residual, T* out, int64_t R, int64_t P, int64_t P2, int64_t Q,
                    bool bfloat16_products) {
#if defined(FASTNL_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bfloat16_products)
      return project_with<T>(x, x_shift, weight, bias, x2, x2_shift, weight2, residual, out, R, P, P2, Q);
  }
#endif
  project_with<A>(x, x_shift, weight, bias, x2, x2_shift, weight2, residual, out, R, P, P2, Q);
}

// The statistics of u = y W^T + b and the folded projection, everything about y
// centred on its first row y0 (so that a mean far from zero costs no digits): with
// d = mean(y) - y0, u's mean is W (y0 + d) + b and its biased variance diag(W Cov(y) W^T),
// Cov(y) = E[(y - y0)(y - y0)^T] - d d^T; then out = residual + (y - y0) (s W)^T +
// beta - s W d, s = gamma / sqrt(var + eps). `offset` keeps d for the backward.
template <typename T, typename A>
void forward_kernel(const T* y, const T* residual, const A* weight, const A* bias, const A* gamma, const A* beta,
                    double eps, T* out, A* u_mean, A* var, A* offset, A* covariance, A* invstd, int64_t R, int64_t E,
                    int64_t C, bool bfloat16_products) {
  Buffer<A> first(E), cross(E * E), scaled_t(E * C), shifted_bias(C);
  at::vec::convert(y, first.data(), E);
  moments_kernel<T, A>(y, first.data(), y, first.data(), offset, cross.data(), R, E, E);
  for (int64_t e = 0; e < E; ++e) offset[e] /= A(R);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t f = 0; f < E; ++f) covariance[e * E + f] = cross[e * E + f] / A(R) - offset[e] * offset[f];
  for (int64_t c = 0; c < C; ++c) {
    const A* w = weight + c * E;
    A v = 0, shifted_mean = 0, first_row = 0;
    for (int64_t e = 0; e < E; ++e) {
      shifted_mean += w[e] * offset[e];
      first_row += w[e] * first[e];
      for (int64_t f = 0; f < E; ++f) v += w[e] * covariance[e * E + f] * w[f];
    }
    var[c] = std::max(A(0), v);
    u_mean[c] = first_row + shifted_mean + bias[c];
    invstd[c] = A(1) / std::sqrt(var[c] + A(eps));
    const A scale = gamma[c] * invstd[c];
    for (int64_t e = 0; e < E; ++e) scaled_t[e * C + c] = scale * w[e];
    shifted_bias[c] = beta[c] - scale * shifted_mean;
  }
  project_kernel<T, A>(y, first.data(), scaled_t.data(), shifted_bias.data(), nullptr, nullptr, nullptr, residual, out,
                       R, E, 0, C, bfloat16_products);
}

// The next block's values out W_next^T + b_next (next_weight (F, C)), from out as stored.
template <typename T, typename A>
void next_values_kernel(const T* out, const A* next_weight, const A* next_bias, T* next_values, int64_t R, int64_t C,
                        int64_t F, bool bfloat16_products) {
  Buffer<A> transposed(C * F);
  for (int64_t f = 0; f < F; ++f)
    for (int64_t c = 0; c < C; ++c) transposed[c * F + f] = next_weight[f * C + c];
  project_kernel<T, A>(out, nullptr, transposed.data(), next_bias, nullptr, nullptr, nullptr, nullptr, next_values, R,
                       C, 0, F, bfloat16_products);
}

// The gradient reaching out (R, C) from both its uses: grad_out, and through the next
// block's values, grad_next_values W_next; and W_next's and b_next's own.
template <typename T, typename A>
void next_values_backward_kernel(const T* grad_out, const T* grad_next_values, const T* out, const A* next_weight,
                                 T* grad_total, A* grad_next_weight, A* grad_next_bias, int64_t R, int64_t C, int64_t F,
                                 bool bfloat16_products) {
  project_kernel<T, A>(grad_next_values, nullptr, next_weight, nullptr, nullptr, nullptr, nullptr, grad_out, grad_total,
                       R, F, 0, C, bfloat16_products);
  moments_kernel<T, A>(grad_next_values, nullptr, out, nullptr, grad_next_bias, grad_next_weight, R, F, C,
                       bfloat16_products);
}

// BatchNorm's backward through u = y W^T + b, with g = grad_out and xhat = (u - mean)
// invstd: du = s (g - sum g / R - xhat sum(g xhat) / R). Its sums over rows come from
// g^T (y - y0); dy = du W = g (s W) + (y - y0) M + c, and dW = du^T y from the same
// small matrices.
template <typename T, typename A>
void backward_kernel(const T* grad_out, const T* y, const A* weight, const A* gamma, const A* offset,
                     const A* covariance, const A* invstd, T* grad_y, A* grad_weight, A* grad_gamma, A* grad_beta,
                     int64_t R, int64_t E, int64_t C, bool bfloat16_products) {
  Buffer<A> first(E), cross(C * E), centered(C * E), through_var(C), scaled(C * E), back(E * E), constant(E);
  at::vec::convert(y, first.data(), E);
  moments_kernel<T, A>(grad_out, nullptr, y, first.data(), grad_beta, cross.data(), R, C, E);
  for (int64_t c = 0; c < C; ++c) {
    const A* w = weight + c * E;
    A sum = 0;
    for (int64_t e = 0; e < E; ++e) {  // g^T (y - mean)
      centered[c * E + e] = cross[c * E + e] - grad_beta[c] * offset[e];
      sum += centered[c * E + e] * w[e];
    }
    grad_gamma[c] = invstd[c] * sum;
    const A scale = gamma[c] * invstd[c];
    through_var[c] = scale * invstd[c] * grad_gamma[c];  // the variance's share of du, per channel
    for (int64_t e = 0; e < E; ++e) {
      scaled[c * E + e] = scale * w[e];
      A product = 0;  // (W Cov^T)[c, e]
      for (int64_t f = 0; f < E; ++f) product += w[f] * covariance[e * E + f];
      grad_weight[c * E + e] = scale * centered[c * E + e] - through_var[c] * product;
    }
  }
  for (int64_t e = 0; e < E; ++e)  // M = -W^T diag(through_var) W / R
    for (int64_t f = 0; f < E; ++f) {
      A sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += weight[c * E + e] * through_var[c] * weight[c * E + f];
      back[e * E + f] = -sum / A(R);
    }
  for (int64_t f = 0; f < E; ++f) {  // c = -(s grad_beta) W / R - d M
    A sum = 0;
    for (int64_t c = 0; c < C; ++c) sum -= scaled[c * E + f] * grad_beta[c] / A(R);
    for (int64_t e = 0; e < E; ++e) sum -= offset[e] * back[e * E + f];
    constant[f] = sum;
  }
  project_kernel<T, A>(grad_out, nullptr, scaled.data(), constant.data(), y, first.data(), back.data(), nullptr, grad_y,
                       R, C, E, E, bfloat16_products);
}

void check_rows(const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, name, " must be rows (R, C), got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, name,
              " must be float32, float64 or bfloat16, got ", dtype);
  check_like(name, t, t.sizes(), dtype);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> projected_batch_norm_forward(
    const Tensor& y, const OptionalTensor& residual, const Tensor& weight, const Tensor& bias, const Tensor& gamma,
    const Tensor& beta, double eps, const OptionalTensor& next_weight, const OptionalTensor& next_bias,
    bool bfloat16_products) {
  check_rows("y", y);
  const int64_t R = y.size(0), E = y.size(1), C = weight.size(0);
  TORCH_CHECK(R > 1, "batch statistics need more than one row, got ", R);
  const auto statistics = accumulate_type(y.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "weight must be (C, E), got shape ", weight.sizes());
  check_like("weight", weight, {C, E}, statistics);
  for (const auto& [name, t] : {std::pair{"bias", bias}, std::pair{"gamma", gamma}, std::pair{"beta", beta}})
    check_like(name, t, {C}, statistics);
  if (residual) check_like("residual", *residual, {R, C}, y.scalar_type());
  TORCH_CHECK(next_weight.has_value() == next_bias.has_value(), "next_weight and next_bias go together");
  const int64_t F = next_weight ? next_weight->size(0) : 0;
  if (next_weight) {
    TORCH_CHECK(next_weight->dim() == 2, "next_weight must be (F, C), got shape ", next_weight->sizes());
    check_like("next_weight", *next_weight, {F, C}, statistics);
    check_like("next_bias", *next_bias, {F}, statistics);
  }
  const auto options = weight.options();
  Tensor out = at::empty({R, C}, y.options()), u_mean = at::empty({C}, options), var = at::empty({C}, options);
  Tensor offset = at::empty({E}, options), covariance = at::empty({E, E}, options), invstd = at::empty({C}, options);
  Tensor next_values = at::empty({next_weight ? R : 0, F}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "fastnl_cpp::projected_batch_norm_forward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, A>(y.const_data_ptr<scalar_t>(), residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                                weight.const_data_ptr<A>(), bias.const_data_ptr<A>(), gamma.const_data_ptr<A>(),
                                beta.const_data_ptr<A>(), eps, out.data_ptr<scalar_t>(), u_mean.data_ptr<A>(),
                                var.data_ptr<A>(), offset.data_ptr<A>(), covariance.data_ptr<A>(), invstd.data_ptr<A>(),
                                R, E, C, bfloat16_products);
    if (next_weight)
      next_values_kernel<scalar_t, A>(out.const_data_ptr<scalar_t>(), next_weight->const_data_ptr<A>(),
                                      next_bias->const_data_ptr<A>(), next_values.data_ptr<scalar_t>(), R, C, F,
                                      bfloat16_products);
  });
  return {out, next_values, u_mean, var, offset, covariance, invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> projected_batch_norm_backward(
    const Tensor& grad_out, const Tensor& y, const Tensor& weight, const Tensor& gamma, const Tensor& offset,
    const Tensor& covariance, const Tensor& invstd, const OptionalTensor& grad_next_values, const OptionalTensor& out,
    const OptionalTensor& next_weight, bool bfloat16_products) {
  check_rows("y", y);
  const int64_t R = y.size(0), E = y.size(1), C = weight.size(0);
  const auto statistics = accumulate_type(y.scalar_type());
  check_like("grad_out", grad_out, {R, C}, y.scalar_type());
  check_like("weight", weight, {C, E}, statistics);
  check_like("gamma", gamma, {C}, statistics);
  check_like("offset", offset, {E}, statistics);
  check_like("covariance", covariance, {E, E}, statistics);
  check_like("invstd", invstd, {C}, statistics);
  const bool next = grad_next_values.has_value();
  TORCH_CHECK(next == out.has_value() && next == next_weight.has_value(),
              "grad_next_values, out and next_weight go together");
  const int64_t F = next ? next_weight->size(0) : 0;
  if (next) {
    TORCH_CHECK(next_weight->dim() == 2, "next_weight must be (F, C), got shape ", next_weight->sizes());
    check_like("next_weight", *next_weight, {F, C}, statistics);
    check_like("grad_next_values", *grad_next_values, {R, F}, y.scalar_type());
    check_like("out", *out, {R, C}, y.scalar_type());
  }
  Tensor grad_y = at::empty_like(y), grad_weight = at::empty_like(weight), grad_gamma = at::empty_like(gamma);
  // grad_total: the gradient reaching out, where the next block's values are taken from it
  Tensor grad_beta = at::empty_like(gamma), grad_total = at::empty({next ? R : 0, C}, grad_out.options());
  Tensor grad_next_weight = at::empty({F, next ? C : 0}, weight.options()),
         grad_next_bias = at::empty({F}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "fastnl_cpp::projected_batch_norm_backward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (next)
      next_values_backward_kernel<scalar_t, A>(
          grad_out.const_data_ptr<scalar_t>(), grad_next_values->const_data_ptr<scalar_t>(),
          out->const_data_ptr<scalar_t>(), next_weight->const_data_ptr<A>(), grad_total.data_ptr<scalar_t>(),
          grad_next_weight.data_ptr<A>(), grad_next_bias.data_ptr<A>(), R, C, F, bfloat16_products);
    backward_kernel<scalar_t, A>((next ? grad_total : grad_out).const_data_ptr<scalar_t>(),
                                 y.const_data_ptr<scalar_t>(), weight.const_data_ptr<A>(), gamma.const_data_ptr<A>(),
                                 offset.const_data_ptr<A>(), covariance.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                                 grad_y.data_ptr<scalar_t>(), grad_weight.data_ptr<A>(), grad_gamma.data_ptr<A>(),
                                 grad_beta.data_ptr<A>(), R, E, C, bfloat16_products);
  });
  return {grad_y, grad_weight, grad_gamma, grad_beta, grad_total, grad_next_weight, grad_next_bias};
}

}  // namespace fastnl
