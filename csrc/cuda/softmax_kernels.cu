// CUDA kernels of the softmax nonlocal operator: launch and memory plumbing only.
//
// The design is the simple one: a block of kTile threads owns kTile rows, one row per
// thread, and walks the other side in tiles of kTile rows that the block stages in
// shared memory (converted to the accumulator type). All arithmetic is in
// nonlocal_math.h, shared with the host build that the tests run on the CPU.
//   forward:  block = query tile, loop over key tiles (online softmax, or one pass with
//             a known log_normalizer), center subtracted on store;
//   backward: delta_i = dO_i . O_i per row; block = key tile for dK, dV (loop over
//             query tiles); block = query tile for dQ (loop over key tiles). No atomics.
// Every kernel is instantiated per width bucket kWidth (dispatch_width): its per-thread
// rows are acc_t[kWidth] with unrolled loops, so they stay in registers for small widths.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "nonlocal_math.h"
#include "softmax_launch.h"

namespace fastnl {
namespace {

constexpr int kTile = 64;  // threads per block = rows per tile

// Copies rows [start, start + count) of a (rows, width) matrix into shared memory.
template <typename scalar_t, typename acc_t>
__device__ void stage_rows(acc_t* tile, const scalar_t* source, int64_t start, int count, int width) {
  for (int index = threadIdx.x; index < count * width; index += blockDim.x) {
    tile[index] = static_cast<acc_t>(source[start * width + index]);
  }
}

template <int kWidth, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(acc_t* row, const scalar_t* source, int width) {
  FASTNL_UNROLL
  for (int d = 0; d < kWidth; ++d) {
    if (d < width) row[d] = static_cast<acc_t>(source[d]);
  }
}

// Zeroes every entry, past `width` too: unrolled, those are free register moves.
template <int kWidth, typename acc_t>
__device__ __forceinline__ void zero_row(acc_t* row) {
  FASTNL_UNROLL
  for (int d = 0; d < kWidth; ++d) row[d] = 0;
}

template <int kWidth, typename acc_t, typename scalar_t>
__device__ __forceinline__ void store_plain_row(const acc_t* row, scalar_t* target, int width) {
  FASTNL_UNROLL
  for (int d = 0; d < kWidth; ++d) {
    if (d < width) target[d] = static_cast<scalar_t>(row[d]);
  }
}

// The row a thread owns: blockIdx.y is the batch, blockIdx.x the tile of kTile rows.
struct ThreadRow {
  int64_t batch;
  int64_t row;  // flat index into (B, rows_per_batch)
  bool active;  // false for the padding threads of the last tile
};

__device__ ThreadRow thread_row(int rows_per_batch) {
  const int64_t batch = blockIdx.y;
  const int index = blockIdx.x * kTile + threadIdx.x;
  return {batch, batch * rows_per_batch + index, index < rows_per_batch};
}

// Walks one batch's keys in tiles of kTile rows: the block stages each key and value
// tile in `shared` (as acc_t), then every thread calls absorb(key_tile, value_tile, count).
template <typename scalar_t, typename Absorb>
__device__ __forceinline__ void for_each_key_tile(const scalar_t* key, const scalar_t* value, int64_t batch,
                                                  int num_keys, int width_qk, int width_v, unsigned char* shared,
                                                  Absorb absorb) {
  using acc_t = at::opmath_type<scalar_t>;
  key += batch * num_keys * width_qk;
  value += batch * num_keys * width_v;
  acc_t* key_tile = reinterpret_cast<acc_t*>(shared);
  acc_t* value_tile = key_tile + kTile * width_qk;
  for (int start = 0; start < num_keys; start += kTile) {
    const int count = min(kTile, num_keys - start);
    stage_rows(key_tile, key, start, count, width_qk);
    stage_rows(value_tile, value, start, count, width_v);
    __syncthreads();
    absorb(static_cast<const acc_t*>(key_tile), static_cast<const acc_t*>(value_tile), count);
    __syncthreads();
  }
}

template <int kWidth, typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                               const scalar_t* __restrict__ value, const scalar_t* __restrict__ center,
                               scalar_t* __restrict__ out, acc_t* __restrict__ log_normalizer, bool known,
                               int num_queries, int num_keys, int width_qk, int width_v, acc_t scale) {
  extern __shared__ unsigned char shared[];
  const ThreadRow mine = thread_row(num_queries);  // plain variables: lambdas below capture them
  const int64_t batch = mine.batch, row = mine.row;
  const bool active = mine.active;

  acc_t query_row[kWidth], accumulator[kWidth];
  if (active) load_row<kWidth>(query_row, query + row * width_qk, width_qk);
  zero_row<kWidth>(accumulator);
  OnlineRow<acc_t> state = online_start<acc_t>();
  for_each_key_tile(key, value, batch, num_keys, width_qk, width_v, shared,
                    [&](const acc_t* key_tile, const acc_t* value_tile, int count) {
    if (active && known) {
      known_absorb_tile<kWidth>(query_row, key_tile, value_tile, count, width_qk, width_v, scale, log_normalizer[row],
                                accumulator);
    } else if (active) {
      online_absorb_tile<kWidth>(query_row, key_tile, value_tile, count, width_qk, width_v, scale, state, accumulator);
    }
  });
  if (!active) return;
  if (!known) log_normalizer[row] = online_finish<kWidth>(state, accumulator, width_v);
  store_row<kWidth>(accumulator, center == nullptr ? nullptr : center + row * width_v, out + row * width_v, width_v);
}

template <int kWidth, typename scalar_t, typename acc_t>
__global__ void delta_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                             const scalar_t* __restrict__ center, acc_t* __restrict__ delta, int64_t num_rows,
                             int width_v) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  delta[row] = softmax_delta<kWidth, acc_t>(grad_out + row * width_v, out + row * width_v,
                                            center == nullptr ? nullptr : center + row * width_v, width_v);
}

