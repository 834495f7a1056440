// AVX-VNNI micro-kernel (VEX-encoded vpdpbusd on ymm): for CPUs with AVX-VNNI but without
// AVX-512 VNNI (Intel client cores since Alder Lake). 6 rows x 16 output channels, 12 ymm
// accumulators, one decoded panel per call (the Micro signature of the AVX2 kernels).
//
// Same route and exactness as qgemm_vnni.cpp: uint8 activations in the unsigned slot, int8
// weights (decode_w7_avx2 / decode_w4s_avx2 / decode_w2s_avx2) in the signed slot, 4-k steps,
// vpdpbusd adds the four products of a lane into int32 without saturation.
#include <cstring>

#include "qgemm.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#define LCPAQ_HAVE_AVXVNNI_TU 1
#include "tile256.h"
#endif

namespace lcpaq {

#ifdef LCPAQ_HAVE_AVXVNNI_TU

#define LCPAQ_AI inline __attribute__((always_inline))

static LCPAQ_AI void avxvnni_step(__m256i (&c)[kMR][2], const uint8_t* a0, const uint8_t* a3,
                                  int64_t lda, const uint8_t* w) {
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    int32_t v;
    std::memcpy(&v, (r < 3 ? a0 : a3) + (r % 3) * lda, 4);
    const __m256i a = _mm256_set1_epi32(v);
    c[r][0] = _mm256_dpbusd_avx_epi32(c[r][0], a, w0);
    c[r][1] = _mm256_dpbusd_avx_epi32(c[r][1], a, w1);
  }
}

void micro_avxvnni(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                   int64_t ldc) {
  tile_6x16_256(A, lda, Wd, steps, C, ldc,
                [lda](__m256i(&c)[kMR][2], const uint8_t* a0, const uint8_t* a3, const uint8_t* w)
                    __attribute__((always_inline)) { avxvnni_step(c, a0, a3, lda, w); });
}

bool cpu_has_avxvnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("avxvnni");
}

#else  // no AVX-VNNI code in this build: never dispatched
void micro_avxvnni(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t) {}
bool cpu_has_avxvnni() { return false; }
#endif

}  // namespace lcpaq

#ifdef LCPAQ_HAVE_AVXVNNI_TU
#pragma GCC pop_options
#endif
