// Tile arithmetic shared by the CPU kernels: packing tiles into vector-padded
// buffers, one register-blocked small matrix product, and a fast exponential.
// Everything is written on at::vec::Vectorized, so one source serves AVX512, AVX2
// and the scalar fallback; the build chooses the capability (fastnl/backends/cpp.py).
// Built with FASTNL_AVX512_BF16 (-mavx512bf16), the products also take bfloat16
// operands: on AMX tiles through oneDNN's brgemm where the CPU has AMX, else on
// vdpbf16ps (Product<c10::BFloat16>; matmul_rows chooses).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(FASTNL_AVX512_BF16)
#include <ATen/native/CPUBlas.h>
#endif

namespace fastnl {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Scratch memory on cache-line boundaries. std::vector's 16-byte alignment would make
// most 64-byte vector loads straddle two lines, each costing two load slots: the
// small-width products of the kernels are load-bound, and ran at half speed.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), kAlignment)); }
  void deallocate(T* pointer, std::size_t) { ::operator delete(pointer, kAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};

template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// A vector-padded width: rows of packed tiles start on whole vectors.
template <typename T>
inline int64_t padded(int64_t width) {
  return round_up(width, Vec<T>::size());
}

// A row stride of at least `width` elements, padded to whole vectors and kept off
// multiples of 1 KiB: rows 4 KiB apart fall into the same L1 set, so a tile's few
// dozen packed rows would evict each other (8-way to 12-way caches).
template <typename T>
inline int64_t row_stride(int64_t width) {
  const int64_t stride = padded<T>(width);
  return (stride * static_cast<int64_t>(sizeof(T))) % 1024 == 0 ? stride + Vec<T>::size() : stride;
}

// 2^t for the shifted logits of the softmax kernels (t <= ~0), the hot spot of the
// flash loops; float relative error ~1e-7, no overflow handling (PyTorch's exp_u20
// spends a third of its instructions on it). NaN is carried through, so a NaN logit
// or statistic makes its row NaN as in torch.softmax; the kernels rely on that.
// AVX512: t = floor(t) + f; vreduceps gives f in [0, 1) exactly in one instruction, a
// degree-5 minimax polynomial gives 2^f, and scalef multiplies by 2^floor(t) (0 for
// t = -inf): 7 vector instructions. Elsewhere: t = n + f, |f| <= 1/2, with exp_u20's
// polynomial in f ln2, t clamped at -126 so 2^n stays a normal float (2^t below that
// is ~1e-38, not 0). double: the accurate exp2.
template <typename T>
inline Vec<T> fast_exp2(const Vec<T>& t) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const Vec<float> f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    Vec<float> poly(0.00187757664f);
    for (const float coefficient : {0.00898934047f, 0.0558263174f, 0.240153617f, 0.693153073f, 0.999999925f})
      poly = at::vec::fmadd(poly, f, Vec<float>(coefficient));
    return _mm512_scalef_ps(poly, t);
#else
    const Vec<float> input = at::vec::maximum(t, Vec<float>(-126.0f));  // keeps NaN
    const Vec<float> n = input.round();
    const Vec<float> r = (input - n) * Vec<float>(0.693147181f);
    Vec<float> poly(0.00828929059f);
    for (const float coefficient : {0.0418978221f, 0.166676521f, 0.499991506f, 0.999999701f, 1.0f})
      poly = at::vec::fmadd(poly, r, Vec<float>(coefficient));
    using Bits = Vec<int32_t>;
    const Bits two_to_n = (at::vec::convert_to_int_of_same_size(n) + Bits(127)) << Bits(23);
    return poly * at::vec::cast<float>(two_to_n);
#endif
  } else {
    return t.exp2();
  }
}

// log2(e) in T: e^x = 2^(x log2(e))
template <typename T>
constexpr T kLog2E = T(1.4426950408889634);

// e^x (fast_exp2's accuracy).
template <typename T>
inline Vec<T> fast_exp(const Vec<T>& x) {
  return fast_exp2(x * Vec<T>(kLog2E<T>));
}

// e^(a x - b) for the logits x of a row or lane with the softmax scale a and shift b
// (its max or log-normalizer): a and b are taken to base 2 once, so each logit costs
// one FMA before fast_exp2, as FlashAttention's softmax_scale_log2.
template <typename T>
class ShiftedExp {
 public:
  ShiftedExp() = default;
  ShiftedExp(const Vec<T>& scale, const Vec<T>& shift)
      : slope_(scale * Vec<T>(kLog2E<T>)), offset_(shift * Vec<T>(kLog2E<T>)) {}
  Vec<T> operator()(const Vec<T>& logit) const { return fast_exp2(at::vec::fmsub(logit, slope_, offset_)); }

