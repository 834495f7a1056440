// AVX2 micro-kernels (6 rows x 16 output channels, 12 ymm accumulators).
//
// This file is compiled for AVX2+FMA via the target pragma below (like -mavx2 -mfma, but only for
// these functions), so the rest of the extension still loads on CPUs without AVX2; the dispatcher
// calls these only after cpu_has_avx2_fma().
//
// Exactness (no VNNI here, so no vpdpbusd):
//  * W8: vpmaddwd on int16-widened operands: |x*q| pair sums < 2^16 * 2, exact into int32.
//  * W4: vpmaddubsw(x, q) with x in [0,255] activations in the unsigned slot (int8 ones flipped
//        to x + 128, corrected by the driver with 128 * colsum) and q in [-8,7] signed weights:
//        x0*q0 + x1*q1 in [2*255*(-8), 2*255*7] = [-4080, 3570], no saturation; 8 steps
//        accumulate in int16 (8 * -4080 = -32640 >= -32768) before vpmaddwd(.,1) widens to int32.
//  * W2: q in [-2,1]: pair in [-1020, 510], 32 steps in int16 (-32640). Exact.
//        (Until session 6 the weights took the unsigned slot as u = q + 2^(bits-1) and the
//        activations were shifted to int8, which needed a row sum of every activation row.)
//  * W7 (weights in [-64, 63], the 8-bit blob layout): vpmaddubsw(x, q) likewise:
//        |x0*q0 + x1*q1| <= 2*255*64 = 32640 < 32767, exact for one step;
//        vpmaddwd(., 1) widens at once. 3 vector ops per 32 MACs instead of W8's 4.
//  Full-range u8 x s8 on vpmaddubsw (what ORT does) can reach 2*255*128 = 65280 and saturates:
//  that is why the full-range W8 kernel widens to int16 instead.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "qgemm.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LCPAQ_HAVE_AVX2_TU 1
#endif

#include "epilogue.h"
#ifdef LCPAQ_HAVE_AVX2_TU
#include "tile256.h"
#endif

namespace lcpaq {

#ifdef LCPAQ_HAVE_AVX2_TU

static inline __m256i bcast32(const void* p) {
  // vbroadcastss from memory is a pure load (no shuffle uop)
  return _mm256_castps_si256(_mm256_broadcast_ss(static_cast<const float*>(p)));
}

void epilogue_row_avx2(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  epilogue_row_impl(c, n, e, out);
}
void widen_row_avx2(int16_t* d, const uint8_t* s, int64_t n, bool xs8) { widen_row_impl(d, s, n, xs8); }
// rows of 32 bytes or more end with one 32-byte chunk overlapping the previous one (the same
// bytes written twice) instead of a scalar tail: im2col and short-K rows are mostly tail
void flip_row_avx2(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip) {
  if (n < 32) return flip_row_impl(d, s, n, flip);
  const __m256i f = _mm256_set1_epi8(static_cast<char>(flip));
  auto one = [&](int64_t i) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_xor_si256(v, f));
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) one(i);
  if (i < n) one(n - 32);
}
void quantize_row_avx2(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                  float hi) {
  quantize_row_impl(s, d, n, sc, zp, lo, hi);
}

void decode_w8_avx2(const uint8_t* W, int64_t steps, uint8_t* out) {
  for (int64_t s = 0; s < steps; ++s) {
    const __m128i* w = reinterpret_cast<const __m128i*>(W + s * 32);
    __m256i* o = reinterpret_cast<__m256i*>(out + s * kDecStep);
    _mm256_storeu_si256(o, _mm256_cvtepi8_epi16(_mm_loadu_si128(w)));
    _mm256_storeu_si256(o + 1, _mm256_cvtepi8_epi16(_mm_loadu_si128(w + 1)));
  }
}

