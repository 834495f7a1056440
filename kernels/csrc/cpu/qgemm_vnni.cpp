// AVX-512 VNNI micro-kernels: 6 rows x 32 output channels (two decoded 16-channel panels),
// 12 zmm accumulators, one vpdpbusd per 4 k-values x 16 channels.
//
// Compiled for AVX-512 (F, BW, VL, VNNI) via the target pragma below, only these functions; the
// driver calls them only after cpu_has_avx512vnni() (CPUID and OS support of the zmm state).
//
// Exactness: vpdpbusd multiplies unsigned bytes by signed bytes and adds the four products of a
// 32-bit lane to the int32 accumulator without saturation (vpdpbusds would saturate; not used), so
// every step is exact and the int32 sums wrap like the AVX2 kernels' (final |sum| < 2^31: the
// K <= 65536 check of the ops). One route for every width: activations in the unsigned slot
// (uint8 as stored, int8 flipped to x + 128 and corrected with 128 * colsum), int8 weights in the
// signed slot, 4-k steps: W8/W7 from decode_w7_avx2 (the full int8 range is exact here; the AVX2
// W7 kernel needs |q| <= 64), W4/W2 from decode_w4s/w2s_avx2 (q = u - 2^(bits-1)). No int16
// stage, no row sums: one instruction per 64 MACs (AVX2: W8 two per 16, W4 about one per 32).
// (Weights unsigned and activations shifted to int8, as on AVX2, measured 18 % slower on the 7x7
// stem GEMM, K=147, for the row sums and the flip, and equal elsewhere.)
#include <cstring>

#include "epilogue.h"
#include "qgemm.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and warn about it inside its own
// headers at -O3 (not about this code)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define LCPAQ_HAVE_VNNI_TU 1
#endif

namespace lcpaq {

#ifdef LCPAQ_HAVE_VNNI_TU

#define LCPAQ_AI inline __attribute__((always_inline))

static LCPAQ_AI __m512i bcast32z(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One 4-k step for rows a0 + {0,1,2}*lda and a3 + {0,1,2}*lda against NP decoded panels.
template <int NP>
static LCPAQ_AI void vnni_step(__m512i (&c)[kMR][2], const uint8_t* a0, const uint8_t* a3,
                               int64_t lda, const uint8_t* w0p, const uint8_t* w1p) {
  const __m512i w0 = _mm512_loadu_si512(w0p);
  const __m512i w1 = NP == 2 ? _mm512_loadu_si512(w1p) : w0;
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    const __m512i a = bcast32z((r < 3 ? a0 : a3) + (r % 3) * lda);
    c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, w0);
    if (NP == 2) c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, w1);
  }
}

template <int NP>
static void micro_vnni_t(const uint8_t* A, int64_t lda, const uint8_t* W0, const uint8_t* W1,
                       int64_t steps, int32_t* C, int64_t ldc) {
  __m512i c[kMR][2];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    c[r][0] = _mm512_loadu_si512(C + r * ldc);
    c[r][1] = NP == 2 ? _mm512_loadu_si512(C + r * ldc + kNR) : c[r][0];
  }
  const uint8_t* a0 = A;
  const uint8_t* a3 = A + 3 * lda;
  int64_t s = 0;
  for (; s + 4 <= steps; s += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      vnni_step<NP>(c, a0 + 4 * (s + j), a3 + 4 * (s + j), lda, W0 + (s + j) * kDecStep,
                        W1 + (s + j) * kDecStep);
    }
  }
  for (; s < steps; ++s) {
    vnni_step<NP>(c, a0 + 4 * s, a3 + 4 * s, lda, W0 + s * kDecStep, W1 + s * kDecStep);
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    _mm512_storeu_si512(C + r * ldc, c[r][0]);
    if (NP == 2) _mm512_storeu_si512(C + r * ldc + kNR, c[r][1]);
  }
}

void micro_vnni(const uint8_t* A, int64_t lda, const uint8_t* W0, const uint8_t* W1,
                int64_t steps, int32_t* C, int64_t ldc) {
  if (W1 != nullptr) return micro_vnni_t<2>(A, lda, W0, W1, steps, C, ldc);
  micro_vnni_t<1>(A, lda, W0, W0, steps, C, ldc);
}

