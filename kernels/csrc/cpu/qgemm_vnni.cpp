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

// One activation row (GEMV, M = 1): the 6-row tile would spend 5/6 of its vpdpbusd on padding
// rows. Four step phases carry separate accumulators (8 independent chains for two panels
// instead of 2: vpdpbusd's latency, not its throughput, would bind), summed at the end.
void micro_vnni_row1(const uint8_t* A, const uint8_t* W0, const uint8_t* W1, int64_t steps,
                     int32_t* C) {
  __m512i c0[4], c1[4];
  for (int j = 0; j < 4; ++j) c0[j] = c1[j] = _mm512_setzero_si512();
  int64_t s = 0;
  for (; s + 4 <= steps; s += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i a = bcast32z(A + 4 * (s + j));
      c0[j] = _mm512_dpbusd_epi32(c0[j], a, _mm512_loadu_si512(W0 + (s + j) * kDecStep));
      if (W1 != nullptr) {
        c1[j] = _mm512_dpbusd_epi32(c1[j], a, _mm512_loadu_si512(W1 + (s + j) * kDecStep));
      }
    }
  }
  for (; s < steps; ++s) {
    const __m512i a = bcast32z(A + 4 * s);
    c0[0] = _mm512_dpbusd_epi32(c0[0], a, _mm512_loadu_si512(W0 + s * kDecStep));
    if (W1 != nullptr) c1[0] = _mm512_dpbusd_epi32(c1[0], a, _mm512_loadu_si512(W1 + s * kDecStep));
  }
  const __m512i s0 = _mm512_add_epi32(_mm512_add_epi32(c0[0], c0[1]), _mm512_add_epi32(c0[2], c0[3]));
  _mm512_storeu_si512(C, _mm512_add_epi32(_mm512_loadu_si512(C), s0));
  if (W1 != nullptr) {
    const __m512i s1 = _mm512_add_epi32(_mm512_add_epi32(c1[0], c1[1]), _mm512_add_epi32(c1[2], c1[3]));
    _mm512_storeu_si512(C + kNR, _mm512_add_epi32(_mm512_loadu_si512(C + kNR), s1));
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
void micro_vnni_row1(const uint8_t*, const uint8_t*, const uint8_t*, int64_t, int32_t*) {}
bool cpu_has_avx512vnni() { return false; }
void flip_row_avx512(int8_t*, const uint8_t*, int64_t, uint8_t) {}
void epilogue_row_avx512(const int32_t*, int64_t, const RowEpi&, void*) {}
void quantize_row_avx512(const float*, uint8_t*, int64_t, float, float, float, float) {}
#endif

}  // namespace lcpaq

#ifdef LCPAQ_HAVE_VNNI_TU
#pragma GCC pop_options
#endif
