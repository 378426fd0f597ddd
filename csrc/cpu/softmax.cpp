// The softmax kernel, flash style: query tiles x key tiles, online softmax, only the
// row log-sum-exp kept for the backward, tiles recomputed there; no N x M buffer.
//
// Forward: K^T (and V, if its rows are not whole vectors) are packed once per batch
// element; then one work item per (batch, query tile) owns its rows' running max, sum
// and output accumulator across all key tiles. With a known log_normalizer (a stage's
// later blocks) it is a single pass without rescaling.
// Backward: one work item per (batch, query group) walks the key tiles once and
// accumulates dQ for its rows and dK^T, dV^T for all keys into its own slot of a
// (B, groups, D + E, M) buffer, summed afterwards in group order. The grouping
// depends on the shape only, so results are bitwise identical for any thread count.
// Every work item runs with denormals flushed to zero (tile_math.h, FlushDenormals).
#include "ops.h"
#include "tile_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <type_traits>

namespace fastnl {
namespace {

// rows x keys per tile; measured on B=16, N=1024, D=8, E=16 (benchmarks/test_cpp_bench.py)
constexpr int64_t kForwardQueryTile = 32;
constexpr int64_t kForwardKeyTile = 256;
constexpr int64_t kBackwardQueryTile = 32;
constexpr int64_t kBackwardKeyTile = 128;
constexpr int64_t kMinWorkItems = 16;  // backward: groups per batch = ceil(16 / B)

// Calls fn with D as a compile-time constant for the small widths, 0 (runtime) otherwise.
template <typename Fn>
void with_depth(int64_t depth, Fn fn) {
  switch (depth) {
    case 8: return fn(std::integral_constant<int, 8>{});
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

struct Shape {
  int64_t batch, queries, keys, depth, width;  // B, N, M, D, E
};

// Padded key columns (keys..width) of a logit tile must get zero probability.
template <typename T>
void mask_padding(T* logits, int64_t rows, int64_t keys, int64_t width) {
  for (int64_t r = 0; r < rows; ++r)
    std::fill(logits + r * width + keys, logits + (r + 1) * width, -std::numeric_limits<T>::infinity());
}

// p = exp(logit - shift) in place over a padded row; returns the lane-wise sum of p,
// left unreduced so the caller can keep per-row sums in vectors.
template <typename T>
Vec<T> exp_row(T* row, int64_t width, T shift) {
  const Vec<T> shift_vec(shift);
  Vec<T> total(T(0));
  for (int64_t c = 0; c < width; c += Vec<T>::size()) {
    const Vec<T> p = fast_exp(Vec<T>::loadu(row + c) - shift_vec);
    p.store(row + c);
    total = total + p;
  }
  return total;
}

template <typename T>
T reduce_sum(const Vec<T>& lanes) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, lanes);
}

// Two independent chains: the row maxima are latency-, not throughput-bound. NaN
// may be skipped here (clamp_min is a plain max): fast_exp carries it into the sums.
template <typename T>
T max_row(const T* row, int64_t width) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> even(-std::numeric_limits<T>::infinity()), odd = even;
  int64_t c = 0;
  for (; c + 2 * L <= width; c += 2 * L) {
    even = at::vec::clamp_min(even, Vec<T>::loadu(row + c));
    odd = at::vec::clamp_min(odd, Vec<T>::loadu(row + c + L));
  }
  if (c < width) even = at::vec::clamp_min(even, Vec<T>::loadu(row + c));
  return at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return at::vec::clamp_min(x, y); },
                                    at::vec::clamp_min(even, odd));
}

// Online softmax over one logit tile: new row maxima, the correction factors of what
// was accumulated under the old ones (computed for all rows at once, as vectors),
// probabilities in place of the logits, and lane-wise running sums.
template <typename T>
void online_softmax_tile(T* logits, int64_t rows, int64_t width, T* row_max, T* correction, T* tile_max,
                         T* row_sums) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t r = 0; r < rows; ++r) tile_max[r] = max_row(logits + r * width, width);
  for (int64_t r = 0; r < rows; r += L) {
    const int64_t count = std::min(L, rows - r);
    const Vec<T> old_max = Vec<T>::loadu(row_max + r, count);
    const Vec<T> new_max = at::vec::maximum(old_max, Vec<T>::loadu(tile_max + r, count));
    fast_exp(old_max - new_max).store(correction + r, count);
    new_max.store(row_max + r, count);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Vec<T> tile_sum = exp_row(logits + r * width, width, row_max[r]);
    (Vec<T>::loadu(row_sums + r * L) * Vec<T>(correction[r]) + tile_sum).store(row_sums + r * L);
  }
}