template <int kWidth, typename scalar_t, typename acc_t>
__global__ void query_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ query,
                                  const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                                  const acc_t* __restrict__ log_normalizer, const acc_t* __restrict__ delta,
                                  scalar_t* __restrict__ grad_query, int num_queries, int num_keys, int width_qk,
                                  int width_v, acc_t scale) {
  extern __shared__ unsigned char shared[];
  const ThreadRow mine = thread_row(num_queries);  // plain variables: lambdas below capture them
  const int64_t batch = mine.batch, row = mine.row;
  const bool active = mine.active;

  acc_t query_row[kWidth], grad_out_row[kWidth], grad_query_row[kWidth];
  if (active) {
    load_row<kWidth>(query_row, query + row * width_qk, width_qk);
    load_row<kWidth>(grad_out_row, grad_out + row * width_v, width_v);
  }
  zero_row<kWidth>(grad_query_row);
  for_each_key_tile(key, value, batch, num_keys, width_qk, width_v, shared,
                    [&](const acc_t* key_tile, const acc_t* value_tile, int count) {
    if (active) {
      query_grad_tile<kWidth>(query_row, grad_out_row, log_normalizer[row], delta[row], key_tile, value_tile, count,
                              width_qk, width_v, scale, grad_query_row);
    }
  });
  if (active) store_plain_row<kWidth>(grad_query_row, grad_query + row * width_qk, width_qk);
}

template <int kWidth, typename scalar_t, typename acc_t>
__global__ void key_value_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ query,
                                      const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                                      const acc_t* __restrict__ log_normalizer, const acc_t* __restrict__ delta,
                                      scalar_t* __restrict__ grad_key, scalar_t* __restrict__ grad_value,
                                      int num_queries, int num_keys, int width_qk, int width_v, acc_t scale) {
  extern __shared__ unsigned char shared[];
  acc_t* query_tile = reinterpret_cast<acc_t*>(shared);
  acc_t* grad_out_tile = query_tile + kTile * width_qk;
  acc_t* log_normalizer_tile = grad_out_tile + kTile * width_v;
  acc_t* delta_tile = log_normalizer_tile + kTile;
  const ThreadRow mine = thread_row(num_keys);
  const int64_t batch = mine.batch, key_row = mine.row;
  const bool active = mine.active;
  query += batch * num_queries * width_qk;
  grad_out += batch * num_queries * width_v;
  log_normalizer += batch * num_queries;
  delta += batch * num_queries;

  acc_t key_row_values[kWidth], value_row[kWidth], grad_key_row[kWidth], grad_value_row[kWidth];
  if (active) {
    load_row<kWidth>(key_row_values, key + key_row * width_qk, width_qk);
    load_row<kWidth>(value_row, value + key_row * width_v, width_v);
  }
  zero_row<kWidth>(grad_key_row);
  zero_row<kWidth>(grad_value_row);
  for (int start = 0; start < num_queries; start += kTile) {
    const int count = min(kTile, num_queries - start);
    stage_rows(query_tile, query, start, count, width_qk);
    stage_rows(grad_out_tile, grad_out, start, count, width_v);
    stage_rows(log_normalizer_tile, log_normalizer, start, count, 1);
    stage_rows(delta_tile, delta, start, count, 1);
    __syncthreads();
    if (active) {
      key_value_grad_tile<kWidth>(key_row_values, value_row, query_tile, grad_out_tile, log_normalizer_tile, delta_tile,
                                  count, width_qk, width_v, scale, grad_key_row, grad_value_row);
    }
    __syncthreads();
  }
  if (active) {
    store_plain_row<kWidth>(grad_key_row, grad_key + key_row * width_qk, width_qk);
    store_plain_row<kWidth>(grad_value_row, grad_value + key_row * width_v, width_v);
  }
}