 private:
  Vec<T> slope_, offset_;
};

// Flush-to-zero and denormals-are-zero on this thread while in scope (x86; elsewhere
// nothing). A trained affinity is sharp: many shifted logits fall below -87, where
// e^x is a denormal float, and on x86 every instruction that reads or writes a
// denormal takes a microcode assist, which slows the kernels several times over (the
// benchmarks' "logits x 10" group times it). Values below 1.2e-38 then count as 0, far
// below float32's resolution of the row sums (>= 1) they are added to. Worker threads are pooled, so
// the previous mode is restored on exit.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned int kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned int saved_;
#else
  FlushDenormals() = default;
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// How the products read their operands (the policy of matmul_tile). float and double:
// operands of the accumulation type, one broadcast element times a row of elements on
// fmadd. An operand B of a product contracted over k is a (k, lanes) row-major matrix.
template <typename T>
struct Product {
  using Acc = T;                                // accumulators, results and row statistics
  static constexpr int64_t kGroup = 1;          // consecutive k per lane of an operand
  static constexpr bool kScalesLogits = false;  // the softmax scale rides on the query
  using Operand = Vec<T>;
  static Operand load(const T* b) { return Vec<T>::loadu(b); }
  static Operand broadcast(const T* a) { return Vec<T>(*a); }
  static Vec<T> multiply_add(const Operand& a, const Operand& b, const Vec<T>& acc) {
    return at::vec::fmadd(a, b, acc);
  }
};

#if defined(FASTNL_AVX512_BF16)
// bfloat16: pairs of consecutive k in each 32-bit lane, a broadcast pair times a row of
// pairs on vdpbf16ps (float32 products and sums, as FlashAttention's tensor cores);
// B group g, lane c holds (B[2g, c], B[2g + 1, c]). The scale multiplies the float32
// logits, since rounding the scaled query to bf16 again would add an error.
template <>
struct Product<c10::BFloat16> {
  using Acc = float;
  static constexpr int64_t kGroup = 2;
  static constexpr bool kScalesLogits = true;
  using Operand = __m512bh;
  static Operand load(const c10::BFloat16* b) { return (__m512bh)_mm512_loadu_si512(b); }
  static Operand broadcast(const c10::BFloat16* a) {
    int32_t pair;
    std::memcpy(&pair, a, sizeof(pair));
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  // the pair (a[0], 0): an odd contraction's last k, whose partner may lie past the tensor
  static Operand broadcast_first(const c10::BFloat16* a) { return (__m512bh)_mm512_set1_epi32(a->x); }
  static Vec<float> multiply_add(const Operand& a, const Operand& b, const Vec<float>& acc) {
    return _mm512_dpbf16_ps(acc, a, b);
  }
  // (first, second) rounded to nearest even and interleaved: 16 lane pairs (32 bf16) at
  // dst. vcvtne2ps2bf16 and vcvtneps2bf16 round as c10::BFloat16 does (NaN stays NaN;
  // denormals go to zero, as in the kernels' flushed arithmetic); with a vpermw they
  // beat the integer rounding they replaced (bf16 backward at B=128, N=256, D=16, E=16:
  // 5.5 -> 5.0 ms, Sapphire Rapids with AMX).
  static void store_pairs(const Vec<float>& first, const Vec<float>& second, c10::BFloat16* dst) {
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(second, first);  // first's 16 low, second's high
    _mm512_storeu_si512(dst, interleave_halves(halves));
  }
  // rows `first` and `second` (nullptr: zeros) of `count` bf16 in pairs: 2 * count at dst
  static void store_row_pairs(const c10::BFloat16* first, const c10::BFloat16* second, int64_t count,
                              c10::BFloat16* dst) {
    for (int64_t c = 0; c < count; c += 16) {
      const int64_t n = std::min<int64_t>(16, count - c);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      const __m256i low = _mm256_maskz_loadu_epi16(mask, first + c);
      const __m256i high = second ? _mm256_maskz_loadu_epi16(mask, second + c) : _mm256_setzero_si256();
      const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
      _mm512_mask_storeu_epi16(dst + 2 * c, static_cast<__mmask32>((uint64_t(1) << (2 * n)) - 1),
                               interleave_halves(halves));
    }
  }
  // 32 bf16 as (x[0], x[16], x[1], x[17], ...): the low half's elements paired with the high's
  static __m512i interleave_halves(const __m512i& halves) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                                6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, halves);
  }
  // x rounded to nearest even: 16 bf16 at dst
  static void store_rounded(const Vec<float>& x, c10::BFloat16* dst) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
  }
};
#endif

