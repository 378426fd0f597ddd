// The softmax kernel's forward, flash style: query tiles x key tiles, online softmax,
// only the row log-sum-exp kept for the backward (softmax_backward.cpp), which
// recomputes the tiles; no N x M buffer.
//
// One work item per (batch, query tile) owns its queries' running max, sum and output
// accumulator across all key tiles, with the queries along the vector lanes: logits^T
// (keys, Q) and accumulator^T (E, Q). Both products then run on whole register blocks
// (q.k reads K's rows in place, p v reads V's), the statistics are per-lane vector
// operations with no horizontal reductions, and nothing but the query tile is packed.
// The q.k product takes each tile's column maxima block by block while they are in L1
// (logits_and_maxima), so the online softmax reads the tile once. With a known
// log_normalizer (a stage's later blocks) it is a single pass without rescaling.
// Every work item runs with denormals flushed to zero (tile_math.h, FlushDenormals).
// The operands are float32, float64 or, built with AVX512-BF16, bfloat16 (tile_math.h's
// Product): logits, sums and accumulators are float32, P rounded to bf16 only as the
// p v product's operand, V packed once a batch for it (pack_contracted_rows).
#include "ops.h"
#include "softmax_tiles.h"
#include "tile_math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

namespace fastnl {
namespace {

// A logit vector as the softmax sees it: scaled here when the operands left it out.
template <bool SCALE, typename A>
inline Vec<A> load_logits(const A* at, const Vec<A>& scale) {
  if constexpr (SCALE) {
    return Vec<A>::loadu(at) * scale;
  } else {
    return Vec<A>::loadu(at);
  }
}

// Where a softmax pass leaves the probabilities p[0..G) of rows j..j+G-1 of a logits^T
// tile, lanes v * L on (at_logits, at_pairs): floats in place of the logits, bf16 straight
// into the row pairs p v reads, so the float32 tile is not read again.
template <typename Op, typename A>
inline void store_probabilities(const Vec<A>* p, A* at_logits, Op* at_pairs) {
  if constexpr (Product<Op>::kGroup > 1) {
    Product<Op>::store_pairs(p[0], p[1], at_pairs);
  } else {
    p[0].store(at_logits);
  }
}

// The probabilities of rows j..j+G-1 (a row past `keys` is zero), lanes v * L:
// exp(scaled logit - shift), stored where p v reads them; returns them to be summed.
template <int64_t Q, typename Op, typename A, int64_t G = Product<Op>::kGroup>
inline std::array<Vec<A>, G> probabilities(A* logits, Op* pairs, int64_t keys, int64_t j, int v,
                                           const ShiftedExp<A>& exp) {
  constexpr int64_t L = Vec<A>::size();
  std::array<Vec<A>, G> p;
  for (int64_t g = 0; g < G; ++g) p[g] = j + g < keys ? exp(Vec<A>::loadu(logits + (j + g) * Q + v * L)) : Vec<A>(A(0));
  store_probabilities(p.data(), logits + j * Q + v * L, pairs + j * Q + G * v * L);
  return p;
}

// The column maxima of C's rows (each ROWS x VECS vectors, just stored: in L1), folded in.
template <typename A, int ROWS, int VECS>
inline void fold_maxima(const A* c, int64_t ldc, Vec<A> (&maxima)[VECS]) {
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v)
      maxima[v] = at::vec::clamp_min(maxima[v], Vec<A>::loadu(c + r * ldc + v * Vec<A>::size()));
}

// The logits^T tile (keys, Q) = K Q^T of the forward and its column maxima (tile_max, Q):
// matmul_tile's register blocks (Q is whole wide blocks), each block's maxima taken
// while it is in L1, where a pass over the whole tile from L2 cost the forward 4-11%.
// AMX: one brgemm, then that pass.
template <typename T, int DEPTH, int64_t Q, typename A = Acc<T>>
void logits_and_maxima(bool amx, int64_t keys, int64_t D, const T* key_tile, const T* query_t, A* logits, A* tile_max) {
  constexpr int64_t L = Vec<A>::size(), G = Product<T>::kGroup, V = kWideVecs;
  if (amx) matmul_rows<T, DEPTH>(amx, keys, Q, D, key_tile, D, G, query_t, Q, logits, Q, false);
  for (int64_t column = 0; column < Q; column += V * L) {
    Vec<A> maxima[V];
    for (int v = 0; v < V; ++v) maxima[v] = Vec<A>(-std::numeric_limits<A>::infinity());
    const T* b = query_t + column * G;
    A* c = logits + column;
    int64_t j = 0;
    if (!amx) {
      for (; j + kWideRows <= keys; j += kWideRows) {
        product_block<T, kWideRows, V, DEPTH>(key_tile + j * D, D, G, b, Q, c + j * Q, Q, D, false);
        fold_maxima<A, kWideRows>(c + j * Q, Q, maxima);
      }
    }
    for (; j < keys; ++j) {
      if (!amx) product_block<T, 1, V, DEPTH>(key_tile + j * D, D, G, b, Q, c + j * Q, Q, D, false);
      fold_maxima<A, 1>(c + j * Q, Q, maxima);
    }
    for (int v = 0; v < V; ++v) maxima[v].store(tile_max + column + v * L);
  }
}

// Online softmax over one logits^T tile (keys rows, Q columns) whose column maxima the
// product left in tile_max (unscaled where SCALE; scale >= 0, so scaling keeps them
// maxima): new column maxima, the correction factors of what was accumulated under the
// old ones, probabilities where p v reads them (store_probabilities), running sums. NaN
// may be skipped by the maxima (clamp_min is a plain max): fast_exp carries it into the
// sums, so a NaN logit makes its query NaN.
template <bool SCALE, int64_t Q, typename Op, typename T>
void online_softmax_columns(T* logits, Op* pairs, int64_t keys, T scale, const T* tile_max, T* column_max,
                            T* correction, T* column_sum) {
  constexpr int64_t L = Vec<T>::size(), V = Q / L, G = Product<Op>::kGroup;
  const Vec<T> factor(scale);
  Vec<T> tile_sum[V];
  std::array<ShiftedExp<T>, V> exps;
  for (int v = 0; v < V; ++v) {
    const Vec<T> old_max = Vec<T>::loadu(column_max + v * L);
    const Vec<T> new_max = at::vec::clamp_min(old_max, load_logits<SCALE>(tile_max + v * L, factor));
    fast_exp(old_max - new_max).store(correction + v * L);
    new_max.store(column_max + v * L);
    exps[v] = ShiftedExp<T>(exp_scale<SCALE>(scale), new_max);
    tile_sum[v] = Vec<T>(T(0));
  }
  // the tile's own sums, added to the running ones once: a column's sum is a few short
  // chains, not one of M terms (float32 error ~ M eps: 6x larger at M = 4096)
  for (int64_t j = 0; j < keys; j += G)
    for (int v = 0; v < V; ++v)
      for (const Vec<T>& p : probabilities<Q>(logits, pairs, keys, j, v, exps[v])) tile_sum[v] = tile_sum[v] + p;
  for (int v = 0; v < V; ++v) {
    const Vec<T> running = Vec<T>::loadu(column_sum + v * L) * Vec<T>::loadu(correction + v * L);
    (running + tile_sum[v]).store(column_sum + v * L);
  }
}

// p = exp(logit - log_normalizer) over a logits^T tile, the columns' log-normalizers
// known; stored where p v reads them.
template <bool SCALE, int64_t Q, typename Op, typename T>
void known_softmax_columns(T* logits, Op* pairs, int64_t keys, T scale, const T* column_log_normalizer) {
  constexpr int64_t L = Vec<T>::size(), V = Q / L, G = Product<Op>::kGroup;
  std::array<ShiftedExp<T>, V> exps;
  for (int v = 0; v < V; ++v)
    exps[v] = ShiftedExp<T>(exp_scale<SCALE>(scale), Vec<T>::loadu(column_log_normalizer + v * L));
  for (int64_t j = 0; j < keys; j += G)
    for (int v = 0; v < V; ++v) probabilities<Q>(logits, pairs, keys, j, v, exps[v]);
}

// known: log_normalizer holds the rows' log-sum-exp (one pass); else it receives it.
// T is the operands' type, A = Acc<T> that of the logits, sums, statistics (Product).
template <typename T, int DEPTH, int64_t Q, typename A = Acc<T>>
void forward_kernel(const Shape& s, const T* query, const T* key, const T* value, const T* center, T* out,
                    A* log_normalizer, bool known, A scale) {
  constexpr int64_t L = Vec<A>::size(), G = Product<T>::kGroup;
  constexpr bool kScale = Product<T>::kScalesLogits;
  static_assert(Q % (kWideVecs * L) == 0, "query tiles are whole register blocks wide");
  const int64_t D = s.width_qk, E = s.width_v, N = s.queries, M = s.keys;
  // kScale: the softmax scales the products, by |scale|, a negative scale's sign going
  // into the packed query (exactly), so that the maxima of the products are those of
  // the logits (online_softmax_columns)
  const bool negative_scale = kScale && scale < 0;
  const A logit_scale = negative_scale ? -scale : scale;
  const bool amx = amx_products<T>(D, E);
  const int64_t tile_keys = G > 1 ? kBfloat16ForwardKeyTile : kForwardKeyTile;
  const int64_t query_tiles = (N + Q - 1) / Q, key_tile = std::min(tile_keys, M);
  // p v contracts over the keys: bf16 reads V^T packed (pack_contracted_rows), once a batch
  const int64_t value_columns = round_up(M, G);
  Buffer<T> value_t(G > 1 ? s.batch * E * value_columns : 0);
  const Strides value_strides = contracted_rows_strides<T>(amx, E, value_columns);
  if (G > 1)
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        pack_contracted_rows(amx, value + b * M * E, M, E, value_t.data() + b * E * value_columns, value_columns);
    });
  at::parallel_for(0, s.batch * query_tiles, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    const ReleaseTiles release(amx);
    Buffer<T> query_t(round_up(D, G) * Q), probs(G > 1 ? round_up(key_tile, G) * Q : 0);
    Buffer<A> logits(key_tile * Q), acc(E * Q);
    Buffer<A> column_max(Q), tile_max(Q), column_sum(Q), column_log_normalizer(Q), correction(Q), out_rows(Q * E);
    T* probs_out = nullptr;  // where the softmax leaves P^T for p v (store_probabilities)
    if constexpr (G > 1) {
      probs_out = probs.data();
    } else {
      probs_out = logits.data();
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / query_tiles, q0 = (item % query_tiles) * Q;
      const int64_t rows = std::min(Q, N - q0);
      pack_transposed(query + (b * N + q0) * D, rows, D, query_t.data(), Q);  // columns rows..Q zero
      if constexpr (!kScale) {
        for (auto& x : query_t) x *= scale;
      } else if (negative_scale) {
        for (auto& x : query_t) x = -x;
      }
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(column_max.begin(), column_max.end(), -std::numeric_limits<A>::infinity());
      std::fill(column_sum.begin(), column_sum.end(), A(0));
      if (known) {
        std::fill(column_log_normalizer.begin(), column_log_normalizer.end(), A(0));
        std::copy(log_normalizer + b * N + q0, log_normalizer + b * N + q0 + rows, column_log_normalizer.begin());
      }
      for (int64_t k0 = 0; k0 < M; k0 += tile_keys) {
        const int64_t keys = std::min(tile_keys, M - k0);
        const T* key_tile = key + (b * M + k0) * D;
        if (known) {
          matmul_rows<T, DEPTH>(amx, keys, Q, D, key_tile, D, G, query_t.data(), Q, logits.data(), Q, false);
          known_softmax_columns<kScale, Q>(logits.data(), probs_out, keys, logit_scale, column_log_normalizer.data());
        } else {
          logits_and_maxima<T, DEPTH, Q>(amx, keys, D, key_tile, query_t.data(), logits.data(), tile_max.data());
          online_softmax_columns<kScale, Q>(logits.data(), probs_out, keys, logit_scale, tile_max.data(),
                                            column_max.data(), correction.data(), column_sum.data());
          // running maxima changed: rescale what was accumulated under the old ones
          for (int64_t e = 0; e < E; ++e)
            for (int64_t c = 0; c < Q; c += L) {
              A* at = acc.data() + e * Q + c;
              (Vec<A>::loadu(at) * Vec<A>::loadu(correction.data() + c)).store(at);
            }
        }
        if constexpr (G > 1) {
          matmul_rows<T>(amx, E, Q, keys, value_t.data() + b * E * value_columns + k0 / G * value_strides.col,
                         value_strides.row, value_strides.col, probs.data(), Q, acc.data(), Q, true);
        } else {
          matmul_tile<T>(E, Q, keys, value + (b * M + k0) * E, 1, E, logits.data(), Q, acc.data(), Q, true);
        }
      }
      at::vec::transpose_mxn<A>(acc.data(), Q, out_rows.data(), E, E, rows);  // acc^T -> rows (Q, E)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = b * N + q0 + r;
        const A inverse = known ? A(1) : A(1) / column_sum[r];
        A* row = out_rows.data() + r * E;
        for (int64_t e = 0; e < E; ++e) row[e] = row[e] * inverse - (center ? A(center[i * E + e]) : A(0));
        at::vec::convert(row, out + i * E, E);
        if (!known) log_normalizer[i] = column_max[r] + std::log(column_sum[r]);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> softmax_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                           const OptionalTensor& center, const OptionalTensor& log_normalizer,
                                           double scale) {
  check_operands(query, key, value, center, bfloat16_native());
  const int64_t B = query.size(0), N = query.size(1);
  const auto statistics = accumulate_type(query.scalar_type());
  if (log_normalizer) check_like("log_normalizer", *log_normalizer, {B, N}, statistics);
  Tensor out = at::empty({B, N, value.size(2)}, value.options());
  const bool known = log_normalizer.has_value();
  Tensor log_normalizer_out = known ? *log_normalizer : at::empty({B, N}, query.options().dtype(statistics));
  FASTNL_DISPATCH_OPERANDS(query.scalar_type(), "fastnl_cpp::softmax_forward", [&] {
    using A = Acc<scalar_t>;
    const Shape shape{B, N, key.size(1), query.size(2), value.size(2)};
    with_depth(shape.width_qk, [&](auto depth) {
      const auto run = [&](auto query_tile) {
        forward_kernel<scalar_t, decltype(depth)::value, decltype(query_tile)::value>(
            shape, query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
            center ? center->const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
            log_normalizer_out.data_ptr<A>(), known, static_cast<A>(scale));
      };
      // bf16: the wider query tile where the queries fill it (N = 64 measured slower at 128)
      if (Product<scalar_t>::kGroup > 1 && N >= kBfloat16ForwardQueryTile) {
        run(std::integral_constant<int64_t, kBfloat16ForwardQueryTile>{});
      } else {
        run(std::integral_constant<int64_t, kForwardQueryTile>{});
      }
    });
  });
  return {out, log_normalizer_out};
}

}  // namespace fastnl