// One activation row (GEMV, M = 1) straight from the packed blob: the 6-row tile would spend 5/6
// of its vpdpbusd on padding rows, and decoding the weights into a buffer that is read once costs
// as much as the dot products. One 64-byte load of a panel covers 2 steps (W4: 32 bytes a step,
// byte c*4+j: column c in the low nibble, c + 8 in the high one), 4 steps (W2) or 2 blob steps
// (8-bit blob, 2-k steps: dword lane l holds columns 2l, 2l+1 x 2 k; activations [x0 x1 0 0]
// pick the even column, [0 0 x0 x1] the odd one). Lanes 8-15 carry the second half of the load
// (a later step), folded onto lanes 0-7 at the end. Up to 4 panels share each activation vector
// (8 independent accumulator chains).

// dword lanes 0-7 = v0, lanes 8-15 = v1
static LCPAQ_AI __m512i two_dwords(int32_t v0, int32_t v1) {
  return _mm512_inserti64x4(_mm512_set1_epi32(v0), _mm256_set1_epi32(v1), 1);
}
static LCPAQ_AI int32_t dword_at(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
// C[0..8) += lanes 0-7 + lanes 8-15 of lo, C[8..16) likewise of hi
static LCPAQ_AI void fold_add(int32_t* C, __m512i lo, __m512i hi) {
  const __m256i l = _mm256_add_epi32(_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1));
  __m256i* c = reinterpret_cast<__m256i*>(C);
  _mm256_storeu_si256(c, _mm256_add_epi32(_mm256_loadu_si256(c), l));
  _mm256_storeu_si256(c + 1, _mm256_add_epi32(_mm256_loadu_si256(c + 1), h));
}

template <int NP>
static void gemv_w4(const uint8_t* x, const uint8_t* W, int64_t ksteps, int32_t* C) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), h = _mm512_set1_epi8(8);
  const int64_t ps = ksteps * 32;  // panel stride
  __m512i lo[NP], hi[NP];
  for (int p = 0; p < NP; ++p) lo[p] = hi[p] = _mm512_setzero_si512();
  int64_t s = 0;
  for (; s + 2 <= ksteps; s += 2) {
    const __m512i a = two_dwords(dword_at(x + 4 * s), dword_at(x + 4 * s + 4));
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const __m512i v = _mm512_loadu_si512(W + p * ps + s * 32);
      lo[p] = _mm512_dpbusd_epi32(lo[p], a, _mm512_sub_epi8(_mm512_and_si512(v, m4), h));
      hi[p] = _mm512_dpbusd_epi32(hi[p], a,
                                  _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), h));
    }
  }
  if (s < ksteps) {  // last single step: the upper half's weights are zeroed
    const __mmask64 m = 0xFFFFFFFFull;
    const __m512i a = _mm512_set1_epi32(dword_at(x + 4 * s));
    for (int p = 0; p < NP; ++p) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, W + p * ps + s * 32);
      lo[p] = _mm512_dpbusd_epi32(lo[p], a, _mm512_maskz_sub_epi8(m, _mm512_and_si512(v, m4), h));
      hi[p] = _mm512_dpbusd_epi32(
          hi[p], a, _mm512_maskz_sub_epi8(m, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), h));
    }
  }
  for (int p = 0; p < NP; ++p) fold_add(C + p * kNR, lo[p], hi[p]);
}

