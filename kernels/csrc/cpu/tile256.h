// The 6x16 tile loop shared by the 256-bit micro-kernels: AVX2 W8 (vpmaddwd) and W7 (vpmaddubsw)
// in qgemm_avx2.cpp, AVX-VNNI (vpdpbusd on ymm) in qgemm_avxvnni.cpp. They differ only in one
// k-step (4 k-values of the tile's 6 rows x 16 columns); the loop around it (12 ymm accumulators
// loaded from C, steps unrolled by 4, the tail, the stores) is written once here.
//
// Include it *after* the translation unit's `#pragma GCC target(...)`: it is compiled for that
// TU's instruction set, and everything here has internal linkage (anonymous namespace), so the
// AVX2 and AVX-VNNI instantiations never meet at link time.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "qgemm.h"

namespace lcpaq {
namespace {

// step(c, a0, a3, w): add one k-step to the accumulators. Rows 0-2 of the tile are at
// a0 + {0,1,2}*lda, rows 3-5 at a3 + {0,1,2}*lda (every broadcast is base + index*scale +
// displacement: no address arithmetic in the unrolled loop), w is the step's decoded panel.
template <class Step>
inline __attribute__((always_inline)) void tile_6x16_256(const uint8_t* A, int64_t lda, const uint8_t* Wd,
                                                         int64_t steps, int32_t* C, int64_t ldc, Step step) {
  __m256i c[kMR][2];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    c[r][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(C + r * ldc));
    c[r][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(C + r * ldc + 8));
  }
  const uint8_t* a0 = A;
  const uint8_t* a3 = A + 3 * lda;
  int64_t s = 0;
  for (; s + 4 <= steps; s += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) step(c, a0 + 4 * (s + j), a3 + 4 * (s + j), Wd + (s + j) * kDecStep);
  }
  for (; s < steps; ++s) step(c, a0 + 4 * s, a3 + 4 * s, Wd + s * kDecStep);
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * ldc), c[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * ldc + 8), c[r][1]);
  }
}

}  // namespace
}  // namespace lcpaq