// signed q = u - OFF (OFF = 2^(bits-1)): the int8 weight operand of every 4/2-bit kernel
template <int OFF>
static inline void decode_w4_t(const uint8_t* W, int64_t steps, uint8_t* out) {
  const __m256i m = _mm256_set1_epi8(0x0F), off = _mm256_set1_epi8(OFF);
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + s * 32));
    __m256i* o = reinterpret_cast<__m256i*>(out + s * kDecStep);
    _mm256_storeu_si256(o, _mm256_sub_epi8(_mm256_and_si256(v, m), off));
    _mm256_storeu_si256(o + 1, _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), off));
  }
}

template <int OFF>
static inline void decode_w2_t(const uint8_t* W, int64_t steps, uint8_t* out) {
  const __m256i m = _mm256_set1_epi8(0x03), off = _mm256_set1_epi8(OFF);
  for (int64_t s = 0; s < steps; s += 2) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + (s / 2) * 32));
    __m256i* o = reinterpret_cast<__m256i*>(out + s * kDecStep);
    _mm256_storeu_si256(o, _mm256_sub_epi8(_mm256_and_si256(v, m), off));
    _mm256_storeu_si256(o + 1, _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 2), m), off));
    _mm256_storeu_si256(o + 2, _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), off));
    _mm256_storeu_si256(o + 3, _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 6), m), off));
  }
}

void decode_w4s_avx2(const uint8_t* W, int64_t steps, uint8_t* out) { decode_w4_t<8>(W, steps, out); }
void decode_w2s_avx2(const uint8_t* W, int64_t steps, uint8_t* out) { decode_w2_t<2>(W, steps, out); }

#define LCPAQ_AI inline __attribute__((always_inline))

// One W8 k-step (2 k-values) of the 6x16 tile. Row pointers: rows 0-2 at a0 + {0,1,2}*lda, rows
// 3-5 at a3 + {0,1,2}*lda, so every broadcast is base + index*scale + displacement (no address
// arithmetic in the unrolled loop: on this core the 6-wide dispatch, not the multipliers, was the
// limit of the rolled loop).
static LCPAQ_AI void w8_step(__m256i (&c)[kMR][2], const uint8_t* a0, const uint8_t* a3,
                             int64_t lda, const uint8_t* w) {
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    const __m256i a = bcast32((r < 3 ? a0 : a3) + (r % 3) * lda);
    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(a, w0));
    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(a, w1));
    __asm__("" : "+x"(c[r][0]), "+x"(c[r][1]));  // no reassociation across steps
  }
}

void micro_w8_avx2(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                   int64_t ldc) {
  tile_6x16_256(A, lda, Wd, steps, C, ldc,
                [lda](__m256i(&c)[kMR][2], const uint8_t* a0, const uint8_t* a3, const uint8_t* w)
                    __attribute__((always_inline)) { w8_step(c, a0, a3, lda, w); });
}

void decode_w7_avx2(const uint8_t* W, int64_t steps, int64_t avail, uint8_t* out) {
  const __m128i z = _mm_setzero_si128();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* s0 = W + 2 * s * 32;
    const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0));
    const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 16));
    const bool has1 = 2 * s + 1 < avail;
    const __m128i b0 = has1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 32)) : z;
    const __m128i b1 = has1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 48)) : z;
    // per column: k0 k1 from step 2s, k2 k3 from step 2s+1 (16-bit units interleaved)
    __m256i* o = reinterpret_cast<__m256i*>(out + s * kDecStep);
    _mm256_storeu_si256(o, _mm256_set_m128i(_mm_unpackhi_epi16(a0, b0), _mm_unpacklo_epi16(a0, b0)));
    _mm256_storeu_si256(o + 1, _mm256_set_m128i(_mm_unpackhi_epi16(a1, b1), _mm_unpacklo_epi16(a1, b1)));
  }
}