template <int NP>
static void gemv_w2(const uint8_t* x, const uint8_t* W, int64_t ksteps, int32_t* C) {
  const __m512i m2 = _mm512_set1_epi8(0x03), h = _mm512_set1_epi8(2);
  const int64_t ps = ksteps / 2 * 32;  // panel stride (ksteps is even for 2-bit blobs)
  __m512i lo[NP], hi[NP];
  for (int p = 0; p < NP; ++p) lo[p] = hi[p] = _mm512_setzero_si512();
  auto q = [&](__m512i v, int sh, __mmask64 m) {
    return _mm512_maskz_sub_epi8(m, _mm512_and_si512(_mm512_srli_epi16(v, sh), m2), h);
  };
  for (int64_t s = 0; s < ksteps; s += 4) {
    // 64 bytes: steps s, s+1 (bytes 0-31) and s+2, s+3 (32-63); the last pair may be alone
    const bool full = s + 4 <= ksteps;
    const __mmask64 m = full ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
    const __m512i a02 = two_dwords(dword_at(x + 4 * s), full ? dword_at(x + 4 * s + 8) : 0);
    const __m512i a13 = two_dwords(dword_at(x + 4 * s + 4), full ? dword_at(x + 4 * s + 12) : 0);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, W + p * ps + s / 2 * 32);
      lo[p] = _mm512_dpbusd_epi32(lo[p], a02, q(v, 0, m));
      hi[p] = _mm512_dpbusd_epi32(hi[p], a02, q(v, 2, m));
      lo[p] = _mm512_dpbusd_epi32(lo[p], a13, q(v, 4, m));
      hi[p] = _mm512_dpbusd_epi32(hi[p], a13, q(v, 6, m));
    }
  }
  for (int p = 0; p < NP; ++p) fold_add(C + p * kNR, lo[p], hi[p]);
}

template <int NP>
static void gemv_w8(const uint8_t* x, const uint8_t* W, int64_t bsteps, int32_t* C) {
  const int64_t ps = bsteps * 32;
  __m512i ev[NP], od[NP];
  for (int p = 0; p < NP; ++p) ev[p] = od[p] = _mm512_setzero_si512();
  for (int64_t t = 0; t < bsteps; t += 2) {  // blob steps t, t+1: k = 2t .. 2t+3
    const bool full = t + 2 <= bsteps;
    const __mmask64 m = full ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
    const uint32_t d = static_cast<uint32_t>(dword_at(x + 2 * t));
    const int32_t e0 = int32_t(d & 0xFFFF), e1 = full ? int32_t(d >> 16) : 0;
    const __m512i ae = two_dwords(e0, e1), ao = two_dwords(e0 << 16, int32_t(uint32_t(e1) << 16));
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, W + p * ps + t * 32);
      ev[p] = _mm512_dpbusd_epi32(ev[p], ae, v);
      od[p] = _mm512_dpbusd_epi32(od[p], ao, v);
    }
  }
  for (int p = 0; p < NP; ++p) {
    const __m256i e = _mm256_add_epi32(_mm512_castsi512_si256(ev[p]), _mm512_extracti64x4_epi64(ev[p], 1));
    const __m256i o = _mm256_add_epi32(_mm512_castsi512_si256(od[p]), _mm512_extracti64x4_epi64(od[p], 1));
    // e: columns 0, 2, ..., 14; o: 1, 3, ..., 15 -> interleave
    const __m256i lo = _mm256_unpacklo_epi32(e, o), hi = _mm256_unpackhi_epi32(e, o);
    __m256i* c = reinterpret_cast<__m256i*>(C + p * kNR);
    _mm256_storeu_si256(c, _mm256_add_epi32(_mm256_loadu_si256(c), _mm256_permute2x128_si256(lo, hi, 0x20)));
    _mm256_storeu_si256(c + 1, _mm256_add_epi32(_mm256_loadu_si256(c + 1), _mm256_permute2x128_si256(lo, hi, 0x31)));
  }
}

template <int NP>
static void gemv_np(int lbits, const uint8_t* x, const uint8_t* W, int64_t bsteps, int32_t* C) {
  if (lbits == 8) return gemv_w8<NP>(x, W, bsteps, C);
  if (lbits == 4) return gemv_w4<NP>(x, W, bsteps, C);
  gemv_w2<NP>(x, W, bsteps, C);
}

void gemv_vnni(int lbits, const uint8_t* x, const uint8_t* W, int64_t bsteps, int np, int32_t* C) {
  switch (np) {
    case 1: return gemv_np<1>(lbits, x, W, bsteps, C);
    case 2: return gemv_np<2>(lbits, x, W, bsteps, C);
    case 3: return gemv_np<3>(lbits, x, W, bsteps, C);
    default: return gemv_np<4>(lbits, x, W, bsteps, C);
  }
}