template <typename T, int DEPTH>
void forward_kernel(const Shape& s, const T* query, const T* key, const T* value, const T* center,
                    const T* known_lse, T* out, T* lse, T scale) {
  const int64_t D = s.depth, E = s.width, N = s.queries, M = s.keys;
  const int64_t value_width = padded<T>(E), key_stride = row_stride<T>(M);
  const int64_t tile_width = padded<T>(std::min(kForwardKeyTile, M));
  const int64_t query_tiles = (N + kForwardQueryTile - 1) / kForwardQueryTile;
  // K^T (B, D, M padded), and V with vector-padded rows unless E is whole vectors,
  // packed once: every query tile of a batch element reads them
  const bool pad_values = value_width != E;
  Buffer<T> key_t(s.batch * D * key_stride), padded_values(pad_values ? s.batch * M * value_width : 0);
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      pack_transposed(key + b * M * D, M, D, key_t.data() + b * D * key_stride, key_stride);
      if (pad_values) pack_rows(value + b * M * E, M, E, padded_values.data() + b * M * value_width, value_width);
    }
  });
  const T* value_rows = pad_values ? padded_values.data() : value;
  at::parallel_for(0, s.batch * query_tiles, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Buffer<T> scaled_query(kForwardQueryTile * D);
    Buffer<T> logits(kForwardQueryTile * tile_width), acc(kForwardQueryTile * value_width);
    Buffer<T> row_max(kForwardQueryTile), correction(kForwardQueryTile), tile_max(kForwardQueryTile);
    Buffer<T> row_sums(kForwardQueryTile * Vec<T>::size());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / query_tiles, q0 = (item % query_tiles) * kForwardQueryTile;
      const int64_t rows = std::min(kForwardQueryTile, N - q0);
      const T* q = query + (b * N + q0) * D;
      for (int64_t i = 0; i < rows * D; ++i) scaled_query[i] = q[i] * scale;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
      std::fill(row_sums.begin(), row_sums.end(), T(0));
      for (int64_t k0 = 0; k0 < M; k0 += kForwardKeyTile) {
        const int64_t keys = std::min(kForwardKeyTile, M - k0), width = padded<T>(keys);
        matmul_tile<T, DEPTH>(rows, width, D, scaled_query.data(), D, 1, key_t.data() + b * D * key_stride + k0,
                              key_stride, logits.data(), width, false);
        mask_padding(logits.data(), rows, keys, width);
        if (known_lse) {
          for (int64_t r = 0; r < rows; ++r) exp_row(logits.data() + r * width, width, known_lse[b * N + q0 + r]);
        } else {
          online_softmax_tile(logits.data(), rows, width, row_max.data(), correction.data(), tile_max.data(),
                              row_sums.data());
          // running maxima changed: rescale what was accumulated under the old ones
          for (int64_t r = 0; r < rows; ++r) {
            T* acc_row = acc.data() + r * value_width;
            for (int64_t c = 0; c < value_width; c += Vec<T>::size())
              (Vec<T>::loadu(acc_row + c) * Vec<T>(correction[r])).store(acc_row + c);
          }
        }
        matmul_tile<T>(rows, value_width, keys, logits.data(), width, 1, value_rows + (b * M + k0) * value_width,
                       value_width, acc.data(), value_width, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = b * N + q0 + r;
        const T row_sum = known_lse ? T(1) : reduce_sum(Vec<T>::loadu(row_sums.data() + r * Vec<T>::size()));
        const T inverse = T(1) / row_sum;
        for (int64_t e = 0; e < E; ++e)
          out[i * E + e] = acc[r * value_width + e] * inverse - (center ? center[i * E + e] : T(0));
        if (!known_lse) lse[i] = row_max[r] + std::log(row_sum);
      }
    }
  });
}

