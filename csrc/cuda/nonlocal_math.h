// The per-row and per-tile arithmetic of the softmax nonlocal operator, written once.
//
// Every function here is __host__ __device__: the CUDA kernels (softmax_kernels.cu)
// call them on tiles staged in shared memory, and host_math.cpp calls the same
// functions in plain loops on the CPU, so the tests check this logic against
// fastnl.reference on a machine without a GPU. Only launch and memory plumbing is
// left GPU-only.
//
// Notation as in docs/design.md: query q_i (D), key k_j (D), value v_j (E), center c_i (E),
// p_ij = exp(scale q_i.k_j - log_normalizer_i), out_i = sum_j p_ij v_j [- c_i].
// Tiles are row-major: `count` rows of `width` numbers, already in the accumulator type.
//
// Row loops run to a compile-time bound kWidth (a bucket >= the runtime width, chosen by
// dispatch_width) and skip d >= width, so nvcc unrolls them into constant indices and the
// kernels' per-thread row arrays can live in registers instead of local memory.
#pragma once

#include <math.h>

#include <type_traits>

#ifdef __CUDACC__
#define FASTNL_HD __host__ __device__ __forceinline__
#else
#define FASTNL_HD inline
#endif

// Unrolls the kWidth loops on the GPU only: the host build gains nothing from it.
#ifdef __CUDACC__
#define FASTNL_UNROLL _Pragma("unroll")
#else
#define FASTNL_UNROLL
#endif

