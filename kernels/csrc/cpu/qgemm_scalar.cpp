// Portable reference micro-kernels on the packed layout (used when the CPU lacks AVX2+FMA, or
// when LCPAQ_KERNELS_ISA=scalar). Same layout and arithmetic as the AVX2 ones, so bit-exact.
#include "qgemm.h"
#include "epilogue.h"

namespace lcpaq {

void micro_w8_scalar(const uint8_t* A, int64_t lda, const uint8_t* W, int64_t steps, int32_t* C,
                   int64_t ldc) {
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* w = reinterpret_cast<const int8_t*>(W + s * 32);
    for (int r = 0; r < kMR; ++r) {
      const int16_t* a = reinterpret_cast<const int16_t*>(A + r * lda + 4 * s);
      for (int c = 0; c < kNR; ++c) {
        C[r * ldc + c] += int32_t(a[0]) * w[c * 2] + int32_t(a[1]) * w[c * 2 + 1];
      }
    }
  }
}

void micro_w4_scalar(const uint8_t* A, int64_t lda, const uint8_t* W, int64_t steps, int32_t* C,
                   int64_t ldc) {
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* w = W + s * 32;
    for (int r = 0; r < kMR; ++r) {
      const int8_t* a = reinterpret_cast<const int8_t*>(A + r * lda + 4 * s);
      for (int c = 0; c < 8; ++c) {
        int32_t lo = 0, hi = 0;
        for (int j = 0; j < 4; ++j) {
          lo += int32_t(a[j]) * (w[c * 4 + j] & 15);
          hi += int32_t(a[j]) * (w[c * 4 + j] >> 4);
        }
        C[r * ldc + c] += lo;
        C[r * ldc + c + 8] += hi;
      }
    }
  }
}

void micro_w2_scalar(const uint8_t* A, int64_t lda, const uint8_t* W, int64_t steps, int32_t* C,
                   int64_t ldc) {
  for (int64_t s = 0; s < steps; s += 2) {
    const uint8_t* w = W + (s / 2) * 32;
    for (int r = 0; r < kMR; ++r) {
      const int8_t* a = reinterpret_cast<const int8_t*>(A + r * lda + 4 * s);
      const int8_t* a1 = a + 4;
      for (int c = 0; c < 8; ++c) {
        int32_t lo = 0, hi = 0;
        for (int j = 0; j < 4; ++j) {
          const int b = w[c * 4 + j];
          lo += int32_t(a[j]) * (b & 3) + int32_t(a1[j]) * ((b >> 4) & 3);
          hi += int32_t(a[j]) * ((b >> 2) & 3) + int32_t(a1[j]) * ((b >> 6) & 3);
        }
        C[r * ldc + c] += lo;
        C[r * ldc + c + 8] += hi;
      }
    }
  }
}

void epilogue_row_scalar(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  epilogue_row_impl(c, n, e, out);
}
void widen_row_scalar(int16_t* d, const uint8_t* s, int64_t n, bool xs8) { widen_row_impl(d, s, n, xs8); }
void flip_row_scalar(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip) {
  flip_row_impl(d, s, n, flip);
}
int32_t sum_row_scalar(const int8_t* d, int64_t n) { return sum_row_impl(d, n); }

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace lcpaq