static LCPAQ_AI void w7_step(__m256i (&c)[kMR][2], const uint8_t* a0, const uint8_t* a3,
                             int64_t lda, const uint8_t* w, __m256i ones) {
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    const __m256i a = bcast32((r < 3 ? a0 : a3) + (r % 3) * lda);
    const __m256i p0 = _mm256_maddubs_epi16(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    const __m256i p1 =
        _mm256_maddubs_epi16(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(p0, ones));
    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(p1, ones));
    __asm__("" : "+x"(c[r][0]), "+x"(c[r][1]));
  }
}

void micro_w7_avx2(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                   int64_t ldc) {
  const __m256i ones = _mm256_set1_epi16(1);
  tile_6x16_256(A, lda, Wd, steps, C, ldc,
                [lda, ones](__m256i(&c)[kMR][2], const uint8_t* a0, const uint8_t* a3, const uint8_t* w)
                    __attribute__((always_inline)) { w7_step(c, a0, a3, lda, w, ones); });
}

// C += acc widened (vpmaddwd with ones sums each column's two int16 partial sums)
static LCPAQ_AI void flush16(const __m256i (&acc)[kMR][2], int32_t* C, int64_t ldc) {
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      __m256i* p = reinterpret_cast<__m256i*>(C + r * ldc + 8 * j);
      _mm256_storeu_si256(
          p, _mm256_add_epi32(_mm256_loadu_si256(p), _mm256_madd_epi16(acc[r][j], ones)));
    }
  }
}

// One W4/W2 k-step (4 k-values): uint8 activations (unsigned slot) x int8 weights (signed slot);
// FIRST starts a new int16 accumulation (no zeroing, no add).
template <bool FIRST>
static LCPAQ_AI void u8_step(__m256i (&acc)[kMR][2], const uint8_t* a0, const uint8_t* a3,
                             int64_t lda, const uint8_t* w) {
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    const __m256i a = bcast32((r < 3 ? a0 : a3) + (r % 3) * lda);
    const __m256i p0 = _mm256_maddubs_epi16(a, w0), p1 = _mm256_maddubs_epi16(a, w1);
    if (FIRST) {
      acc[r][0] = p0;
      acc[r][1] = p1;
    } else {
      acc[r][0] = _mm256_add_epi16(acc[r][0], p0);
      acc[r][1] = _mm256_add_epi16(acc[r][1], p1);
    }
    // keep the per-step chain: without this GCC reassociates the unrolled adds into a tree,
    // computes all products first and spills them
    __asm__("" : "+x"(acc[r][0]), "+x"(acc[r][1]));
  }
}

// T k-steps of int16 accumulation between flushes: the range proof of the header comment.
template <int T>
static inline void micro_u8_avx2(const uint8_t* A, int64_t lda, const uint8_t* Wd,
                                 int64_t steps, int32_t* C, int64_t ldc) {
  __m256i acc[kMR][2];
  const uint8_t* a0 = A;
  const uint8_t* a3 = A + 3 * lda;
  int64_t s = 0;
  for (; s + T <= steps; s += T) {  // full blocks, unrolled by 8
    u8_step<true>(acc, a0 + 4 * s, a3 + 4 * s, lda, Wd + s * kDecStep);
#pragma GCC unroll 7
    for (int j = 1; j < 8; ++j)
      u8_step<false>(acc, a0 + 4 * (s + j), a3 + 4 * (s + j), lda, Wd + (s + j) * kDecStep);
    for (int64_t b = s + 8; b < s + T; b += 8) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        u8_step<false>(acc, a0 + 4 * (b + j), a3 + 4 * (b + j), lda, Wd + (b + j) * kDecStep);
    }
    flush16(acc, C, ldc);
  }
  if (s < steps) {  // tail: fewer than T steps
    u8_step<true>(acc, a0 + 4 * s, a3 + 4 * s, lda, Wd + s * kDecStep);
    for (int64_t t = s + 1; t < steps; ++t)
      u8_step<false>(acc, a0 + 4 * t, a3 + 4 * t, lda, Wd + t * kDecStep);
    flush16(acc, C, ldc);
  }
}

