// The FLOP rate of this core's bfloat16 dot product (vdpbf16ps) over its float32 FMA's,
// timed on independent register chains. It decides whether the native bfloat16
// kernels pay without AMX: at 0.5 (a Sapphire Rapids with AMX off) they ran slower
// than converting to float32, at 2 (a Zen 4) 1.2-1.7x faster.
#include "ops.h"

#include <algorithm>
#include <chrono>
#include <cstdint>

#if defined(FASTNL_AVX512_BF16)
#include <immintrin.h>
#endif

namespace fastnl {

#if defined(FASTNL_AVX512_BF16)
namespace {

constexpr int kChains = 12;       // more than latency x ports of either instruction
constexpr int64_t kSteps = 4096;  // x kChains instructions a timing: tens of microseconds

// seconds for kSteps x kChains applications of `step` to independent accumulators
template <typename Operand, typename Step>
double time_chains(Operand a, Operand b, Step step) {
  __m512 acc[kChains];
  for (auto& chain : acc) chain = _mm512_setzero_ps();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kSteps; ++i) {
#pragma GCC unroll 12
    for (auto& chain : acc) chain = step(chain, a, b);
  }
  const auto stop = std::chrono::steady_clock::now();
  __m512 total = acc[0];
  for (int chain = 1; chain < kChains; ++chain) total = _mm512_add_ps(total, acc[chain]);
  volatile float sink = _mm512_reduce_add_ps(total);  // the sums are used: the loop stays
  (void)sink;
  return std::chrono::duration<double>(stop - start).count();
}

}  // namespace
#endif

double bfloat16_dot_speedup() {
#if defined(FASTNL_AVX512_BF16)
  if (!bfloat16_native()) return 0.0;
  const __m512 a = _mm512_set1_ps(1e-3f), b = _mm512_set1_ps(2e-3f);
  const __m512bh a_pairs = (__m512bh)_mm512_set1_epi16(0x3a83), b_pairs = (__m512bh)_mm512_set1_epi16(0x3b03);
  double fma = 1e30, dot = 1e30;  // the fastest of several timings each: others were interrupted
  for (int repeat = 0; repeat < 7; ++repeat) {
    fma = std::min(fma, time_chains(a, b, [](__m512 c, __m512 x, __m512 y) { return _mm512_fmadd_ps(x, y, c); }));
    dot = std::min(
        dot, time_chains(a_pairs, b_pairs, [](__m512 c, __m512bh x, __m512bh y) { return _mm512_dpbf16_ps(c, x, y); }));
  }
  return 2.0 * fma / dot;  // a vdpbf16ps does 32 products, an FMA 16
#else
  return 0.0;
#endif
}

}  // namespace fastnl