namespace fastnl {

// Widths D, E above this do not fit the per-thread rows the kernels keep.
constexpr int kMaxWidth = 128;

// Calls fn(std::integral_constant<int, kWidth>) with the smallest bucket 16, 32, 64 or
// kMaxWidth that holds `width` (max of D and E), so each bucket's rows are sized to fit;
// wider rows never get here, checks.h refuses them.
template <typename Fn>
inline decltype(auto) dispatch_width(int width, Fn&& fn) {
  if (width <= 16) return fn(std::integral_constant<int, 16>{});
  if (width <= 32) return fn(std::integral_constant<int, 32>{});
  if (width <= 64) return fn(std::integral_constant<int, 64>{});
  return fn(std::integral_constant<int, kMaxWidth>{});
}

FASTNL_HD float math_exp(float x) { return expf(x); }
FASTNL_HD double math_exp(double x) { return exp(x); }
FASTNL_HD float math_log(float x) { return logf(x); }
FASTNL_HD double math_log(double x) { return log(x); }

template <int kWidth, typename acc_t>
FASTNL_HD acc_t dot(const acc_t* a, const acc_t* b, int width) {
  acc_t sum = 0;
  FASTNL_UNROLL
  for (int d = 0; d < kWidth; ++d) {
    if (d < width) sum += a[d] * b[d];
  }
  return sum;
}

template <int kWidth, typename acc_t>
FASTNL_HD void add_scaled(acc_t* target, acc_t weight, const acc_t* row, int width) {
  FASTNL_UNROLL
  for (int d = 0; d < kWidth; ++d) {
    if (d < width) target[d] += weight * row[d];
  }
}

// Row state of the online softmax: the unnormalised accumulator lives with the caller.
template <typename acc_t>
struct OnlineRow {
  acc_t row_max;
  acc_t row_sum;
};

template <typename acc_t>
FASTNL_HD OnlineRow<acc_t> online_start() {
  return {-INFINITY, acc_t(0)};
}

// Absorb a tile of keys into one query row whose normaliser is not known yet.
template <int kWidth, typename acc_t>
FASTNL_HD void online_absorb_tile(const acc_t* query_row, const acc_t* keys, const acc_t* values, int count,
                                  int width_qk, int width_v, acc_t scale, OnlineRow<acc_t>& state, acc_t* accumulator) {
  for (int j = 0; j < count; ++j) {
    const acc_t logit = scale * dot<kWidth>(query_row, keys + j * width_qk, width_qk);
    if (logit > state.row_max) {
      // running max changed: rescale what was accumulated under the old one
      const acc_t correction = math_exp(state.row_max - logit);
      state.row_sum *= correction;
      FASTNL_UNROLL
      for (int e = 0; e < kWidth; ++e) {
        if (e < width_v) accumulator[e] *= correction;
      }
      state.row_max = logit;
    }
    const acc_t prob = math_exp(logit - state.row_max);
    state.row_sum += prob;
    add_scaled<kWidth>(accumulator, prob, values + j * width_v, width_v);
  }
}

// Normalise the accumulator after the last tile; returns the row's log_normalizer.
template <int kWidth, typename acc_t>
FASTNL_HD acc_t online_finish(const OnlineRow<acc_t>& state, acc_t* accumulator, int width_v) {
  FASTNL_UNROLL
  for (int e = 0; e < kWidth; ++e) {
    if (e < width_v) accumulator[e] /= state.row_sum;
  }
  return state.row_max + math_log(state.row_sum);
}

// Absorb a tile when the stage already knows the log_normalizer: probabilities are final, one pass.
template <int kWidth, typename acc_t>
FASTNL_HD void known_absorb_tile(const acc_t* query_row, const acc_t* keys, const acc_t* values, int count,
                                 int width_qk, int width_v, acc_t scale, acc_t log_normalizer, acc_t* accumulator) {
  for (int j = 0; j < count; ++j) {
    const acc_t prob = math_exp(scale * dot<kWidth>(query_row, keys + j * width_qk, width_qk) - log_normalizer);
    add_scaled<kWidth>(accumulator, prob, values + j * width_v, width_v);
  }
}

// out_i = accumulator - c_i (diffuse) or the accumulator (aggregate, center == nullptr).
template <int kWidth, typename acc_t, typename scalar_t>
FASTNL_HD void store_row(const acc_t* accumulator, const scalar_t* center_row, scalar_t* out_row, int width_v) {
  FASTNL_UNROLL
  for (int e = 0; e < kWidth; ++e) {
    if (e >= width_v) continue;
    const acc_t shift = center_row == nullptr ? acc_t(0) : static_cast<acc_t>(center_row[e]);
    out_row[e] = static_cast<scalar_t>(accumulator[e] - shift);
  }
}

// delta_i = dO_i . O_i with O the aggregate (out + center for diffuse): FlashAttention-2's
// preprocessing, so that dS_ij = p_ij (dO_i . v_j - delta_i).
template <int kWidth, typename acc_t, typename scalar_t>
FASTNL_HD acc_t softmax_delta(const scalar_t* grad_out_row, const scalar_t* out_row, const scalar_t* center_row,
                              int width_v) {
  acc_t sum = 0;
  FASTNL_UNROLL
  for (int e = 0; e < kWidth; ++e) {
    if (e >= width_v) continue;
    acc_t aggregate = static_cast<acc_t>(out_row[e]);
    if (center_row != nullptr) aggregate += static_cast<acc_t>(center_row[e]);
    sum += static_cast<acc_t>(grad_out_row[e]) * aggregate;
  }
  return sum;
}

// dQ_i += scale sum_j dS_ij k_j over a tile of keys.
template <int kWidth, typename acc_t>
FASTNL_HD void query_grad_tile(const acc_t* query_row, const acc_t* grad_out_row, acc_t log_normalizer, acc_t delta,
                               const acc_t* keys, const acc_t* values, int count, int width_qk, int width_v,
                               acc_t scale, acc_t* grad_query_row) {
  for (int j = 0; j < count; ++j) {
    const acc_t prob = math_exp(scale * dot<kWidth>(query_row, keys + j * width_qk, width_qk) - log_normalizer);
    const acc_t grad_logit = prob * (dot<kWidth>(grad_out_row, values + j * width_v, width_v) - delta);
    add_scaled<kWidth>(grad_query_row, scale * grad_logit, keys + j * width_qk, width_qk);
  }
}

// dK_j += scale sum_i dS_ij q_i and dV_j += sum_i p_ij dO_i over a tile of queries.
template <int kWidth, typename acc_t>
FASTNL_HD void key_value_grad_tile(const acc_t* key_row, const acc_t* value_row, const acc_t* queries,
                                   const acc_t* grad_outs, const acc_t* log_normalizers, const acc_t* deltas, int count,
                                   int width_qk, int width_v, acc_t scale, acc_t* grad_key_row, acc_t* grad_value_row) {
  for (int i = 0; i < count; ++i) {
    const acc_t prob = math_exp(scale * dot<kWidth>(queries + i * width_qk, key_row, width_qk) - log_normalizers[i]);
    add_scaled<kWidth>(grad_value_row, prob, grad_outs + i * width_v, width_v);
    const acc_t grad_logit = prob * (dot<kWidth>(grad_outs + i * width_v, value_row, width_v) - deltas[i]);
    add_scaled<kWidth>(grad_key_row, scale * grad_logit, queries + i * width_qk, width_qk);
  }
}

}  // namespace fastnl