template <typename T, int DEPTH>
void backward_kernel(const Shape& s, const T* grad_out, const T* query, const T* key, const T* value,
                     const T* center, const T* out, const T* lse, T* grad_query, T* grad_key, T* grad_value,
                     T scale) {
  const int64_t D = s.depth, E = s.width, N = s.queries, M = s.keys;
  const int64_t key_stride = row_stride<T>(M), depth_width = padded<T>(D);
  const int64_t tile_width = padded<T>(std::min(kBackwardKeyTile, M));
  const int64_t query_tiles = (N + kBackwardQueryTile - 1) / kBackwardQueryTile;
  const int64_t wanted_groups = std::max<int64_t>(1, (kMinWorkItems + s.batch - 1) / std::max<int64_t>(1, s.batch));
  const int64_t tiles_per_group = std::max<int64_t>(1, (query_tiles + wanted_groups - 1) / wanted_groups);
  const int64_t groups = std::max<int64_t>(1, (query_tiles + tiles_per_group - 1) / tiles_per_group);
  const int64_t group_rows = tiles_per_group * kBackwardQueryTile;
  // dQ += dS K: for D = 8 in 16-lane vectors contracted along the keys (matmul_lanes_8)
  constexpr bool kLaneGradQuery = DEPTH == 8 && Vec<T>::size() == 16;
  const int64_t grad_q_width = kLaneGradQuery ? D : depth_width;
  // (B, groups, D + E, M padded): each group's dK^T and dV^T
  Buffer<T> partial(s.batch * groups * (D + E) * key_stride);

  at::parallel_for(0, s.batch * groups, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Buffer<T> scaled_query(group_rows * D), delta(group_rows), grad_q(group_rows * grad_q_width);
    Buffer<T> key_t(D * tile_width), value_t(E * tile_width), key_rows(tile_width * depth_width);
    Buffer<T> probs(kBackwardQueryTile * tile_width), grad_logits(kBackwardQueryTile * tile_width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, r0 = (item % groups) * group_rows;
      const int64_t rows_in_group = std::min(group_rows, N - r0);
      const int64_t first = b * N + r0;  // global index of the group's first row
      for (int64_t i = 0; i < rows_in_group * D; ++i) scaled_query[i] = query[first * D + i] * scale;
      // delta_i = sum_j p_ij dp_ij = dO_i . aggregate_i (FlashAttention-2's preprocessing)
      for (int64_t r = 0; r < rows_in_group; ++r) {
        T total = 0;
        for (int64_t e = 0; e < E; ++e) {
          const int64_t at = (first + r) * E + e;
          total += grad_out[at] * (out[at] + (center ? center[at] : T(0)));
        }
        delta[r] = total;
      }
      std::fill(grad_q.begin(), grad_q.end(), T(0));
      T* grad_key_t = partial.data() + item * (D + E) * key_stride;
      T* grad_value_t = grad_key_t + D * key_stride;
      for (int64_t k0 = 0; k0 < M; k0 += kBackwardKeyTile) {
        const int64_t keys = std::min(kBackwardKeyTile, M - k0), width = padded<T>(keys);
        pack_transposed(key + (b * M + k0) * D, keys, D, key_t.data(), width);
        pack_transposed(value + (b * M + k0) * E, keys, E, value_t.data(), width);
        if (!kLaneGradQuery) pack_rows(key + (b * M + k0) * D, keys, D, key_rows.data(), depth_width);
        for (int64_t q0 = 0; q0 < rows_in_group; q0 += kBackwardQueryTile) {
          const int64_t rows = std::min(kBackwardQueryTile, rows_in_group - q0);
          const T* query_tile = scaled_query.data() + q0 * D;
          const T* grad_out_tile = grad_out + (first + q0) * E;
          matmul_tile<T, DEPTH>(rows, width, D, query_tile, D, 1, key_t.data(), width, probs.data(), width,
                                false);
          mask_padding(probs.data(), rows, keys, width);
          matmul_tile<T>(rows, width, E, grad_out_tile, E, 1, value_t.data(), width, grad_logits.data(), width,
                         false);
          for (int64_t r = 0; r < rows; ++r) {
            T* p_row = probs.data() + r * width;
            T* ds_row = grad_logits.data() + r * width;
            const Vec<T> shift(lse[first + q0 + r]), row_delta(delta[q0 + r]);
            for (int64_t c = 0; c < width; c += Vec<T>::size()) {
              const Vec<T> p = fast_exp(Vec<T>::loadu(p_row + c) - shift);
              p.store(p_row + c);
              (p * (Vec<T>::loadu(ds_row + c) - row_delta)).store(ds_row + c);
            }
          }
          matmul_tile<T>(E, width, rows, grad_out_tile, 1, E, probs.data(), width, grad_value_t + k0, key_stride,
                         true);
          matmul_tile<T>(D, width, rows, query_tile, 1, D, grad_logits.data(), width, grad_key_t + k0, key_stride,
                         true);
          if constexpr (kLaneGradQuery) {
            matmul_lanes_8(rows, width, grad_logits.data(), width, key_t.data(), width,
                           grad_q.data() + q0 * grad_q_width);
          } else {
            matmul_tile<T>(rows, depth_width, keys, grad_logits.data(), width, 1, key_rows.data(), depth_width,
                           grad_q.data() + q0 * grad_q_width, depth_width, true);
          }
        }
      }
      for (int64_t r = 0; r < rows_in_group; ++r)
        for (int64_t d = 0; d < D; ++d) {
          const T* sum = grad_q.data() + r * grad_q_width;
          grad_query[(first + r) * D + d] = scale * sum[d];
        }
    }
  });

  // sum the groups in order and transpose back: (D + E, M) -> (M, D), (M, E)
  at::parallel_for(0, s.batch * (D + E), 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Buffer<T> total(M);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (D + E), channel = item % (D + E);
      std::fill(total.begin(), total.end(), T(0));
      for (int64_t g = 0; g < groups; ++g) {
        const T* part = partial.data() + ((b * groups + g) * (D + E) + channel) * key_stride;
        for (int64_t j = 0; j < M; ++j) total[j] += part[j];
      }
      T* target = channel < D ? grad_key + b * M * D + channel : grad_value + b * M * E + (channel - D);
      const int64_t stride = channel < D ? D : E;
      for (int64_t j = 0; j < M; ++j) target[j * stride] = total[j];
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> softmax_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                           const OptionalTensor& center, const OptionalTensor& log_normalizer,
                                           double scale) {
  check_operands(query, key, value, center);
  const int64_t B = query.size(0), N = query.size(1);
  if (log_normalizer) check_like("log_normalizer", *log_normalizer, {B, N}, query.scalar_type());
  Tensor out = at::empty({B, N, value.size(2)}, value.options());
  Tensor lse = log_normalizer ? *log_normalizer : at::empty({B, N}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_cpp::softmax_forward", [&] {
    const Shape shape{B, N, key.size(1), query.size(2), value.size(2)};
    with_depth(shape.depth, [&](auto depth) {
      forward_kernel<scalar_t, decltype(depth)::value>(
          shape, query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
          value.const_data_ptr<scalar_t>(), center ? center->const_data_ptr<scalar_t>() : nullptr,
          log_normalizer ? log_normalizer->const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
          log_normalizer ? nullptr : lse.data_ptr<scalar_t>(), static_cast<scalar_t>(scale));
    });
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> softmax_backward(const Tensor& grad_out, const Tensor& query,
                                                    const Tensor& key, const Tensor& value,
                                                    const OptionalTensor& center, const Tensor& out,
                                                    const Tensor& log_normalizer, double scale) {
  check_operands(query, key, value, center);
  const int64_t B = query.size(0), N = query.size(1), E = value.size(2);
  check_like("grad_out", grad_out, {B, N, E}, query.scalar_type());
  check_like("out", out, {B, N, E}, query.scalar_type());
  check_like("log_normalizer", log_normalizer, {B, N}, query.scalar_type());
  Tensor grad_query = at::empty_like(query), grad_key = at::empty_like(key), grad_value = at::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_cpp::softmax_backward", [&] {
    const Shape shape{B, N, key.size(1), query.size(2), E};
    with_depth(shape.depth, [&](auto depth) {
      backward_kernel<scalar_t, decltype(depth)::value>(
          shape, grad_out.const_data_ptr<scalar_t>(), query.const_data_ptr<scalar_t>(),
          key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
          center ? center->const_data_ptr<scalar_t>() : nullptr, out.const_data_ptr<scalar_t>(),
          log_normalizer.const_data_ptr<scalar_t>(), grad_query.data_ptr<scalar_t>(),
          grad_key.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), static_cast<scalar_t>(scale));
    });
  });
  return {grad_query, grad_key, grad_value};
}

}  // namespace fastnl
