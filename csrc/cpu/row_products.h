// Products over position rows (R, C), contiguous, shared by the modules' row operators
// (batch_norm.cpp, linear_parts.cpp): moments (column sums and cross products, summed
// in fixed chunks for results bitwise identical on any thread count) and projections
// x W + b (+ added) with the accumulators in registers, float32 (float64 for float64
// rows) or bfloat16 operands on vdpbf16ps.
#pragma once

#include "tile_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace fastnl {

constexpr int64_t kChunkRows = 256;  // rows a reduction work item sums at a time
// at most this many partial sums across a reduction's work items (16 MB in float32):
// wide operands get work items of several kChunkRows
constexpr int64_t kPartialSums = int64_t(1) << 22;

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

#if defined(FASTNL_AVX512_BF16)
// sums (width) += the column sums of `rows` rows in pairs (pack_rows, ((rows + 1) / 2, width, 2)):
// each pair times (1, 1) on vdpbf16ps, exact products in float32 sums.
inline void pair_sums(const c10::BFloat16* pairs, int64_t rows, int64_t width, float* sums) {
  constexpr int64_t L = Vec<float>::size();
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bfloat16 1.0
  for (int64_t p = 0; p < width; p += L) {
    const int64_t n = std::min(L, width - p);
    const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << (2 * n)) - 1);
    Vec<float> total = Vec<float>::loadu(sums + p, n);
    for (int64_t g = 0; g < (rows + 1) / 2; ++g)
      total = _mm512_dpbf16_ps(total, (__m512bh)_mm512_maskz_loadu_epi16(mask, pairs + 2 * (g * width + p)), ones);
    total.store(sums + p, n);
  }
}
#endif

// Rows of a matrix a (R, P) as blocks of columns a_k (R, P_k), each contiguous: the
// moments' left operand, read part by part where joining the blocks would copy them.
template <typename T>
struct ColumnBlocks {
  std::vector<const T*> data;
  std::vector<int64_t> widths;
  int64_t width() const { return std::accumulate(widths.begin(), widths.end(), int64_t(0)); }
};

// sum_a = the sum of the rows of a - a_shift (P), cross = (a - a_shift)^T (b - b_shift)
// (P, Q), for rows a (R, P) in column blocks and b (R, Q); the shifts may be null. Each
// chunk of rows (kChunkRows, or a multiple of it where the chunks' partial sums would
// pass kPartialSums): per block, its sums and its kCross rows of products at a time in
// registers (add_cross), into the chunk's own partial sums, added in chunk order.
// bfloat16_products (bfloat16 rows, no shifts): each block's rows and b's in pairs
// (pack_rows) and its products a matmul_tile on vdpbf16ps contracted over the rows, the
// products of bf16 pairs exact in the float32 sums.
template <typename T, typename A>
void moments_kernel(const ColumnBlocks<T>& a, const A* a_shift, const T* b, const A* b_shift, A* sum_a, A* cross,
                    int64_t R, int64_t Q, bool bfloat16_products = false) {
  constexpr int64_t L = Vec<A>::size();
  const int64_t ld = padded<A>(Q), P = a.width();
  // per block: its sums and product rows padded to kCross, offsets in the chunk's partial
  std::vector<int64_t> padded_widths, offsets{0};
  for (const int64_t width : a.widths) {
    padded_widths.push_back(round_up(width, kCross));
    offsets.push_back(offsets.back() + padded_widths.back() * (1 + ld));
  }
  const int64_t widest = *std::max_element(padded_widths.begin(), padded_widths.end());
  const int64_t size = offsets.back();
  const int64_t steps =
      std::max<int64_t>(1, ((R + kChunkRows - 1) / kChunkRows * size + kPartialSums - 1) / kPartialSums);
  const int64_t chunk_rows = steps * kChunkRows, chunks = (R + chunk_rows - 1) / chunk_rows;
  Buffer<A> partial(chunks * size);  // zero
#if defined(FASTNL_AVX512_BF16)
  constexpr bool kPairs = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool kPairs = false;
#endif
  const bool pairs = kPairs && bfloat16_products && !a_shift && !b_shift;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    Buffer<A> a_scratch(pairs ? 0 : kChunkRows * widest), b_scratch(pairs ? 0 : kChunkRows * ld);  // zero padding
    Buffer<T> a_pairs(pairs ? kChunkRows * widest : 0), b_pairs(pairs ? kChunkRows * ld : 0);
    for (int64_t step = begin * steps; step < std::min(end * steps, (R + kChunkRows - 1) / kChunkRows); ++step) {
      const int64_t chunk = step / steps, r0 = step * kChunkRows, rows = std::min(R, r0 + kChunkRows) - r0;
      const A* w = nullptr;
      if constexpr (kPairs) {
        if (pairs) pack_rows(b + r0 * Q, rows, Q, b_pairs.data(), ld);
      }
      if (!pairs) w = rows_as(b, r0, rows, Q, ld, b_shift, b_scratch);
      int64_t column = 0;
      for (size_t k = 0; k < a.data.size(); ++k) {
        const int64_t width = a.widths[k], Pp = padded_widths[k];
        A* sums = partial.data() + chunk * size + offsets[k];
        A* products = sums + Pp;
        if constexpr (kPairs) {
          if (pairs) {
            constexpr int64_t G = Product<T>::kGroup;
            pack_rows(a.data[k] + r0 * width, rows, width, a_pairs.data(), width);
            pair_sums(a_pairs.data(), rows, width, sums);
            matmul_tile<T>(width, ld, rows, a_pairs.data(), G, G * width, b_pairs.data(), ld, products, ld,
                           step % steps > 0);
          }
        }
        if (!pairs) {
          // the block's rows as A (Pp apart, padding zero or a previous block's: those
          // sums and product rows are never read)
          const A* x = rows_as(a.data[k], r0, rows, width, Pp, a_shift ? a_shift + column : nullptr, a_scratch);
          for (int64_t p = 0; p < Pp; p += L) {
            Vec<A> total(A(0));
            for (int64_t i = 0; i < rows; ++i) total = total + Vec<A>::loadu(x + i * Pp + p);
            (Vec<A>::loadu(sums + p) + total).store(sums + p);
          }
          for (int64_t p = 0; p < Pp; p += kCross)
            for (int64_t c = 0; c < ld; c += L) add_cross(x + p, Pp, w + c, ld, rows, products + p * ld + c, ld);
        }
        column += width;
      }
    }
  });
  std::fill(sum_a, sum_a + P, A(0));
  std::fill(cross, cross + P * Q, A(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    int64_t column = 0;
    for (size_t k = 0; k < a.data.size(); ++k) {
      const A* sums = partial.data() + chunk * size + offsets[k];
      const A* products = sums + padded_widths[k];
      for (int64_t p = 0; p < a.widths[k]; ++p) {
        sum_a[column + p] += sums[p];
        for (int64_t q = 0; q < Q; ++q) cross[(column + p) * Q + q] += products[p * ld + q];
      }
      column += a.widths[k];
    }
  }
}

// moments_kernel of rows a (R, P) in one block.
template <typename T, typename A>
void moments_kernel(const T* a, const A* a_shift, const T* b, const A* b_shift, A* sum_a, A* cross, int64_t R,
                    int64_t P, int64_t Q, bool bfloat16_products = false) {
  moments_kernel<T, A>(ColumnBlocks<T>{{a}, {P}}, a_shift, b, b_shift, sum_a, cross, R, Q, bfloat16_products);
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

}  // namespace fastnl
