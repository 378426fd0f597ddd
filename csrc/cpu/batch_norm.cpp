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
// Rows are contiguous: the products keep kCross (or 8 x 2) vector accumulators in
// registers and stream the rows through broadcast FMAs. The reductions sum the rows in
// fixed chunks and the chunks' sums in chunk order: bitwise identical results for any
// thread count. Sums, statistics and projections are float32 (float64 for float64
// rows); bfloat16 rows are converted as they are read, or with bfloat16_products their
// projections run on vdpbf16ps (Product<BFloat16>; the Python side chooses as for the
// softmax kernels).
#include "ops.h"
#include "tile_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace fastnl {
namespace {

constexpr int64_t kChunkRows = 256;  // rows a reduction work item sums

// sums (kCross, n lanes; rows ldc apart) += x (rows, kCross)^T w (rows, n lanes), x's
// rows ldx apart, w's ldw: the kCross accumulators stay in registers over all the
// rows, each row one vector of w and kCross FMAs with a broadcast operand.
constexpr int64_t kCross = 16;
template <typename A>
void add_cross(const A* x, int64_t ldx, const A* w, int64_t ldw, int64_t rows, A* sums, int64_t ldc) {
  Vec<A> acc[kCross];
#pragma GCC unroll 16
  for (int64_t j = 0; j < kCross; ++j) acc[j] = Vec<A>::loadu(sums + j * ldc);
  for (int64_t i = 0; i < rows; ++i) {
    const Vec<A> row = Vec<A>::loadu(w + i * ldw);
#pragma GCC unroll 16
    for (int64_t j = 0; j < kCross; ++j) acc[j] = at::vec::fmadd(Vec<A>(x[i * ldx + j]), row, acc[j]);
  }
#pragma GCC unroll 16
  for (int64_t j = 0; j < kCross; ++j) acc[j].store(sums + j * ldc);
}

// The rows [r, r + rows) of x (R, C) as A, minus `shift` (C) where given, with rows
// ld >= C apart: in place where x is A already, unshifted and ld == C, else written
// into `scratch` (its padding columns left as they were).
template <typename T, typename A>
const A* rows_as(const T* x, int64_t r, int64_t rows, int64_t C, int64_t ld, const A* shift, Buffer<A>& scratch) {
  constexpr int64_t L = Vec<A>::size();
  if (ld == C) {
    if constexpr (std::is_same_v<T, A>)
      if (!shift) return x + r * C;
    at::vec::convert(x + r * C, scratch.data(), rows * C);
  } else {
    for (int64_t i = 0; i < rows; ++i) at::vec::convert(x + (r + i) * C, scratch.data() + i * ld, C);
  }
  if (shift)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < C; c += L) {
        const int64_t n = std::min(L, C - c);
        (Vec<A>::loadu(scratch.data() + i * ld + c, n) - Vec<A>::loadu(shift + c, n))
            .store(scratch.data() + i * ld + c, n);
      }
  return scratch.data();
}

// sum_a = the sum of the rows of a - a_shift (P), cross = (a - a_shift)^T (b - b_shift)
// (P, Q), for rows a (R, P) and b (R, Q); a_shift may be null (no shift).
template <typename T, typename A>
void moments_kernel(const T* a, const A* a_shift, const T* b, const A* b_shift, A* sum_a, A* cross, int64_t R,
                    int64_t P, int64_t Q) {
  constexpr int64_t L = Vec<A>::size();
  // a's rows padded to Pp columns (kCross accumulators at a time), b's to whole vectors
  const int64_t chunks = (R + kChunkRows - 1) / kChunkRows, Pp = round_up(P, kCross), ld = padded<A>(Q);
  const int64_t width = Pp + Pp * ld;
  Buffer<A> partial(chunks * width);  // zero: per chunk, the sums (Pp) and the products (Pp, ld)
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    Buffer<A> a_scratch(kChunkRows * Pp), b_scratch(kChunkRows * ld);  // zero padding
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* sums = partial.data() + chunk * width;
      const int64_t r0 = chunk * kChunkRows, rows = std::min(R, r0 + kChunkRows) - r0;
      const A* x = rows_as(a, r0, rows, P, Pp, a_shift, a_scratch);
      const A* w = rows_as(b, r0, rows, Q, ld, b_shift, b_scratch);
      for (int64_t p = 0; p < Pp; p += L) {
        Vec<A> total(A(0));
        for (int64_t i = 0; i < rows; ++i) total = total + Vec<A>::loadu(x + i * Pp + p);
        total.store(sums + p);
      }
      for (int64_t p = 0; p < Pp; p += kCross)
        for (int64_t c = 0; c < ld; c += L) add_cross(x + p, Pp, w + c, ld, rows, sums + Pp + p * ld + c, ld);
    }
  });
  std::fill(sum_a, sum_a + P, A(0));
  std::fill(cross, cross + P * Q, A(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const A* sums = partial.data() + chunk * width;
    for (int64_t p = 0; p < P; ++p) {
      sum_a[p] += sums[p];
      for (int64_t q = 0; q < Q; ++q) cross[p * Q + q] += sums[Pp + p * ld + q];
    }
  }
}

