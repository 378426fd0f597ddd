// What the softmax kernel's forward (softmax_forward.cpp) and backward
// (softmax_backward.cpp) share: their tiles, the operand types they dispatch on, the
// shapes they take.
#pragma once

#include "tile_math.h"

#include <ATen/Dispatch.h>

#include <cstdint>
#include <type_traits>

namespace fastnl {

// rows x keys per tile, the fastest in a sweep of benchmarks/test_cpp_bench.py at B=16,
// N=1024, D=8, E=16
constexpr int64_t kForwardQueryTile = 64;
constexpr int64_t kForwardKeyTile = 128;
constexpr int64_t kBackwardQueryTile = 32;
constexpr int64_t kBackwardKeyTile = 128;
// bf16 products, on AMX or vdpbf16ps: larger tiles. Each brgemm call on AMX has a few
// hundred ns of fixed cost and a tile configuration at every change of shape; bf16 at
// B=128, N=256, D=16, E=16, backward: 4.5 ms at 32 x 256, 4.3 at 64 x 256, 3.95 at
// 128 x 256 and 256 x 256; forward: 2.3 ms at 64 x 128, 2.1-2.3 at 64 x 256, 2.0-2.1 at
// 128 x 256 (N = 1024, D = 8: 27.6 -> 25.0 ms; Sapphire Rapids). On vdpbf16ps the
// backward's dV^T, dK^T contract over the query tile, its dQ over the key tile: deeper
// contractions load and store their accumulators less often. The backward on a Zen 4
// without AMX, 128 x 256 against 32 x 128 (paired): 1.13x at N=256, D=16; 1.12x at
// N=1024, D=8; 1.08x at N=64, D=32.
constexpr int64_t kBfloat16ForwardQueryTile = 128;
constexpr int64_t kBfloat16ForwardKeyTile = 256;
constexpr int64_t kBfloat16BackwardQueryTile = 128;
constexpr int64_t kBfloat16BackwardKeyTile = 256;
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
  int64_t batch, queries, keys, width_qk, width_v;  // B, N, M, D, E
};

// The softmax scale as ShiftedExp applies it: 1 where the query came in scaled.
template <bool SCALE, typename A>
inline Vec<A> exp_scale(A scale) {
  return Vec<A>(SCALE ? scale : A(1));
}

// The operand types of the kernels: float32, float64, and bfloat16 where built for it.
#if defined(FASTNL_AVX512_BF16)
#define FASTNL_DISPATCH_OPERANDS(type, name, ...) AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, type, name, __VA_ARGS__)
#else
#define FASTNL_DISPATCH_OPERANDS(type, name, ...) AT_DISPATCH_FLOATING_TYPES(type, name, __VA_ARGS__)
#endif

}  // namespace fastnl