// lanes [0, n) of a 64-byte chunk, n <= 64
static LCPAQ_AI __mmask64 first_n(int64_t n) {
  return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
}

// flip_row of the AVX2 TU with a masked tail: im2col rows are short runs (the 7x7 stem
// copies 21 bytes per kernel row), which the 32-byte loops did mostly in scalar code
void flip_row_avx512(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip) {
  const __m512i f = _mm512_set1_epi8(static_cast<char>(flip));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    _mm512_storeu_si512(d + i, _mm512_xor_si512(_mm512_loadu_si512(s + i), f));
  }
  if (i < n) {
    const __mmask64 m = first_n(n - i);
    _mm512_mask_storeu_epi8(d + i, m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, s + i), f));
  }
}

// The fused epilogue 16 columns at a time (masked tail): the same float operations in the same
// order as epilogue_loop (mul, add, relu, then mul, round half-even, add, clamp), so bit-identical
// to it; relu as max(0, y) keeps y = -0.0 like the scalar `y < 0 ? 0 : y`.
template <int MODE, bool BIAS, bool RELU>
static void epilogue_avx512(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  const __m512 inv = _mm512_set1_ps(e.inv_out), zp = _mm512_set1_ps(e.out_zp);
  const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i ci = _mm512_maskz_loadu_epi32(m, c + i);
    if (MODE == 0) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(out) + i, m, ci);
      continue;
    }
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(ci), _mm512_maskz_loadu_ps(m, e.scale + i));
    if (BIAS) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, e.bias + i));
    if (RELU) y = _mm512_max_ps(lo, y);
    if (MODE == 1) {
      _mm512_mask_storeu_ps(static_cast<float*>(out) + i, m, y);
      continue;
    }
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(y, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zp), lo), hi);
    // integral and in [0, 255] already: the conversion and the byte truncation are exact
    _mm_mask_storeu_epi8(static_cast<uint8_t*>(out) + i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
}

template <int MODE>
static void epilogue_mode_avx512(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  if (e.bias != nullptr) {
    if (e.relu) epilogue_avx512<MODE, true, true>(c, n, e, out);
    else epilogue_avx512<MODE, true, false>(c, n, e, out);
  } else {
    if (e.relu) epilogue_avx512<MODE, false, true>(c, n, e, out);
    else epilogue_avx512<MODE, false, false>(c, n, e, out);
  }
}

void epilogue_row_avx512(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  if (e.mode == 0) return epilogue_avx512<0, false, false>(c, n, e, out);
  if (e.mode == 1) return epilogue_mode_avx512<1>(c, n, e, out);
  epilogue_mode_avx512<2>(c, n, e, out);
}

// quantize_row_impl 16 at a time: clamp(round_half_even(x / scale) + zp, lo, hi) with the same
// IEEE division and rounding, so bit-identical to it; stored as the low byte (int8 two's complement)
void quantize_row_avx512(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                         float hi) {
  const __m512 vs = _mm512_set1_ps(sc), vz = _mm512_set1_ps(zp);
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, s + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), vlo), vhi);
    _mm_mask_storeu_epi8(d + i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
}

bool cpu_has_avx512vnni() {
  __builtin_cpu_init();  // libgcc also checks that the OS saves the zmm state (XCR0)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

#else  // no AVX-512 VNNI code in this build: never dispatched
void micro_vnni(const uint8_t*, int64_t, const uint8_t*, const uint8_t*, int64_t, int32_t*,
                int64_t) {}
void gemv_vnni(int, const uint8_t*, const uint8_t*, int64_t, int, int32_t*) {}
bool cpu_has_avx512vnni() { return false; }
void flip_row_avx512(int8_t*, const uint8_t*, int64_t, uint8_t) {}
void epilogue_row_avx512(const int32_t*, int64_t, const RowEpi&, void*) {}
void quantize_row_avx512(const float*, uint8_t*, int64_t, float, float, float, float) {}
#endif

}  // namespace lcpaq

#ifdef LCPAQ_HAVE_VNNI_TU
#pragma GCC pop_options
#endif