template <typename T>
using Acc = typename Product<T>::Acc;

// dst (cols, ld) = src (rows, cols) transposed, plainly: the row-major A of a product
// contracted over src's rows; columns rows..ld zero.
template <typename T>
inline void transpose_rows(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  constexpr int64_t kBlock = 32;  // at::vec's bf16 transpose takes at most 32 x 32
  for (int64_t r = 0; r < rows; r += kBlock)
    for (int64_t c = 0; c < cols; c += kBlock)
      at::vec::transpose_mxn<T>(src + r * cols + c, cols, dst + c * ld + r, ld, std::min(kBlock, rows - r),
                                std::min(kBlock, cols - c));
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, T(0));
}

// dst = src (rows, cols) transposed, as the B operand of a product contracted over
// cols: (cols, ld) in groups of kGroup, lanes rows..ld and a missing last k zero. A
// group of consecutive elements moves as one word (bf16 pairs as 32 bits), so unless
// the last group is incomplete this is transpose_rows of words.
template <typename T>
inline void pack_transposed(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  constexpr int64_t G = Product<T>::kGroup;
  if (cols % G == 0) {
    using Word = std::conditional_t<G == 1, T, float>;
    static_assert(G == 1 || sizeof(Word) == G * sizeof(T), "a group is one 32-bit word");
    transpose_rows(reinterpret_cast<const Word*>(src), rows, cols / G, reinterpret_cast<Word*>(dst), ld);
    return;
  }
  for (int64_t c = 0; c < round_up(cols, G); ++c) {
    T* out = dst + c / G * ld * G + c % G;
    for (int64_t r = 0; r < rows; ++r) out[r * G] = c < cols ? src[r * cols + c] : T(0);
    for (int64_t r = rows; r < ld; ++r) out[r * G] = T(0);
  }
}

// dst = src (rows, cols), as the operand of a product contracted over rows: (rows, ld)
// in groups of kGroup, lanes cols..ld and a missing last row zero.
template <typename T>
inline void pack_rows(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  constexpr int64_t G = Product<T>::kGroup;
  for (int64_t r = 0; r < rows; r += G) {
    T* out = dst + r * ld;
    if constexpr (G == 1) {
      std::copy(src + r * cols, src + (r + 1) * cols, out);
    } else {
      Product<T>::store_row_pairs(src + r * cols, r + 1 < rows ? src + (r + 1) * cols : nullptr, cols, out);
    }
    std::fill(out + cols * G, out + ld * G, T(0));
  }
}

// Register blocks of the product: AVX512 has 32 vector registers, AVX2 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kWideVecs = 4;
#else
constexpr int kWideVecs = 2;
#endif
constexpr int kWideRows = 4;
constexpr int kNarrowRows = 8;

// A loaded float32 operand row, held in its register. GCC otherwise folds the load into
// each FMA that reads the row, so each of the ROWS rows loads it again: 16 vector loads
// and 4 broadcasts per 16 FMAs in a 4 x 4 block, not 4 and 4. A Zen 4 issues one
// 512-bit load per cycle, so the products were load-bound. With the row held, the float32
// fwd and bwd each ran 1.11-1.19x faster at B=128 and N 64-1024. bf16 rows went to
// registers already (vdpbf16ps).
template <typename V>
inline V in_register(V value) {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vec<float>>) {
    __m512 raw = value;
    asm("" : "+v"(raw));  // an empty asm that "changes" raw: its value must be in a register
    return raw;
  }
#endif
  return value;
}

