// The concatenation kernel, exact in O((N + M) log M E): relu(a_i + b_j) > 0 exactly
// when b_j > -a_i, so once b is sorted every row's active keys are a suffix and
// suffix sums of [v_j, 1] and [b_j v_j, b_j] give every row's sums. The backward
// sorts a the same way for the key-side gradients. Conventions match the "torch"
// backend: strict relu, w_ij = scale relu(a_i + b_j), C_i = M.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace fastnl {
namespace {

// For each threshold t_i, the sums over the rows r with sort_by[r] > -t_i of
// columns[r] (plain, (n, F)) and of sort_by[r] columns[r] (weighted, (n, F)).
// NaN propagates as in the materialised definition: a NaN in sort_by sorts last and
// counts as active for every row, and a NaN (or infinity) in a column reaches every
// row's plain sums through 0 * (the sum of all rows), as 0 * NaN does in P @ V.
template <typename T>
void sorted_suffix_sums(const T* thresholds, int64_t n, const T* sort_by, int64_t m, const T* columns, int64_t F,
                        T* plain, T* weighted) {
  std::vector<int64_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return sort_by[x] < sort_by[y] || (!std::isnan(sort_by[x]) && std::isnan(sort_by[y]));
  });
  // row r: [sum_{k >= r} columns, sum_{k >= r} sort_by columns] in sorted order; row m is zero
  std::vector<T> suffix((m + 1) * 2 * F, T(0));
  for (int64_t r = m - 1; r >= 0; --r) {
    const T key = sort_by[order[r]];
    const T* column = columns + order[r] * F;
    T* row = suffix.data() + r * 2 * F;
    const T* next = row + 2 * F;
    for (int64_t f = 0; f < F; ++f) {
      row[f] = next[f] + column[f];
      row[F + f] = next[F + f] + key * column[f];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const T bound = -thresholds[i];
    const auto first_active = std::partition_point(
        order.begin(), order.end(), [&](int64_t r) { return !(std::isnan(sort_by[r]) || sort_by[r] > bound); });
    const T* row = suffix.data() + (first_active - order.begin()) * 2 * F;
    for (int64_t f = 0; f < F; ++f) plain[i * F + f] = row[f] + T(0) * suffix[f];
    std::copy(row + F, row + 2 * F, weighted + i * F);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> concat_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                          const OptionalTensor& center, double scale) {
  check_operands(query, key, value, center);
  TORCH_CHECK(query.size(2) == 1, "query must have width D = 1 for the concat kernel, got ", query.size(2));
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), E = value.size(2), F = E + 1;
  Tensor out = at::empty({B, N, E}, value.options()), row_weight = at::empty({B, N}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_cpp::concat_forward", [&] {
    using T = scalar_t;
    const T factor = static_cast<T>(scale / M);
    const T *a = query.const_data_ptr<T>(), *b = key.const_data_ptr<T>(), *v = value.const_data_ptr<T>();
    const T* c = center ? center->const_data_ptr<T>() : nullptr;
    T *y = out.data_ptr<T>(), *weight = row_weight.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> columns(M * F), plain(N * F), weighted(N * F);
      for (int64_t batch = begin; batch < end; ++batch) {
        for (int64_t j = 0; j < M; ++j) {  // [v_j, 1]
          std::copy(v + (batch * M + j) * E, v + (batch * M + j + 1) * E, columns.data() + j * F);
          columns[j * F + E] = T(1);
        }
        sorted_suffix_sums(a + batch * N, N, b + batch * M, M, columns.data(), F, plain.data(), weighted.data());
        for (int64_t i = 0; i < N; ++i) {
          const int64_t row = batch * N + i;
          // sum_j (a_i + b_j) [v_j, 1] over the active keys
          weight[row] = factor * (a[row] * plain[i * F + E] + weighted[i * F + E]);
          for (int64_t e = 0; e < E; ++e)
            y[row * E + e] =
                factor * (a[row] * plain[i * F + e] + weighted[i * F + e]) - (c ? weight[row] * c[row * E + e] : T(0));
        }
      }
    });
  });
  return {out, row_weight};
}

std::tuple<Tensor, Tensor, Tensor> concat_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                   const Tensor& value, const OptionalTensor& center, double scale) {
  check_operands(query, key, value, center);
  TORCH_CHECK(query.size(2) == 1, "query must have width D = 1 for the concat kernel, got ", query.size(2));
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), E = value.size(2), F = E + 1;
  check_like("grad_out", grad_out, {B, N, E}, query.scalar_type());
  Tensor grad_query = at::empty_like(query), grad_key = at::empty_like(key), grad_value = at::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_cpp::concat_backward", [&] {
    using T = scalar_t;
    const T factor = static_cast<T>(scale / M);
    const T *a = query.const_data_ptr<T>(), *b = key.const_data_ptr<T>(), *v = value.const_data_ptr<T>();
    const T *g = grad_out.const_data_ptr<T>(), *c = center ? center->const_data_ptr<T>() : nullptr;
    T *grad_a = grad_query.data_ptr<T>(), *grad_b = grad_key.data_ptr<T>(), *grad_v = grad_value.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> key_columns(M * F), query_columns(N * F);
      std::vector<T> plain(N * F), unused(N * F), plain_q(M * F), weighted_q(M * F);
      for (int64_t batch = begin; batch < end; ++batch) {
        for (int64_t j = 0; j < M; ++j) {  // [v_j, 1]
          std::copy(v + (batch * M + j) * E, v + (batch * M + j + 1) * E, key_columns.data() + j * F);
          key_columns[j * F + E] = T(1);
        }
        sorted_suffix_sums(a + batch * N, N, b + batch * M, M, key_columns.data(), F, plain.data(), unused.data());
        for (int64_t i = 0; i < N; ++i) {  // [dO_i, dO_i . c_i], and dL/da_i
          const int64_t row = batch * N + i;
          T center_grad = 0, total = 0;
          for (int64_t e = 0; e < E; ++e) {
            query_columns[i * F + e] = g[row * E + e];
            if (c) center_grad += g[row * E + e] * c[row * E + e];
            total += g[row * E + e] * plain[i * F + e];
          }
          query_columns[i * F + E] = center_grad;
          grad_a[row] = factor * (total - center_grad * plain[i * F + E]);
        }
        // keys j: sums over the queries i with a_i > -b_j, by the same sort on a
        sorted_suffix_sums(b + batch * M, M, a + batch * N, N, query_columns.data(), F, plain_q.data(),
                           weighted_q.data());
        for (int64_t j = 0; j < M; ++j) {
          const int64_t row = batch * M + j;
          T total = 0;
          for (int64_t e = 0; e < E; ++e) {
            grad_v[row * E + e] = factor * (weighted_q[j * F + e] + b[row] * plain_q[j * F + e]);
            total += v[row * E + e] * plain_q[j * F + e];
          }
          grad_b[row] = factor * (total - plain_q[j * F + E]);
        }
      }
    });
  });
  return {grad_query, grad_key, grad_value};
}

}  // namespace fastnl
