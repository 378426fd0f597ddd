// The shared math of nonlocal_math.h, compiled by the host compiler and run in plain
// loops over rows, so that the logic the CUDA kernels run is tested on machines with no
// GPU. The loops mirror the kernels' structure (query rows against key tiles, key rows
// against query tiles, kTile rows at a time); what they do not share is the staging of
// tiles in shared memory and the launch, which only a GPU can check. The width buckets
// are dispatched as the kernels' are, so each bucket's instantiation is tested here.
// CPU tensors, float32 or float64 (the accumulator types); entry points as the backend
// contract's softmax_forward / softmax_backward.
#include <algorithm>
#include <array>
#include <vector>

#include "checks.h"

namespace fastnl {
namespace {

constexpr int kTile = 64;  // as the CUDA kernels' key and query tiles

template <int kWidth, typename acc_t>
void forward_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const c10::optional<at::Tensor>& center, at::Tensor& out, at::Tensor& log_normalizer, bool known,
                  acc_t scale) {
  const int64_t batch = query.size(0), num_queries = query.size(1), num_keys = key.size(1);
  const int width_qk = query.size(2), width_v = value.size(2);
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t* keys = key.data_ptr<acc_t>() + b * num_keys * width_qk;
    const acc_t* values = value.data_ptr<acc_t>() + b * num_keys * width_v;
    for (int64_t i = 0; i < num_queries; ++i) {
      const int64_t row = b * num_queries + i;
      const acc_t* query_row = query.data_ptr<acc_t>() + row * width_qk;
      std::array<acc_t, kWidth> accumulator{};  // sized as the kernels' per-thread row
      OnlineRow<acc_t> state = online_start<acc_t>();
      for (int64_t start = 0; start < num_keys; start += kTile) {
        const int count = std::min<int64_t>(kTile, num_keys - start);
        const acc_t* key_tile = keys + start * width_qk;
        const acc_t* value_tile = values + start * width_v;
        if (known) {
          known_absorb_tile<kWidth>(query_row, key_tile, value_tile, count, width_qk, width_v, scale,
                                    log_normalizer.data_ptr<acc_t>()[row], accumulator.data());
        } else {
          online_absorb_tile<kWidth>(query_row, key_tile, value_tile, count, width_qk, width_v, scale, state,
                                     accumulator.data());
        }
      }
      if (!known) {
        log_normalizer.data_ptr<acc_t>()[row] = online_finish<kWidth>(state, accumulator.data(), width_v);
      }
      const acc_t* center_row = center.has_value() ? center->data_ptr<acc_t>() + row * width_v : nullptr;
      store_row<kWidth>(accumulator.data(), center_row, out.data_ptr<acc_t>() + row * width_v, width_v);
    }
  }
}

template <int kWidth, typename acc_t>
void backward_rows(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                   const c10::optional<at::Tensor>& center, const at::Tensor& out, const at::Tensor& log_normalizer,
                   at::Tensor& grad_query, at::Tensor& grad_key, at::Tensor& grad_value, acc_t scale) {
  const int64_t batch = query.size(0), num_queries = query.size(1), num_keys = key.size(1);
  const int width_qk = query.size(2), width_v = value.size(2);
  std::vector<acc_t> deltas(batch * num_queries);
  for (int64_t row = 0; row < batch * num_queries; ++row) {
    const acc_t* center_row = center.has_value() ? center->data_ptr<acc_t>() + row * width_v : nullptr;
    deltas[row] = softmax_delta<kWidth, acc_t>(grad_out.data_ptr<acc_t>() + row * width_v,
                                               out.data_ptr<acc_t>() + row * width_v, center_row, width_v);
  }
  const acc_t* log_normalizers = log_normalizer.data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t* queries = query.data_ptr<acc_t>() + b * num_queries * width_qk;
    const acc_t* grad_outs = grad_out.data_ptr<acc_t>() + b * num_queries * width_v;
    const acc_t* keys = key.data_ptr<acc_t>() + b * num_keys * width_qk;
    const acc_t* values = value.data_ptr<acc_t>() + b * num_keys * width_v;
    for (int64_t i = 0; i < num_queries; ++i) {
      acc_t* grad_query_row = grad_query.data_ptr<acc_t>() + (b * num_queries + i) * width_qk;
      for (int64_t start = 0; start < num_keys; start += kTile) {
        const int count = std::min<int64_t>(kTile, num_keys - start);
        query_grad_tile<kWidth>(queries + i * width_qk, grad_outs + i * width_v, log_normalizers[b * num_queries + i],
                                deltas[b * num_queries + i], keys + start * width_qk, values + start * width_v, count,
                                width_qk, width_v, scale, grad_query_row);
      }
    }
    for (int64_t j = 0; j < num_keys; ++j) {
      acc_t* grad_key_row = grad_key.data_ptr<acc_t>() + (b * num_keys + j) * width_qk;
      acc_t* grad_value_row = grad_value.data_ptr<acc_t>() + (b * num_keys + j) * width_v;
      for (int64_t start = 0; start < num_queries; start += kTile) {
        const int count = std::min<int64_t>(kTile, num_queries - start);
        key_value_grad_tile<kWidth>(keys + j * width_qk, values + j * width_v, queries + start * width_qk,
                                    grad_outs + start * width_v, log_normalizers + b * num_queries + start,
                                    deltas.data() + b * num_queries + start, count, width_qk, width_v, scale,
                                    grad_key_row, grad_value_row);
      }
    }
  }
}

void check_host_dtype(const at::Tensor& query) {
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "the host build of the CUDA math takes float32 or float64 (the accumulator types), got ",
              query.scalar_type());
}

}  // namespace

std::vector<at::Tensor> softmax_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                        const c10::optional<at::Tensor>& center,
                                        const c10::optional<at::Tensor>& log_normalizer, double scale) {
  auto outputs = prepare_forward(query, key, value, center, log_normalizer, at::kCPU);
  check_host_dtype(query);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_host_softmax_forward", [&] {
    dispatch_width(static_cast<int>(std::max(query.size(2), value.size(2))), [&](auto bucket) {
      forward_rows<decltype(bucket)::value, scalar_t>(query, key, value, center, outputs[0], outputs[1],
                                                      log_normalizer.has_value(), static_cast<scalar_t>(scale));
    });
  });
  return outputs;
}

std::vector<at::Tensor> softmax_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const c10::optional<at::Tensor>& center,
                                         const at::Tensor& out, const at::Tensor& log_normalizer, double scale) {
  auto grads = prepare_backward(grad_out, query, key, value, center, out, log_normalizer, at::kCPU);
  check_host_dtype(query);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastnl_host_softmax_backward", [&] {
    dispatch_width(static_cast<int>(std::max(query.size(2), value.size(2))), [&](auto bucket) {
      backward_rows<decltype(bucket)::value, scalar_t>(grad_out, query, key, value, center, out, log_normalizer,
                                                       grads[0], grads[1], grads[2], static_cast<scalar_t>(scale));
    });
  });
  return grads;
}

}  // namespace fastnl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nonlocal_math.h on the CPU: the CUDA kernels' arithmetic, checked without a GPU";
  m.def("softmax_forward", &fastnl::softmax_forward, "(out, log_normalizer) as the backend contract");
  m.def("softmax_backward", &fastnl::softmax_backward, "(grad_query, grad_key, grad_value)");
}
