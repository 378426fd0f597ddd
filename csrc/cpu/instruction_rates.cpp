// Instruction rates of this core, timed on independent register chains:
// - the FLOP rate of its bfloat16 dot product (vdpbf16ps) over its float32 FMA's. It
//   decides whether the native bfloat16 kernels pay without AMX: at 0.5 (a Sapphire
//   Rapids with AMX off) they ran slower than converting to float32, at 2 (a Zen 4)
//   1.2-1.7x faster.
// - the softmax kernels' own exponential (ShiftedExp, tile_math.h) per second. The
//   benchmarks put a kernel's exps at this rate beside its products at torch.mm's: the
//   least time this machine allows it. torch.exp, a general exp read from and written
//   to memory, ran ~10x slower here and is no measure of the kernels' exps.
#include "ops.h"
#include "tile_math.h"

#include <algorithm>
#include <chrono>
#include <cstdint>

#if defined(FASTNL_AVX512_BF16)
#include <immintrin.h>
#endif

namespace fastnl {
namespace {

constexpr int kChains = 12;       // more than latency x ports of any instruction timed
constexpr int64_t kSteps = 4096;  // x kChains steps a timing: tens of microseconds
constexpr int kRepeats = 7;       // timings taken; the fastest counts (others were interrupted)

// seconds for kSteps x kChains applications of `step` to independent float vectors
template <typename Step>
double time_chains(Step step) {
  Vec<float> chains[kChains];
  for (int chain = 0; chain < kChains; ++chain) chains[chain] = Vec<float>(0.5f + 0.01f * chain);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kSteps; ++i) {
#pragma GCC unroll 12
    for (auto& chain : chains) chain = step(chain);
  }
  const auto stop = std::chrono::steady_clock::now();
  Vec<float> total = chains[0];
  for (int chain = 1; chain < kChains; ++chain) total = total + chains[chain];
  float lanes[Vec<float>::size()];
  total.store(lanes);
  volatile float sink = lanes[0];  // the chains are used: the loop stays
  (void)sink;
  return std::chrono::duration<double>(stop - start).count();
}

}  // namespace

double bfloat16_dot_speedup() {
#if defined(FASTNL_AVX512_BF16)
  if (!bfloat16_native()) return 0.0;
  const Vec<float> a(1e-3f), b(2e-3f);
  const __m512bh a_pairs = (__m512bh)_mm512_set1_epi16(0x3a83), b_pairs = (__m512bh)_mm512_set1_epi16(0x3b03);
  double fma = 1e30, dot = 1e30;
  for (int repeat = 0; repeat < kRepeats; ++repeat) {
    fma = std::min(fma, time_chains([&](const Vec<float>& c) { return at::vec::fmadd(a, b, c); }));
    dot = std::min(dot,
                   time_chains([&](const Vec<float>& c) { return Vec<float>(_mm512_dpbf16_ps(c, a_pairs, b_pairs)); }));
  }
  return 2.0 * fma / dot;  // a vdpbf16ps does 32 products, an FMA 16
#else
  return 0.0;
#endif
}

double exp_rate() {
  // e^(x - 1): a chain started in (0, 1] stays there, never near a denormal
  const ShiftedExp<float> exp(Vec<float>(1.0f), Vec<float>(1.0f));
  double best = 1e30;
  for (int repeat = 0; repeat < kRepeats; ++repeat)
    best = std::min(best, time_chains([&](const Vec<float>& x) { return exp(x); }));
  return static_cast<double>(kSteps * kChains * Vec<float>::size()) / best;
}

}  // namespace fastnl