// C[r, :] (+)= sum_k A(r, k) B[k, :] for ROWS rows and VECS vectors of columns, all
// in registers. A is read one group of k at a time through strides (a_col from one
// group to the next), so a transposed A costs nothing; DEPTH > 0 fixes the depth at
// compile time (the small widths D).
template <typename T, int ROWS, int VECS, int DEPTH>
inline void product_block(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, Acc<T>* c, int64_t ldc,
                          int64_t depth, bool accumulate) {
  using P = Product<T>;
  constexpr int64_t L = Vec<Acc<T>>::size(), G = P::kGroup;
  Vec<Acc<T>> acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v)
      acc[r][v] = accumulate ? Vec<Acc<T>>::loadu(c + r * ldc + v * L) : Vec<Acc<T>>(Acc<T>(0));
  const int64_t count = DEPTH > 0 ? DEPTH : depth;
  const auto step = [&](int64_t k, auto broadcast) {
    typename P::Operand row[VECS];
    for (int v = 0; v < VECS; ++v) row[v] = in_register(P::load(b + (k * ldb + v * L) * G));
    for (int r = 0; r < ROWS; ++r) {
      const typename P::Operand coefficient = broadcast(a + r * a_row + k * a_col);
      for (int v = 0; v < VECS; ++v) acc[r][v] = P::multiply_add(coefficient, row[v], acc[r][v]);
    }
  };
  for (int64_t k = 0; k < count / G; ++k) step(k, [](const T* at) { return P::broadcast(at); });
  if constexpr (G > 1)
    if (count % G) step(count / G, [](const T* at) { return P::broadcast_first(at); });
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v].store(c + r * ldc + v * L);
}

template <typename T, int ROWS, int VECS, int DEPTH>
inline void product_rows(int64_t rows, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, Acc<T>* c,
                         int64_t ldc, int64_t depth, bool accumulate) {
  int64_t r = 0;
  for (; r + ROWS <= rows; r += ROWS)
    product_block<T, ROWS, VECS, DEPTH>(a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc, depth, accumulate);
  for (; r < rows; ++r)
    product_block<T, 1, VECS, DEPTH>(a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc, depth, accumulate);
}

// C (rows, width) (+)= A (rows, depth) B (depth, width), A's group k of row r at
// a + r * a_row + k * a_col (a_col = kGroup: A's rows in place, k contiguous) and B
// packed as Product describes, ldb lanes a row. width is a multiple of the vector
// size, and B, C rows are that wide (padded).
template <typename T, int DEPTH = 0>
inline void matmul_tile(int64_t rows, int64_t width, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                        const T* b, int64_t ldb, Acc<T>* c, int64_t ldc, bool accumulate) {
  constexpr int64_t L = Vec<Acc<T>>::size(), G = Product<T>::kGroup;
  int64_t column = 0;
  for (; column + kWideVecs * L <= width; column += kWideVecs * L)
    product_rows<T, kWideRows, kWideVecs, DEPTH>(rows, a, a_row, a_col, b + column * G, ldb, c + column, ldc, depth,
                                                 accumulate);
#if defined(CPU_CAPABILITY_AVX512)
  // two vectors left (widths of 32 floats): 8 x 2 accumulators, 10 loads per 16 FMAs
  // where two 8 x 1 passes took 18
  for (; column + 2 * L <= width; column += 2 * L)
    product_rows<T, kNarrowRows, 2, DEPTH>(rows, a, a_row, a_col, b + column * G, ldb, c + column, ldc, depth,
                                           accumulate);
#endif
  for (; column < width; column += L)
    product_rows<T, kNarrowRows, 1, DEPTH>(rows, a, a_row, a_col, b + column * G, ldb, c + column, ldc, depth,
                                           accumulate);
}

// The lane sums of 16 vectors of 16 lanes, as one vector: lane v = the sum of the
// lanes of vectors[v]. A butterfly of 15 interleave-and-add steps instead of 16
// separate reductions; after its four levels, lane L holds the sum of the input at
// position L with its four bits reversed, so the inputs go in in that order.
template <typename T>
inline Vec<T> lane_sums_16(const Vec<T> (&vectors)[16]) {
  static_assert(Vec<T>::size() == 16, "a butterfly over 16 lanes");
  Vec<T> level[16];
  for (int v = 0; v < 16; ++v) level[v] = vectors[((v & 1) << 3) | ((v & 2) << 1) | ((v & 4) >> 1) | ((v & 8) >> 3)];
  for (int count = 16; count > 1; count /= 2) {
    for (int i = 0; i < count / 2; ++i) {
      const auto halves = at::vec::interleave2(level[2 * i], level[2 * i + 1]);
      level[i] = halves.first + halves.second;
    }
  }
  return level[0];
}

