// BatchNorm with batch statistics over position rows (R, C), and the residual it is
// added to: out = residual + (x - mean) * invstd * weight + bias, the W_z branch of the
// nonlocal modules on the CPU (fastnl/batch_norm.py). ATen's channels-last BatchNorm and
// the add took 2.5 ms fwd+bwd at the model's (32768, 32) in float32, ten adds' time;
// this takes 1.3: one reduction and one write each way.
//
// Channels run along the vector lanes (rows are contiguous), so every pass is plain
// vector arithmetic. The reductions sum the rows in fixed chunks and the chunks' sums
// in chunk order: bitwise identical results for any thread count. The statistics take
// one pass (memory, not arithmetic, bounds these kernels: a second pass over 4 MB of
// rows cost as much as the first). Sums and statistics are float32 (float64 for
// float64 rows); bfloat16 rows are converted as they are read.
#include "ops.h"
#include "tile_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>

namespace fastnl {
namespace {

constexpr int64_t kChunkRows = 256;  // rows a reduction work item sums
constexpr int64_t kBlockRows = 16;   // rows converted and computed at a time

// The rows [r, r + rows) of x (R, C) as A: in place, or converted into `scratch` with
// one at::vec conversion of the block.
template <typename T, typename A>
const A* block_values(const T* x, int64_t r, int64_t rows, int64_t C, Buffer<A>& scratch) {
  if constexpr (std::is_same_v<T, A>) {
    return x + r * C;
  } else {
    at::vec::convert(x + r * C, scratch.data(), rows * C);
    return scratch.data();
  }
}

// Where a block's results go: out's rows in place, or `scratch` converted by `commit`.
template <typename T, typename A>
struct BlockOut {
  T* out;
  Buffer<A>& scratch;
  A* rows(int64_t r, int64_t C) {
    if constexpr (std::is_same_v<T, A>) {
      return out + r * C;
    } else {
      return scratch.data();
    }
  }
  void commit(int64_t r, int64_t rows, int64_t C) {
    if constexpr (!std::is_same_v<T, A>) at::vec::convert(scratch.data(), out + r * C, rows * C);
  }
};

// `sums` per-channel sums over R rows into totals (sums, C): chunk_sum(begin, end, acc)
// adds the rows [begin, end) into its chunk's zeroed acc (sums, C), and the chunks are
// added in order.
template <typename A, typename Fn>
void channel_sums(int64_t R, int64_t C, int64_t sums, A* totals, Fn chunk_sum) {
  const int64_t chunks = (R + kChunkRows - 1) / kChunkRows;
  Buffer<A> partial(chunks * sums * C);  // zero
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk)
      chunk_sum(chunk * kChunkRows, std::min(R, (chunk + 1) * kChunkRows), partial.data() + chunk * sums * C);
  });
  std::fill(totals, totals + sums * C, A(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < sums * C; ++i) totals[i] += partial[chunk * sums * C + i];
}

// fn(c, n) for the channel vectors: c = 0, L, 2L.., n lanes of each
template <typename A, typename Fn>
inline void for_channel_vectors(int64_t C, Fn fn) {
  constexpr int64_t L = Vec<A>::size();
  for (int64_t c = 0; c < C; c += L) fn(c, std::min(L, C - c));
}

// out = x a + b + y c per channel, in one write over the rows: the forward's
// normalisation (y the residual, c null: added as it is) and the backward's dx (y = dy).
template <typename T, typename A>
void affine_rows(const T* x, const A* a, const A* b, const T* y, const A* c, T* out, int64_t R, int64_t C) {
  at::parallel_for(0, R, kChunkRows, [&](int64_t begin, int64_t end) {
    Buffer<A> scratch(kBlockRows * C), y_scratch(y ? kBlockRows * C : 0), out_scratch(kBlockRows * C);
    BlockOut<T, A> target{out, out_scratch};
    for (int64_t r = begin; r < end; r += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, end - r);
      const A* block = block_values(x, r, rows, C, scratch);
      const A* added = y ? block_values(y, r, rows, C, y_scratch) : nullptr;
      A* result = target.rows(r, C);
      for_channel_vectors<A>(C, [&](int64_t ch, int64_t n) {
        const Vec<A> ac = Vec<A>::loadu(a + ch, n), bc = Vec<A>::loadu(b + ch, n);
        const Vec<A> cc = c ? Vec<A>::loadu(c + ch, n) : Vec<A>(A(0));
        for (int64_t i = 0; i < rows; ++i) {
          Vec<A> v = at::vec::fmadd(Vec<A>::loadu(block + i * C + ch, n), ac, bc);
          if (added) {
            const Vec<A> yv = Vec<A>::loadu(added + i * C + ch, n);
            v = c ? at::vec::fmadd(yv, cc, v) : v + yv;
          }
          v.store(result + i * C + ch, n);
        }
      });
      target.commit(r, rows, C);
    }
  });
}