// VECS column vectors (from column c, the last n lanes wide) of ROWS output rows, in
// registers: out = x weight + bias + added, for x (ROWS, P), weight (P, Q) padded to
// rows of ldw (whole vectors: a masked load in the loop would split it in two paths,
// and GCC then keeps the sums in memory), bias (Q) or null, added (ROWS, Q) or null
// (it may be out itself). Each k is VECS vectors of weight and ROWS x VECS FMAs,
// independent sums so that no FMA waits on the last. The operands are Op, read as
// Product<Op> says: A itself, or bfloat16 pairs of k on vdpbf16ps (weight packed in
// pairs of rows, pack_rows), with float sums.
template <int ROWS, int VECS, typename Op, typename A>
void project_block(const Op* x, int64_t P, const Op* weight, int64_t ldw, const A* bias, const A* added, A* out,
                   int64_t Q, int64_t c, int64_t n) {
  using Operands = Product<Op>;
  constexpr int64_t L = Vec<A>::size(), G = Operands::kGroup;
  const auto lanes = [&](int v) { return v == VECS - 1 ? n : L; };
  Vec<A> acc[ROWS][VECS];
  for (int v = 0; v < VECS; ++v) {
    const Vec<A> shift = bias ? Vec<A>::loadu(bias + c + v * L, lanes(v)) : Vec<A>(A(0));
    for (int r = 0; r < ROWS; ++r)
      acc[r][v] = added ? shift + Vec<A>::loadu(added + r * Q + c + v * L, lanes(v)) : shift;
  }
  for (int64_t g = 0; g < P / G; ++g) {
    typename Operands::Operand row[VECS];
    for (int v = 0; v < VECS; ++v) row[v] = in_register(Operands::load(weight + (g * ldw + c + v * L) * G));
    for (int r = 0; r < ROWS; ++r) {
      const auto coefficient = Operands::broadcast(x + r * P + g * G);
      for (int v = 0; v < VECS; ++v) acc[r][v] = Operands::multiply_add(coefficient, row[v], acc[r][v]);
    }
  }
  if constexpr (G > 1) {
    if (P % G) {  // the last k alone: its pair's other half is zero in the packed weight
      typename Operands::Operand row[VECS];
      for (int v = 0; v < VECS; ++v) row[v] = Operands::load(weight + (P / G * ldw + c + v * L) * G);
      for (int r = 0; r < ROWS; ++r) {
        const auto coefficient = Operands::broadcast_first(x + r * P + P / G * G);
        for (int v = 0; v < VECS; ++v) acc[r][v] = Operands::multiply_add(coefficient, row[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v].store(out + r * Q + c + v * L, lanes(v));
}

// out = x weight + bias + added for `rows` rows, all Q columns (weight's rows ldw
// apart): blocks of kProjectRows rows and two column vectors, as matmul_tile's narrow
// blocks. matmul_tile itself needs C padded and initialised apart, then copied out:
// the backward (E = 16) took 0.94-1.05 ms with it against 0.59-0.79 with these blocks.
constexpr int kProjectRows = 8;
template <typename Op, typename A>
void project_rows_of(int64_t rows, const Op* x, int64_t P, const Op* weight, int64_t ldw, const A* bias, const A* added,
                     A* out, int64_t Q) {
  constexpr int64_t L = Vec<A>::size();
  const auto columns = [&](auto block_rows, int64_t r) {
    constexpr int ROWS = decltype(block_rows)::value;
    const A* at_added = added ? added + r * Q : nullptr;
    int64_t c = 0;
    for (; c + L < Q; c += 2 * L)
      project_block<ROWS, 2>(x + r * P, P, weight, ldw, bias, at_added, out + r * Q, Q, c, std::min(L, Q - c - L));
    if (c < Q) project_block<ROWS, 1>(x + r * P, P, weight, ldw, bias, at_added, out + r * Q, Q, c, Q - c);
  };
  int64_t r = 0;
  for (; r + kProjectRows <= rows; r += kProjectRows) columns(std::integral_constant<int, kProjectRows>(), r);
  for (; r < rows; ++r) columns(std::integral_constant<int, 1>(), r);
}

// weight (P, Q) as project_block's operand Op reads it: rows padded to ldw lanes, and
// for bfloat16 rounded and in pairs of rows (pack_rows).
template <typename Op, typename A>
Buffer<Op> packed_weight(const A* weight, int64_t P, int64_t Q, int64_t ldw) {
  Buffer<Op> packed(round_up(P, Product<Op>::kGroup) * ldw);
  if constexpr (std::is_same_v<Op, A>) {
    pack_rows(weight, P, Q, packed.data(), ldw);
  } else {
    Buffer<Op> rounded(P * Q);
    at::vec::convert(weight, rounded.data(), P * Q);
    pack_rows(rounded.data(), P, Q, packed.data(), ldw);
  }
  return packed;
}

// The rows [r, r + rows) of x (R, P) less `shift` as Op (rows_as; for bfloat16 rounded
// from the shifted floats in `scratch`, or x's own rows without a shift).
template <typename Op, typename T, typename A>
const Op* operand_rows(const T* x, int64_t r, int64_t rows, int64_t P, const A* shift, Buffer<A>& shifted,
                       Buffer<Op>& scratch) {
  if constexpr (std::is_same_v<Op, A>) {
    return rows_as(x, r, rows, P, P, shift, scratch);
  } else {
    if constexpr (std::is_same_v<Op, T>)
      if (!shift) return x + r * P;
    at::vec::convert(rows_as(x, r, rows, P, P, shift, shifted), scratch.data(), rows * P);
    return scratch.data();
  }
}

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
  moments_kernel<T, A>(grad_next_values, nullptr, out, nullptr, grad_next_bias, grad_next_weight, R, F, C);
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