void micro_w4_avx2(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                   int64_t ldc) {
  micro_u8_avx2<8>(A, lda, Wd, steps, C, ldc);  // pair >= 2*255*(-8): 8 steps >= -32640
}

void micro_w2_avx2(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                   int64_t ldc) {
  micro_u8_avx2<32>(A, lda, Wd, steps, C, ldc);  // pair >= 2*255*(-2): 32 steps >= -32640
}

#else  // not x86/GCC: route to the scalar kernels
// uint8 requantizing epilogue, 8 outputs per iteration: same operations in the same order as
// epilogue_loop<2> (mul, add, max, mul, round-half-even, add, clamp), so bit-identical to it
template <bool BIAS, bool RELU>
static void epilogue_u8_avx2(const int32_t* c, int64_t n, const RowEpi& e, uint8_t* o) {
  const __m256 inv = _mm256_set1_ps(e.inv_out), zp = _mm256_set1_ps(e.out_zp);
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i ci = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i));
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(ci), _mm256_loadu_ps(e.scale + i));
    if (BIAS) y = _mm256_add_ps(y, _mm256_loadu_ps(e.bias + i));
    if (RELU) y = _mm256_max_ps(y, lo);
    __m256 q = _mm256_round_ps(_mm256_mul_ps(y, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, zp), lo), hi);
    const __m256i qi = _mm256_cvtps_epi32(q);  // integral already: exact
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(o + i), _mm_packus_epi16(w, w));
  }
  if (i < n) {
    RowEpi t = e;
    t.scale += i;
    if (t.bias != nullptr) t.bias += i;
    epilogue_row_impl(c + i, n - i, t, o + i);
  }
}

void epilogue_row_avx2(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  if (e.mode != 2) return epilogue_row_impl(c, n, e, out);
  uint8_t* o = static_cast<uint8_t*>(out);
  if (e.bias != nullptr) {
    if (e.relu) epilogue_u8_avx2<true, true>(c, n, e, o);
    else epilogue_u8_avx2<true, false>(c, n, e, o);
  } else {
    if (e.relu) epilogue_u8_avx2<false, true>(c, n, e, o);
    else epilogue_u8_avx2<false, false>(c, n, e, o);
  }
}
void widen_row_avx2(int16_t* d, const uint8_t* s, int64_t n, bool xs8) { widen_row_impl(d, s, n, xs8); }
void flip_row_avx2(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip) {
  flip_row_impl(d, s, n, flip);
}
void quantize_row_avx2(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                  float hi) {
  quantize_row_impl(s, d, n, sc, zp, lo, hi);
}
void decode_w8_avx2(const uint8_t* W, int64_t s, uint8_t* o) { decode_w8_scalar(W, s, o); }
void decode_w4s_avx2(const uint8_t* W, int64_t s, uint8_t* o) { decode_w4s_scalar(W, s, o); }
void decode_w2s_avx2(const uint8_t* W, int64_t s, uint8_t* o) { decode_w2s_scalar(W, s, o); }
void micro_w8_avx2(const uint8_t* A, int64_t lda, const uint8_t* W, int64_t s, int32_t* C,
                   int64_t ldc) {
  micro_w8_scalar(A, lda, W, s, C, ldc);
}
void micro_w4_avx2(const uint8_t* A, int64_t lda, const uint8_t* W, int64_t s, int32_t* C,
                   int64_t ldc) {
  micro_xu_scalar(A, lda, W, s, C, ldc);
}
void micro_w2_avx2(const uint8_t* A, int64_t lda, const uint8_t* W, int64_t s, int32_t* C,
                   int64_t ldc) {
  micro_xu_scalar(A, lda, W, s, C, ldc);
}
// never called: the driver runs 7-bit blobs on the 8-bit kernels without AVX2
void decode_w7_avx2(const uint8_t*, int64_t, int64_t, uint8_t*) {}
void micro_w7_avx2(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t) {}
#endif

}  // namespace lcpaq

#ifdef LCPAQ_HAVE_AVX2_TU
#pragma GCC pop_options
#endif
