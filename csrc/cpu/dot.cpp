// The dot-product kernel, exact and linear in N + M by associativity:
// sum_j (q_i . k_j) v_j = q_i^T (sum_j k_j v_j^T), so no affinity is ever formed.
// Sums over positions are taken in fixed chunks and added in chunk order, so the
// results do not depend on the thread count.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

namespace fastnl {
namespace {

constexpr int64_t kChunk = 1024;  // positions per partial sum

// sums[b] (D, F + 1) = sum_l x_l [y_l, w_l]^T with w_l = weight[l], or 1 without weights.
template <typename T>
std::vector<T> outer_sums(const T* x, const T* y, const T* weight, int64_t batch, int64_t length, int64_t D,
                          int64_t F) {
  const int64_t chunks = std::max<int64_t>(1, (length + kChunk - 1) / kChunk), cols = F + 1;
  std::vector<T> partial(batch * chunks * D * cols, T(0));
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, start = (item % chunks) * kChunk;
      T* sums = partial.data() + item * D * cols;
      for (int64_t l = start; l < std::min(length, start + kChunk); ++l) {
        const int64_t row = b * length + l;
        const T w = weight ? weight[row] : T(1);
        for (int64_t d = 0; d < D; ++d) {
          const T xd = x[row * D + d];
          T* out = sums + d * cols;
          for (int64_t f = 0; f < F; ++f) out[f] += xd * y[row * F + f];
          out[F] += xd * w;
        }
      }
    }
  });
  std::vector<T> sums(batch * D * cols, T(0));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t k = 0; k < D * cols; ++k) sums[b * D * cols + k] += partial[(b * chunks + c) * D * cols + k];
  return sums;
}

// out_l (F) = factor x_l^T matrix[:, :F] for matrix (D, F + 1); last_l = factor x_l . matrix[:, F].
template <typename T>
void expand_rows(const T* x, const std::vector<T>& matrix, T factor, int64_t batch, int64_t length, int64_t D,
                 int64_t F, T* out, T* last) {
  at::parallel_for(0, batch * length, kChunk, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(F + 1);
    for (int64_t row = begin; row < end; ++row) {
      const T* m = matrix.data() + (row / length) * D * (F + 1);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t d = 0; d < D; ++d)
        for (int64_t f = 0; f <= F; ++f) acc[f] += x[row * D + d] * m[d * (F + 1) + f];
      for (int64_t f = 0; f < F; ++f) out[row * F + f] = factor * acc[f];
      if (last) last[row] = factor * acc[F];
    }
  });
}

// out_l (D) = factor (matrix[:, :F] y_l - s_l matrix[:, F]), s_l = shift[l] or shift_all.
template <typename T>
void contract_rows(const T* y, const std::vector<T>& matrix, const T* shift, T shift_all, T factor, int64_t batch,
                   int64_t length, int64_t D, int64_t F, T* out) {
  at::parallel_for(0, batch * length, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* m = matrix.data() + (row / length) * D * (F + 1);
      const T s = shift ? shift[row] : shift_all;
      for (int64_t d = 0; d < D; ++d) {
        T total = 0;
        for (int64_t f = 0; f < F; ++f) total += m[d * (F + 1) + f] * y[row * F + f];
        out[row * D + d] = factor * (total - s * m[d * (F + 1) + F]);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> dot_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                       const OptionalTensor& center, double scale) {
  check_operands(query, key, value, center);
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), D = query.size(2), E = value.size(2);
  Tensor out = at::empty({B, N, E}, value.options()), row_weight = at::empty({B, N}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_cpp::dot_forward", [&] {
    using T = scalar_t;
    const T factor = static_cast<T>(scale / M);
    // (D, E + 1) per batch: sum_j k_j v_j^T beside sum_j k_j
    const auto key_value = outer_sums<T>(key.const_data_ptr<T>(), value.const_data_ptr<T>(), nullptr, B, M, D, E);
    T* out_data = out.data_ptr<T>();
    T* weight = row_weight.data_ptr<T>();
    expand_rows<T>(query.const_data_ptr<T>(), key_value, factor, B, N, D, E, out_data, weight);
    if (center) {
      const T* c = center->const_data_ptr<T>();
      at::parallel_for(0, B * N, kChunk, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row)
          for (int64_t e = 0; e < E; ++e) out_data[row * E + e] -= weight[row] * c[row * E + e];
      });
    }
  });
  return {out, row_weight};
}

std::tuple<Tensor, Tensor, Tensor> dot_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                const Tensor& value, const OptionalTensor& center, double scale) {
  check_operands(query, key, value, center);
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), D = query.size(2), E = value.size(2);
  check_like("grad_out", grad_out, {B, N, E}, query.scalar_type());
  Tensor grad_query = at::empty_like(query), grad_key = at::empty_like(key), grad_value = at::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_cpp::dot_backward", [&] {
    using T = scalar_t;
    const T factor = static_cast<T>(scale / M);
    const T* g = grad_out.const_data_ptr<T>();
    // center_grad_i = dO_i . c_i: the center term's share of every gradient
    std::vector<T> center_grad;
    if (center) {
      const T* c = center->const_data_ptr<T>();
      center_grad.assign(B * N, T(0));
      for (int64_t row = 0; row < B * N; ++row)
        for (int64_t e = 0; e < E; ++e) center_grad[row] += g[row * E + e] * c[row * E + e];
    }
    const T* center_grad_data = center ? center_grad.data() : nullptr;
    const auto key_value = outer_sums<T>(key.const_data_ptr<T>(), value.const_data_ptr<T>(), nullptr, B, M, D, E);
    // (D, E + 1): sum_i q_i dO_i^T beside sum_i q_i center_grad_i
    const auto query_grad = outer_sums<T>(query.const_data_ptr<T>(), g, center_grad_data, B, N, D, E);
    contract_rows<T>(g, key_value, center_grad_data, T(0), factor, B, N, D, E, grad_query.data_ptr<T>());
    contract_rows<T>(value.const_data_ptr<T>(), query_grad, nullptr, center ? T(1) : T(0), factor, B, M, D, E,
                     grad_key.data_ptr<T>());
    expand_rows<T>(key.const_data_ptr<T>(), query_grad, factor, B, M, D, E, grad_value.data_ptr<T>(), nullptr);
  });
  return {grad_query, grad_key, grad_value};
}

}  // namespace fastnl
