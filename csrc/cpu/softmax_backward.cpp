// The softmax kernel's backward (the forward is softmax_forward.cpp): the tiles of the
// forward recomputed from the row log-sum-exp, no N x M buffer.
//
// Backward: one work item per (batch, query group) walks the key tiles once and
// accumulates dQ for its rows and dK^T, dV^T for all keys: with one group a batch
// (B >= 16) it writes its batch's dK, dV itself; else into its own slot of a
// (B, groups, D + E, M) buffer, summed afterwards in group order. The grouping
// depends on the shape only, so results are bitwise identical for any thread count.
// Two more backwards serve K blocks that share one affinity (a stage): dV alone
// (softmax_values_backward: no dP, dS, dQ, dK), and dQ, dK of all K with the first
// block's dV (softmax_shared_backward). dS = P (dP - delta) is linear in dP and delta,
// so the blocks' sums of them make one dS: the blocks' dO and V side by side (K E wide)
// in the dP product, their deltas summed. The affinity's products and exps then run
// once for the K blocks, not K times.
// Every work item runs with denormals flushed to zero (tile_math.h, FlushDenormals).
// The operands are float32, float64 or, built with AVX512-BF16, bfloat16: tile_math.h's
// Product says how the products read them; logits, P, dS, statistics and accumulators
// are then float32, P and dS rounded to bf16 only as the next product's operand. A
// bf16 product reads its A operand in pairs of k, so the operands a product contracts
// over their rows (V, dO, Q) are packed once (pack_contracted_rows), where float
// products read them in place through strides.
#include "ops.h"
#include "softmax_tiles.h"
#include "tile_math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastnl {
namespace {

// Padded key columns (keys..columns) of a logit tile must get zero probability.
template <typename T>
void mask_padding(T* logits, int64_t rows, int64_t keys, int64_t columns) {
  for (int64_t r = 0; r < rows; ++r)
    std::fill(logits + r * columns + keys, logits + (r + 1) * columns, -std::numeric_limits<T>::infinity());
}

// dK (M, D) and dV (M, E) of one batch from its summed dK^T, dV^T (D + E rows,
// key_stride apart; dK^T not yet scaled where SCALE, the query having gone in unscaled):
// transposed back through `rows` (M, D + E) and converted. D = 0: dV alone.
template <bool SCALE, typename T, typename A>
void write_key_grads(A* total, int64_t key_stride, int64_t M, int64_t D, int64_t E, A scale, Buffer<A>& rows,
                     T* grad_key, T* grad_value) {
  if constexpr (SCALE)
    for (int64_t i = 0; i < D * key_stride; ++i) total[i] *= scale;
  at::vec::transpose_mxn<A>(total, key_stride, rows.data(), D + E, D + E, M);
  for (int64_t j = 0; j < M; ++j) {
    if (D) at::vec::convert(rows.data() + j * (D + E), grad_key + j * D, D);
    at::vec::convert(rows.data() + j * (D + E) + D, grad_value + j * E, E);
  }
}

// The per-query and per-key operands of the blocks sharing one affinity, K of each, all
// E wide (s.width_v); centers null or K (each may be null).
template <typename T>
struct Blocks {
  int64_t count;
  const T* const* grad_out;
  const T* const* value;
  const T* const* center;
  const T* const* out;
};

// AFFINITY: dQ, dK of all blocks and the first block's dV; else the first block's dV
// alone (values, centers, outs unread, grad_query, grad_key unwritten).
template <typename T, int DEPTH, bool AFFINITY, typename A = Acc<T>>
void backward_kernel(const Shape& s, const Blocks<T>& blocks, const T* query, const T* key, const A* log_normalizer,
                     T* grad_query, T* grad_key, T* grad_value, A scale) {
  constexpr int64_t G = Product<T>::kGroup;
  constexpr bool kScale = Product<T>::kScalesLogits;
  const int64_t D = s.width_qk, E = s.width_v, N = s.queries, M = s.keys;
  const T* grad_out = blocks.grad_out[0];
  // dP = sum over the blocks of dO V^T: the blocks side by side, K E wide (copied per
  // group and key tile where K > 1)
  const int64_t K = blocks.count, joined = K * E;
  // the per-key gradients, transposed: dK^T (AFFINITY) then dV^T, rows key_stride apart
  const int64_t key_grad_rows_d = AFFINITY ? D : 0, key_grad_width = key_grad_rows_d + E;
  const int64_t key_stride = row_stride<A>(M), padded_d = padded<A>(D);
  const bool amx = amx_products<T>(D, E);
  const int64_t tile_queries = G > 1 ? kBfloat16BackwardQueryTile : kBackwardQueryTile;
  const int64_t tile_keys = G > 1 ? kBfloat16BackwardKeyTile : kBackwardKeyTile;
  const int64_t tile_columns = padded<A>(std::min(tile_keys, M));
  const int64_t query_tiles = (N + tile_queries - 1) / tile_queries;
  const int64_t wanted_groups = std::max<int64_t>(1, (kMinWorkItems + s.batch - 1) / std::max<int64_t>(1, s.batch));
  const int64_t tiles_per_group = std::max<int64_t>(1, (query_tiles + wanted_groups - 1) / wanted_groups);
  const int64_t groups = std::max<int64_t>(1, (query_tiles + tiles_per_group - 1) / tiles_per_group);
  const int64_t group_rows = tiles_per_group * tile_queries;
  // dQ += dS K: for D = 8 in 16-lane vectors of floats contracted along the keys (matmul_lanes_8)
  constexpr bool kLaneGradQuery = DEPTH == 8 && G == 1 && Vec<A>::size() == 16;
  const int64_t grad_q_stride = kLaneGradQuery ? D : padded_d;
  // one group a batch (B >= kMinWorkItems): each work item writes its batch's dK, dV at
  // its end, from its own dK^T, dV^T still in cache; else each group's go to its slot of
  // partial (B, groups, D + E, M padded), summed afterwards in group order
  const bool own_keys = groups == 1;
  // bf16: the A operands Q^T, dO^T of dK^T += Q^T dS, dV^T += dO^T P (floats read Q, dO in place)
  const Strides query_strides = contracted_rows_strides<T>(amx, D, group_rows);
  const Strides grad_out_strides = contracted_rows_strides<T>(amx, E, group_rows);
  Buffer<A> partial(own_keys ? 0 : s.batch * groups * key_grad_width * key_stride);
  // the sizes of what only the affinity's gradients use
  const auto affinity_only = [](int64_t size) { return AFFINITY ? size : 0; };

  at::parallel_for(0, s.batch * groups, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    const ReleaseTiles release(amx);
    // the group's query rows as q.k reads them (scaled unless kScale), and for bf16 Q^T
    // and dO^T, the row-major A of dK^T += Q^T dS, dV^T += dO^T P (floats: strides)
    Buffer<T> scaled_query(kScale ? 0 : group_rows * D);
    Buffer<A> own_key_grads(own_keys ? key_grad_width * key_stride : 0);
    Buffer<A> key_grad_rows(own_keys ? M * key_grad_width : 0);
    Buffer<A> aggregate(affinity_only(group_rows * E)), grad_out_rows(affinity_only(group_rows * E));
    Buffer<A> center_rows(blocks.center ? affinity_only(group_rows * E) : 0);
    Buffer<T> query_t(G > 1 ? affinity_only(D * group_rows) : 0), grad_out_t(G > 1 ? E * group_rows : 0);
    Buffer<A> delta(affinity_only(group_rows)), grad_q(affinity_only(group_rows * grad_q_stride));
    Buffer<T> key_t(round_up(D, G) * tile_columns), value_t(affinity_only(round_up(joined, G) * tile_columns));
    Buffer<T> joined_grad_out(K > 1 ? affinity_only(group_rows * joined) : 0);
    Buffer<T> joined_values(K > 1 ? affinity_only(tile_columns * joined) : 0);
    // dQ's K rows, off the lane path
    Buffer<T> key_rows(kLaneGradQuery ? 0 : affinity_only(tile_columns * padded_d));
    Buffer<A> probs(tile_queries * tile_columns), grad_logits(affinity_only(tile_queries * tile_columns));
    // bf16: P and dS in row pairs, and dS rounded in place of its rows for dQ
    Buffer<T> probs_groups(G > 1 ? tile_queries * tile_columns : 0);
    Buffer<T> grad_logits_groups(affinity_only(probs_groups.size()));
    Buffer<T> grad_logits_rounded(affinity_only(probs_groups.size()));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, r0 = (item % groups) * group_rows;
      const int64_t rows_in_group = std::min(group_rows, N - r0);
      const int64_t first = b * N + r0;          // global index of the group's first row
      const T* group_query = query + first * D;  // kScale: the query as it is
      if constexpr (!kScale) {
        for (int64_t i = 0; i < rows_in_group * D; ++i) scaled_query[i] = query[first * D + i] * scale;
        group_query = scaled_query.data();
      }
      if constexpr (G > 1) {
        if constexpr (AFFINITY) pack_contracted_rows(amx, group_query, rows_in_group, D, query_t.data(), group_rows);
        pack_contracted_rows(amx, grad_out + first * E, rows_in_group, E, grad_out_t.data(), group_rows);
      }
      // dP's A operand: the group's dO rows, the blocks' side by side
      const T* group_grad_out = grad_out + first * E;
      if constexpr (AFFINITY) {
        if (K > 1) {
          for (int64_t r = 0; r < rows_in_group; ++r)
            for (int64_t k = 0; k < K; ++k)
              std::copy_n(blocks.grad_out[k] + (first + r) * E, E, joined_grad_out.data() + r * joined + k * E);
          group_grad_out = joined_grad_out.data();
        }
        // delta_i = sum_j p_ij dp_ij = dO_i . aggregate_i (FlashAttention-2's preprocessing),
        // on float copies of the rows, in vectors along e; summed over the blocks
        std::fill(delta.begin(), delta.end(), A(0));
        const int64_t values = rows_in_group * E;
        for (int64_t k = 0; k < K; ++k) {
          const T* center = blocks.center ? blocks.center[k] : nullptr;
          at::vec::convert(blocks.grad_out[k] + first * E, grad_out_rows.data(), values);
          at::vec::convert(blocks.out[k] + first * E, aggregate.data(), values);
          if (center) {
            at::vec::convert(center + first * E, center_rows.data(), values);
            for (int64_t i = 0; i < values; ++i) aggregate[i] += center_rows[i];
          }
          for (int64_t r = 0; r < rows_in_group; ++r)
            delta[r] += at::vec::map2_reduce_all<A>([](const Vec<A>& x, const Vec<A>& y) { return x * y; },
                                                    [](const Vec<A>& x, const Vec<A>& y) { return x + y; },
                                                    grad_out_rows.data() + r * E, aggregate.data() + r * E, E);
        }
        std::fill(grad_q.begin(), grad_q.end(), A(0));
      }
      if (own_keys) std::fill(own_key_grads.begin(), own_key_grads.end(), A(0));
      A* grad_key_t = own_keys ? own_key_grads.data() : partial.data() + item * key_grad_width * key_stride;
      A* grad_value_t = grad_key_t + key_grad_rows_d * key_stride;
      for (int64_t k0 = 0; k0 < M; k0 += tile_keys) {
        const int64_t keys = std::min(tile_keys, M - k0), columns = padded<A>(keys);
        pack_transposed(key + (b * M + k0) * D, keys, D, key_t.data(), columns);
        if constexpr (AFFINITY) {
          const T* tile_values = blocks.value[0] + (b * M + k0) * E;
          if (K > 1) {
            for (int64_t j = 0; j < keys; ++j)
              for (int64_t k = 0; k < K; ++k)
                std::copy_n(blocks.value[k] + (b * M + k0 + j) * E, E, joined_values.data() + j * joined + k * E);
            tile_values = joined_values.data();
          }
          pack_transposed(tile_values, keys, joined, value_t.data(), columns);
          if (!kLaneGradQuery) pack_rows(key + (b * M + k0) * D, keys, D, key_rows.data(), padded_d);
        }
        for (int64_t q0 = 0; q0 < rows_in_group; q0 += tile_queries) {
          const int64_t rows = std::min(tile_queries, rows_in_group - q0);
          const T* query_tile = group_query + q0 * D;
          const T* grad_out_tile = grad_out + (first + q0) * E;
          const T* joined_grad_out_tile = group_grad_out + q0 * joined;
          matmul_rows<T, DEPTH>(amx, rows, columns, D, query_tile, D, G, key_t.data(), columns, probs.data(), columns,
                                false);
          mask_padding(probs.data(), rows, keys, columns);
          if constexpr (AFFINITY) {
            if (joined == DEPTH) {  // the models' E = D: dP at a compile-time depth too
              matmul_rows<T, DEPTH>(amx, rows, columns, joined, joined_grad_out_tile, joined, G, value_t.data(),
                                    columns, grad_logits.data(), columns, false);
            } else {
              matmul_rows<T>(amx, rows, columns, joined, joined_grad_out_tile, joined, G, value_t.data(), columns,
                             grad_logits.data(), columns, false);
            }
          }
          const Vec<A> exp_scale_v = exp_scale<kScale>(scale);
          const A* row_log_normalizer = log_normalizer + first + q0;
          const A* row_delta = AFFINITY ? delta.data() + q0 : nullptr;
          // the exp(scaled logit - log_normalizer) of row r
          const auto row_exp = [&](int64_t r) { return ShiftedExp<A>(exp_scale_v, Vec<A>(row_log_normalizer[r])); };
          // p = exp(scaled logit - log_normalizer) and (AFFINITY) dS = p (dP - delta) at
          // `at` of the tile, for the row whose exp and delta are `exp` and `row_delta_v`
          const auto p_and_ds = [&](int64_t at, const ShiftedExp<A>& exp, const Vec<A>& row_delta_v) {
            const Vec<A> p = exp(Vec<A>::loadu(probs.data() + at));
            if constexpr (AFFINITY) return std::pair{p, p * (Vec<A>::loadu(grad_logits.data() + at) - row_delta_v)};
            return std::pair{p, Vec<A>(A(0))};
          };
          if constexpr (G > 1) {
            // two rows at a time, P and dS straight to bf16 as the products read them: in row
            // pairs (dV^T += dO^T P, dK^T += Q^T dS) and dS in rows (dQ += dS K); the float32
            // values are never stored. A missing last row is a zero half of its pairs.
            for (int64_t r = 0; r < rows; r += 2) {
              const bool paired = r + 1 < rows;
              const int64_t partner = paired ? r + 1 : r;
              const ShiftedExp<A> exp_r = row_exp(r), partner_exp = row_exp(partner);
              const Vec<A> delta_r(AFFINITY ? row_delta[r] : A(0)), partner_delta(AFFINITY ? row_delta[partner] : A(0));
              for (int64_t c = 0; c < columns; c += Vec<A>::size()) {
                const int64_t at = r * columns + c, partner_at = partner * columns + c;
                const auto [p, ds] = p_and_ds(at, exp_r, delta_r);
                Vec<A> partner_p(A(0)), partner_ds(A(0));
                if (paired) std::tie(partner_p, partner_ds) = p_and_ds(partner_at, partner_exp, partner_delta);
                Product<T>::store_pairs(p, partner_p, probs_groups.data() + r * columns + 2 * c);
                if constexpr (AFFINITY) {
                  if (paired) Product<T>::store_rounded(partner_ds, grad_logits_rounded.data() + partner_at);
                  Product<T>::store_pairs(ds, partner_ds, grad_logits_groups.data() + r * columns + 2 * c);
                  Product<T>::store_rounded(ds, grad_logits_rounded.data() + at);
                }
              }
            }
            matmul_rows<T>(amx, E, columns, rows, grad_out_t.data() + q0 / G * grad_out_strides.col,
                           grad_out_strides.row, grad_out_strides.col, probs_groups.data(), columns, grad_value_t + k0,
                           key_stride, true);
            if constexpr (AFFINITY) {
              matmul_rows<T>(amx, D, columns, rows, query_t.data() + q0 / G * query_strides.col, query_strides.row,
                             query_strides.col, grad_logits_groups.data(), columns, grad_key_t + k0, key_stride, true);
              matmul_rows<T>(amx, rows, padded_d, keys, grad_logits_rounded.data(), columns, G, key_rows.data(),
                             padded_d, grad_q.data() + q0 * grad_q_stride, padded_d, true);
            }
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              const ShiftedExp<A> exp_r = row_exp(r);
              const Vec<A> delta_r(AFFINITY ? row_delta[r] : A(0));
              for (int64_t c = 0; c < columns; c += Vec<A>::size()) {
                const auto [p, ds] = p_and_ds(r * columns + c, exp_r, delta_r);
                p.store(probs.data() + r * columns + c);
                if constexpr (AFFINITY) ds.store(grad_logits.data() + r * columns + c);
              }
            }
            matmul_tile<T>(E, columns, rows, grad_out_tile, 1, E, probs.data(), columns, grad_value_t + k0, key_stride,
                           true);
            if constexpr (AFFINITY) {
              matmul_tile<T>(D, columns, rows, query_tile, 1, D, grad_logits.data(), columns, grad_key_t + k0,
                             key_stride, true);
              if constexpr (kLaneGradQuery) {
                matmul_lanes_8(rows, columns, grad_logits.data(), columns, key_t.data(), columns,
                               grad_q.data() + q0 * grad_q_stride);
              } else {
                matmul_tile<T>(rows, padded_d, keys, grad_logits.data(), columns, 1, key_rows.data(), padded_d,
                               grad_q.data() + q0 * grad_q_stride, padded_d, true);
              }
            }
          }
        }
      }
      if constexpr (AFFINITY)
        for (int64_t r = 0; r < rows_in_group; ++r) {
          A* sum = grad_q.data() + r * grad_q_stride;
          for (int64_t d = 0; d < D; ++d) sum[d] *= scale;
          at::vec::convert(sum, grad_query + (first + r) * D, D);
        }
      if (own_keys)
        write_key_grads<kScale>(own_key_grads.data(), key_stride, M, key_grad_rows_d, E, scale, key_grad_rows,
                                grad_key + b * M * key_grad_rows_d, grad_value + b * M * E);
    }
  });

  if (own_keys) return;
  // sum the groups in order, then dK, dV as above, one batch a work item
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    const int64_t size = key_grad_width * key_stride;
    Buffer<A> total(size), rows(M * key_grad_width);
    for (int64_t b = begin; b < end; ++b) {
      const A* part = partial.data() + b * groups * size;
      std::copy(part, part + size, total.begin());
      for (int64_t g = 1; g < groups; ++g)
        for (int64_t i = 0; i < size; ++i) total[i] += part[g * size + i];
      write_key_grads<kScale>(total.data(), key_stride, M, key_grad_rows_d, E, scale, rows,
                              grad_key + b * M * key_grad_rows_d, grad_value + b * M * E);
    }
  });
}

}  // namespace