// C (rows, 8) += A (rows, width) B^T (width, 8), contracted along the vectors, with
// width a whole number of vectors: for outputs of 8 floats, where matmul_tile would
// spend half of every 16-lane vector on padding. Two rows x 8 columns = 16 register
// accumulators per block, reduced across lanes once per call into the two rows of C
// (16 consecutive floats) with one vector add.
template <typename T>
inline void matmul_lanes_8(int64_t rows, int64_t width, const T* a, int64_t lda, const T* b, int64_t ldb, T* c) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t r = 0; r < rows; r += 2) {
    const int64_t pair = std::min<int64_t>(2, rows - r);
    Vec<T> acc[16];
    for (auto& vector : acc) vector = Vec<T>(T(0));
    for (int64_t col = 0; col < width; col += L) {
      const Vec<T> first = Vec<T>::loadu(a + r * lda + col);
      const Vec<T> second = pair == 2 ? Vec<T>::loadu(a + (r + 1) * lda + col) : Vec<T>(T(0));
      for (int d = 0; d < 8; ++d) {
        const Vec<T> column = Vec<T>::loadu(b + d * ldb + col);
        acc[d] = at::vec::fmadd(first, column, acc[d]);
        acc[8 + d] = at::vec::fmadd(second, column, acc[8 + d]);
      }
    }
    (Vec<T>::loadu(c + r * 8, pair * 8) + lane_sums_16(acc)).store(c + r * 8, pair * 8);
  }
}

// Whether the bfloat16 products of a kernel call run on AMX tiles: oneDNN packs bf16
// for AMX here (the CPU has it, the OS allows it, and torch.backends.mkldnn is enabled;
// turning that off selects vdpbf16ps), and D, E are even, so that no contraction of
// the kernels' row operands ends in half a pair.
template <typename T>
inline bool amx_products(int64_t width_qk, int64_t width_v) {
#if defined(FASTNL_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return width_qk % 2 == 0 && width_v % 2 == 0 && at::native::cpublas::could_pack(at::kBFloat16);
#endif
  return false;
}

// C (rows, width) (+)= A (rows, depth) B (packed as Product describes, ldb lanes a
// row), A's group k of row r at a + r * a_row + k * a_col: matmul_tile, or with `amx`
// one oneDNN brgemm on AMX tiles, whose bf16 B layout (depth / 2, ldb, 2) is Product's.
// brgemm reads A row-major only (a_col = kGroup, lda = a_row), and rounds an odd depth
// up: A's column past it must be zero, as B's missing last k is.
template <typename T, int DEPTH = 0>
inline void matmul_rows(bool amx, int64_t rows, int64_t width, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                        const T* b, int64_t ldb, Acc<T>* c, int64_t ldc, bool accumulate) {
#if defined(FASTNL_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (amx) {
      TORCH_INTERNAL_ASSERT(a_col == Product<T>::kGroup, "brgemm reads A row-major");
      at::native::cpublas::brgemm(rows, width, round_up(depth, 2), a_row, ldb, ldc, accumulate, a, b, c, true);
      return;
    }
  }
#endif
  matmul_tile<T, DEPTH>(rows, width, depth, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

// The strides matmul_rows reads an A operand through: group k of row r at r * row + k * col.
struct Strides {
  int64_t row, col;
};

// X (rows, cols) packed at dst as the A operand X^T of a product contracted over X's
// rows (dV^T = dO^T P), for bf16 products; contracted_rows_strides says how it is read.
// brgemm (amx) reads A row-major: X^T (cols, ld), zero past X's rows (transpose_rows).
// vdpbf16ps reads its pairs of k through any strides: X's rows in pairs (pack_rows,
// (rows / 2, cols, 2)), two rows interleaved a vector at a time where the transpose
// moved single elements. With pack_rows vectorized too, the bf16 backward at B=128 ran
// 1.05x faster at N=256, D=16, 1.12x at N=64, D=32, 0.98x at N=1024, D=8 (paired, Zen 4).
template <typename T>
inline void pack_contracted_rows(bool amx, const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  if (amx) {
    transpose_rows(src, rows, cols, dst, ld);
  } else {
    pack_rows(src, rows, cols, dst, cols);
  }
}

template <typename T>
inline Strides contracted_rows_strides(bool amx, int64_t cols, int64_t ld) {
  constexpr int64_t G = Product<T>::kGroup;
  return amx ? Strides{ld, G} : Strides{G, G * cols};
}

// Hands the AMX tile state back on scope exit (brgemm leaves it configured), as ATen's
// flash attention does after its loops.
class ReleaseTiles {
 public:
  explicit ReleaseTiles(bool amx) : amx_(amx) {}
  ~ReleaseTiles() {
#if defined(FASTNL_AVX512_BF16)
    if (amx_) at::native::cpublas::brgemm_release(true);
#endif
  }
  ReleaseTiles(const ReleaseTiles&) = delete;
  ReleaseTiles& operator=(const ReleaseTiles&) = delete;

 private:
  [[maybe_unused]] bool amx_;
};

}  // namespace fastnl