// Launches kernel with `shared_bytes` of dynamic shared memory, opting in above 48 KiB.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, size_t shared_bytes, Args... args) {
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  }
  kernel<<<grid, kTile, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* optional_data(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

int blocks(int64_t rows) { return static_cast<int>((rows + kTile - 1) / kTile); }

}  // namespace

void launch_softmax_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& center, const at::Tensor& out,
                            const at::Tensor& log_normalizer, bool known, double scale) {
  const int batch = query.size(0), num_queries = query.size(1), num_keys = key.size(1);
  const int width_qk = query.size(2), width_v = value.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "fastnl_softmax_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_width(std::max(width_qk, width_v), [&](auto bucket) {
      constexpr int kWidth = decltype(bucket)::value;
      launch(forward_kernel<kWidth, scalar_t, acc_t>, dim3(blocks(num_queries), batch),
             sizeof(acc_t) * kTile * (width_qk + width_v), query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
             value.data_ptr<scalar_t>(), optional_data<scalar_t>(center), out.data_ptr<scalar_t>(),
             log_normalizer.data_ptr<acc_t>(), known, num_queries, num_keys, width_qk, width_v,
             static_cast<acc_t>(scale));
    });
  });
}

void launch_softmax_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const c10::optional<at::Tensor>& center, const at::Tensor& out,
                             const at::Tensor& log_normalizer, const at::Tensor& delta, const at::Tensor& grad_query,
                             const at::Tensor& grad_key, const at::Tensor& grad_value, double scale) {
  const int batch = query.size(0), num_queries = query.size(1), num_keys = key.size(1);
  const int width_qk = query.size(2), width_v = value.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "fastnl_softmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* d_out = grad_out.data_ptr<scalar_t>();
    const auto* q = query.data_ptr<scalar_t>();
    const auto* k = key.data_ptr<scalar_t>();
    const auto* v = value.data_ptr<scalar_t>();
    const auto* log_normalizers = log_normalizer.data_ptr<acc_t>();
    auto* row_delta = delta.data_ptr<acc_t>();
    const int64_t num_rows = static_cast<int64_t>(batch) * num_queries;
    dispatch_width(std::max(width_qk, width_v), [&](auto bucket) {
      constexpr int kWidth = decltype(bucket)::value;
      launch(delta_kernel<kWidth, scalar_t, acc_t>, dim3(blocks(num_rows)), 0, d_out, out.data_ptr<scalar_t>(),
             optional_data<scalar_t>(center), row_delta, num_rows, width_v);
      launch(key_value_grad_kernel<kWidth, scalar_t, acc_t>, dim3(blocks(num_keys), batch),
             sizeof(acc_t) * kTile * (width_qk + width_v + 2), d_out, q, k, v, log_normalizers,
             static_cast<const acc_t*>(row_delta), grad_key.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
             num_queries, num_keys, width_qk, width_v, static_cast<acc_t>(scale));
      launch(query_grad_kernel<kWidth, scalar_t, acc_t>, dim3(blocks(num_queries), batch),
             sizeof(acc_t) * kTile * (width_qk + width_v), d_out, q, k, v, log_normalizers,
             static_cast<const acc_t*>(row_delta), grad_query.data_ptr<scalar_t>(), num_queries, num_keys, width_qk,
             width_v, static_cast<acc_t>(scale));
    });
  });
}

}  // namespace fastnl