namespace {

// dQ, dK of the K blocks sharing one affinity (all K when `affinity`) and the first
// block's dV, each block's operands checked.
Tensor backward_into(bool affinity, at::TensorList grad_outs, const Tensor& query, const Tensor& key,
                     at::TensorList values, at::TensorList centers, at::TensorList outs, const Tensor& log_normalizer,
                     double scale, Tensor* grad_query, Tensor* grad_key) {
  const int64_t K = grad_outs.size();
  TORCH_CHECK(K >= 1, "grad_outs must hold at least one block's gradient");
  TORCH_CHECK(grad_outs[0].dim() == 3, "grad_out must be (B, N, E), got shape ", grad_outs[0].sizes());
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), E = grad_outs[0].size(2);
  const auto dtype = query.scalar_type();
  if (affinity) {
    TORCH_CHECK(values.size() == K && outs.size() == K && (centers.empty() || centers.size() == K),
                "one value, out (and center, if any) per grad_out: got ", K, " grad_outs, ", values.size(), " values, ",
                outs.size(), " outs, ", centers.size(), " centers");
    for (int64_t k = 0; k < K; ++k) {
      check_operands(query, key, values[k], centers.empty() ? OptionalTensor() : OptionalTensor(centers[k]),
                     bfloat16_native());
      check_like("value", values[k], {B, M, E}, dtype);
      check_like("out", outs[k], {B, N, E}, dtype);
    }
  } else {
    check_operands(query, key, key, std::nullopt, bfloat16_native());  // the value's checks are the key's own
  }
  for (const Tensor& grad_out : grad_outs) check_like("grad_out", grad_out, {B, N, E}, dtype);
  check_like("log_normalizer", log_normalizer, {B, N}, accumulate_type(dtype));
  Tensor grad_value = at::empty({B, M, E}, grad_outs[0].options());
  if (affinity) *grad_query = at::empty_like(query), *grad_key = at::empty_like(key);
  FASTNL_DISPATCH_OPERANDS(dtype, "fastnl_cpp::softmax_backward", [&] {
    using A = Acc<scalar_t>;
    const auto pointers = [](at::TensorList tensors) {
      std::vector<const scalar_t*> list;
      for (const Tensor& t : tensors) list.push_back(t.const_data_ptr<scalar_t>());
      return list;
    };
    const auto grad_out_data = pointers(grad_outs), value_data = pointers(values), center_data = pointers(centers);
    const auto out_data = pointers(outs);
    const Blocks<scalar_t> blocks{K, grad_out_data.data(), value_data.data(),
                                  centers.empty() ? nullptr : center_data.data(), out_data.data()};
    const Shape shape{B, N, M, query.size(2), E};
    with_depth(shape.width_qk, [&](auto depth) {
      const auto run = [&](auto with_affinity) {
        backward_kernel<scalar_t, decltype(depth)::value, decltype(with_affinity)::value>(
            shape, blocks, query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
            log_normalizer.const_data_ptr<A>(), affinity ? grad_query->data_ptr<scalar_t>() : nullptr,
            affinity ? grad_key->data_ptr<scalar_t>() : nullptr, grad_value.data_ptr<scalar_t>(),
            static_cast<A>(scale));
      };
      if (affinity) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  return grad_value;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> softmax_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                    const Tensor& value, const OptionalTensor& center,
                                                    const Tensor& out, const Tensor& log_normalizer, double scale) {
  Tensor grad_query, grad_key;
  std::vector<Tensor> centers;
  if (center) centers.push_back(*center);
  Tensor grad_value =
      backward_into(true, grad_out, query, key, value, centers, out, log_normalizer, scale, &grad_query, &grad_key);
  return {grad_query, grad_key, grad_value};
}

std::tuple<Tensor, Tensor, Tensor> softmax_shared_backward(at::TensorList grad_outs, const Tensor& query,
                                                           const Tensor& key, at::TensorList values,
                                                           at::TensorList centers, at::TensorList outs,
                                                           const Tensor& log_normalizer, double scale) {
  Tensor grad_query, grad_key;
  Tensor grad_value =
      backward_into(true, grad_outs, query, key, values, centers, outs, log_normalizer, scale, &grad_query, &grad_key);
  return {grad_query, grad_key, grad_value};
}

Tensor softmax_values_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                               const Tensor& log_normalizer, double scale) {
  return backward_into(false, grad_out, query, key, {}, {}, {}, log_normalizer, scale, nullptr, nullptr);
}

}  // namespace fastnl