template <typename T, typename A>
void forward_kernel(const T* x, const A* weight, const A* bias, const T* residual, T* out, A* mean, A* var, A* invstd,
                    int64_t R, int64_t C, double eps) {
  // one pass: sums of d = x - first row and of d^2, per channel; shifted by a sample of
  // the data, E[d^2] - E[d]^2 loses no more than a few ulps to cancellation (the plain
  // E[x^2] - E[x]^2 would lose all digits where |mean| >> std)
  Buffer<A> shift_by(C), sums(2 * C);
  at::vec::convert(x, shift_by.data(), C);
  channel_sums(R, C, 2, sums.data(), [&](int64_t begin, int64_t end, A* acc) {
    Buffer<A> scratch(kBlockRows * C);
    for (int64_t r = begin; r < end; r += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, end - r);
      const A* block = block_values(x, r, rows, C, scratch);
      for_channel_vectors<A>(C, [&](int64_t c, int64_t n) {
        const Vec<A> shift = Vec<A>::loadu(shift_by.data() + c, n);
        Vec<A> sum = Vec<A>::loadu(acc + c, n), squares = Vec<A>::loadu(acc + C + c, n);
        for (int64_t i = 0; i < rows; ++i) {
          const Vec<A> d = Vec<A>::loadu(block + i * C + c, n) - shift;
          sum = sum + d;
          squares = at::vec::fmadd(d, d, squares);
        }
        sum.store(acc + c, n);
        squares.store(acc + C + c, n);
      });
    }
  });
  // out = x * scale + shift (+ residual), per channel
  Buffer<A> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const A shifted_mean = sums[c] / A(R);
    mean[c] = shift_by[c] + shifted_mean;
    var[c] = std::max(A(0), sums[C + c] / A(R) - shifted_mean * shifted_mean);
    invstd[c] = A(1) / std::sqrt(var[c] + A(eps));
    scale[c] = invstd[c] * weight[c];
    shift[c] = bias[c] - mean[c] * scale[c];
  }
  affine_rows<T, A>(x, scale.data(), shift.data(), residual, nullptr, out, R, C);
}

template <typename T, typename A>
void backward_kernel(const T* grad_out, const T* x, const A* weight, const A* mean, const A* invstd, T* grad_x,
                     A* grad_weight, A* grad_bias, int64_t R, int64_t C) {
  // sums[0] = sum dy, sums[1] = sum dy (x - mean), per channel
  Buffer<A> sums(2 * C);
  channel_sums(R, C, 2, sums.data(), [&](int64_t begin, int64_t end, A* acc) {
    Buffer<A> scratch(kBlockRows * C), grad_scratch(kBlockRows * C);
    for (int64_t r = begin; r < end; r += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, end - r);
      const A* block = block_values(x, r, rows, C, scratch);
      const A* dy = block_values(grad_out, r, rows, C, grad_scratch);
      for_channel_vectors<A>(C, [&](int64_t c, int64_t n) {
        const Vec<A> m = Vec<A>::loadu(mean + c, n);
        Vec<A> sum = Vec<A>::loadu(acc + c, n), product = Vec<A>::loadu(acc + C + c, n);
        for (int64_t i = 0; i < rows; ++i) {
          const Vec<A> g = Vec<A>::loadu(dy + i * C + c, n);
          sum = sum + g;
          product = at::vec::fmadd(Vec<A>::loadu(block + i * C + c, n) - m, g, product);
        }
        sum.store(acc + c, n);
        product.store(acc + C + c, n);
      });
    }
  });
  // dx = (dy - mean(dy) - xhat mean(dy xhat)) invstd w = dy k + x j + l, per channel
  Buffer<A> k(C), j(C), l(C);
  for (int64_t c = 0; c < C; ++c) {
    grad_bias[c] = sums[c];
    grad_weight[c] = sums[C + c] * invstd[c];
    k[c] = invstd[c] * weight[c];
    j[c] = -k[c] * invstd[c] * invstd[c] * sums[C + c] / A(R);
    l[c] = -k[c] * sums[c] / A(R) - mean[c] * j[c];
  }
  affine_rows<T, A>(x, j.data(), l.data(), grad_out, k.data(), grad_x, R, C);
}

void check_rows(const char* name, const Tensor& t, const Tensor& like) {
  check_like(name, t, like.sizes(), like.scalar_type());
}

void check_channels(const char* name, const Tensor& t, int64_t C, at::ScalarType dtype) {
  check_like(name, t, {C}, dtype);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_rows_forward(const Tensor& x, const Tensor& weight,
                                                                   const Tensor& bias, const OptionalTensor& residual,
                                                                   double eps) {
  TORCH_CHECK(x.dim() == 2, "x must be rows (R, C), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "x must be float32, float64 or bfloat16, got ", dtype);
  const int64_t R = x.size(0), C = x.size(1);
  TORCH_CHECK(R > 1, "batch statistics need more than one row, got ", R);
  check_rows("x", x, x);
  const auto statistics = accumulate_type(dtype);
  check_channels("weight", weight, C, statistics);
  check_channels("bias", bias, C, statistics);
  if (residual) check_rows("residual", *residual, x);
  Tensor out = at::empty_like(x), mean = at::empty({C}, weight.options()), var = at::empty_like(mean);
  Tensor invstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "fastnl_cpp::batch_norm_rows_forward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, A>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<A>(), bias.const_data_ptr<A>(),
                                residual ? residual->const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                mean.data_ptr<A>(), var.data_ptr<A>(), invstd.data_ptr<A>(), R, C, eps);
  });
  return {out, mean, var, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_rows_backward(const Tensor& grad_out, const Tensor& x,
                                                            const Tensor& weight, const Tensor& mean,
                                                            const Tensor& invstd) {
  TORCH_CHECK(x.dim() == 2, "x must be rows (R, C), got shape ", x.sizes());
  const int64_t R = x.size(0), C = x.size(1);
  check_rows("x", x, x);
  check_rows("grad_out", grad_out, x);
  const auto statistics = accumulate_type(x.scalar_type());
  for (const auto& [name, t] : {std::pair{"weight", weight}, std::pair{"mean", mean}, std::pair{"invstd", invstd}})
    check_channels(name, t, C, statistics);
  Tensor grad_x = at::empty_like(x), grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastnl_cpp::batch_norm_rows_backward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, A>(grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                 weight.const_data_ptr<A>(), mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                                 grad_x.data_ptr<scalar_t>(), grad_weight.data_ptr<A>(), grad_bias.data_ptr<A>(), R, C);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace fastnl
