// The embeddings of a nonlocal module on the CPU (fastnl/linear_parts.py): theta, phi
// (and the first g) of the same rows x (R, P) as one projection x W^T + b, W (Q, P)
// their weights stacked, each part's columns written to a contiguous tensor of its own,
// one pass over x. A GEMM writes the joined (R, Q) result, which the operators' rows then
// need copied apart, and its backward concatenates the parts' gradients (a copy of
// 16-column rows, the slowest step of the three) before two more GEMMs. Here the
// backward is dx = sum_k g_k W_k, one pass over the parts' gradients, and W's and b's
// gradients are the moments G^T x and the column sums of G, the parts' gradients G side
// by side, read part by part (row_products.h): one more pass. float32 and float64:
// bfloat16 rows stay with the GEMM, whose bf16 products (oneDNN) were as fast (paired,
// the stage's embeddings under bf16 autocast: this operator 0.94-0.97x of them).
#include "ops.h"
#include "row_products.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <numeric>
#include <vector>

namespace fastnl {
namespace {

// outs[k] (R, widths[k]) = x weight[offset_k:offset_k + widths[k], :]^T + bias[offset_k..]
// for weight (Q, P), the parts side by side in Q.
template <typename T>
void forward_kernel(const T* x, const T* weight, const T* bias, const std::vector<T*>& outs,
                    const std::vector<int64_t>& widths, int64_t R, int64_t P, int64_t Q) {
  // weight^T (P, Q) as project_block reads it; a part's column blocks read whole vectors
  // of its rows from the part's offset on: one vector more than Q keeps the last part's
  // reads inside each row
  const int64_t ldw = padded<T>(Q + Vec<T>::size());
  Buffer<T> w(P * ldw);
  pack_transposed(weight, Q, P, w.data(), ldw);
  at::parallel_for(0, R, kChunkRows, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, end - r0);
      int64_t offset = 0;
      for (size_t k = 0; k < outs.size(); ++k) {
        project_rows_of(rows, x + r0 * P, P, w.data() + offset, ldw, bias + offset, static_cast<const T*>(nullptr),
                        outs[k] + r0 * widths[k], widths[k]);
        offset += widths[k];
      }
    }
  });
}

// grad_x (R, P) = sum_k grads[k] weight[offset_k:offset_k + widths[k], :] for weight (Q, P):
// the parts' products added in place, a chunk of rows at a time.
template <typename T>
void grad_rows_kernel(const std::vector<const T*>& grads, const T* weight, const std::vector<int64_t>& widths,
                      T* grad_x, int64_t R, int64_t P) {
  const int64_t ldw = padded<T>(P), Q = std::accumulate(widths.begin(), widths.end(), int64_t(0));
  const Buffer<T> w = packed_weight<T>(weight, Q, P, ldw);  // part k's rows from offset_k on
  at::parallel_for(0, R, kChunkRows, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, end - r0);
      T* result = grad_x + r0 * P;
      int64_t offset = 0;
      for (size_t k = 0; k < grads.size(); ++k) {
        project_rows_of(rows, grads[k] + r0 * widths[k], widths[k], w.data() + offset * ldw, ldw,
                        static_cast<const T*>(nullptr), k == 0 ? nullptr : result, result, P);
        offset += widths[k];
      }
    }
  });
}

// rows (R, P) of float32 or float64 and weight (Q, P) like them.
void check_parts(const Tensor& rows, const Tensor& weight, int64_t parts_width) {
  TORCH_CHECK(rows.dim() == 2, "rows must be (R, P), got shape ", rows.sizes());
  const auto dtype = rows.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rows must be float32 or float64, got ", dtype);
  check_like("rows", rows, rows.sizes(), dtype);
  TORCH_CHECK(weight.dim() == 2, "weight must be (Q, P), got shape ", weight.sizes());
  check_like("weight", weight, {parts_width, rows.size(1)}, dtype);
}

// Q, the parts' widths summed, each above 0.
int64_t total_width(at::IntArrayRef widths) {
  TORCH_CHECK(!widths.empty(), "linear_parts needs at least one part");
  int64_t total = 0;
  for (const int64_t width : widths) {
    TORCH_CHECK(width > 0, "every part needs a width above 0, got ", widths);
    total += width;
  }
  return total;
}

}  // namespace

std::vector<Tensor> linear_parts_forward(const Tensor& rows, const Tensor& weight, const Tensor& bias,
                                         at::IntArrayRef widths) {
  const int64_t Q = total_width(widths);
  check_parts(rows, weight, Q);
  check_like("bias", bias, {Q}, rows.scalar_type());
  const int64_t R = rows.size(0), P = rows.size(1);
  std::vector<Tensor> outs;
  for (const int64_t width : widths) outs.push_back(at::empty({R, width}, rows.options()));
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fastnl_cpp::linear_parts_forward", [&] {
    std::vector<scalar_t*> pointers;
    for (auto& out : outs) pointers.push_back(out.data_ptr<scalar_t>());
    forward_kernel<scalar_t>(rows.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             bias.const_data_ptr<scalar_t>(), pointers,
                             std::vector<int64_t>(widths.begin(), widths.end()), R, P, Q);
  });
  return outs;
}

std::tuple<Tensor, Tensor, Tensor> linear_parts_backward(at::TensorList grads, const Tensor& rows,
                                                         const Tensor& weight) {
  TORCH_CHECK(!grads.empty(), "linear_parts_backward needs the parts' gradients");
  std::vector<int64_t> widths;
  for (const auto& grad : grads) {
    TORCH_CHECK(grad.dim() == 2, "grads must be (R, width) each, got shape ", grad.sizes());
    widths.push_back(grad.size(1));
  }
  const int64_t Q = total_width(widths);
  check_parts(rows, weight, Q);
  const int64_t R = rows.size(0), P = rows.size(1);
  for (size_t k = 0; k < grads.size(); ++k) check_like("grads", grads[k], {R, widths[k]}, rows.scalar_type());
  Tensor grad_rows = at::empty({R, P}, rows.options()), grad_weight = at::empty({Q, P}, weight.options());
  Tensor grad_bias = at::empty({Q}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fastnl_cpp::linear_parts_backward", [&] {
    std::vector<const scalar_t*> pointers;
    for (const auto& grad : grads) pointers.push_back(grad.const_data_ptr<scalar_t>());
    grad_rows_kernel<scalar_t>(pointers, weight.const_data_ptr<scalar_t>(), widths, grad_rows.data_ptr<scalar_t>(), R,
                               P);
    // W's gradient G^T x and b's the column sums of G, G (R, Q) the parts' gradients side by side
    moments_kernel<scalar_t, scalar_t>(ColumnBlocks<scalar_t>{pointers, widths}, nullptr,
                                       rows.const_data_ptr<scalar_t>(), nullptr, grad_bias.data_ptr<scalar_t>(),
                                       grad_weight.data_ptr<scalar_t>(), R, P);
  });
  return {grad_rows, grad_weight, grad_bias};
}

}  // namespace fastnl
