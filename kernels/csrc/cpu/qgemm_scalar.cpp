// Portable reference micro-kernels on the packed layout (used when the CPU lacks AVX2+FMA, or
// when LCPAQ_KERNELS_ISA=scalar). Same layout and arithmetic as the AVX2 ones, so bit-exact.
#include "qgemm.h"
#include "epilogue.h"

namespace lcpaq {

void decode_w8_scalar(const uint8_t* W, int64_t steps, uint8_t* out) {
  int16_t* o = reinterpret_cast<int16_t*>(out);
  for (int64_t i = 0; i < steps * 32; ++i) o[i] = int8_t(W[i]);
}

// signed q = u - 2^(bits-1) in the [step][2 halves][8 cols][4 k] layout (byte half*32 + c*4 + j
// holds column half*8 + c, k j)
void decode_w4s_scalar(const uint8_t* W, int64_t steps, uint8_t* out) {
  for (int64_t s = 0; s < steps; ++s) {
    for (int i = 0; i < 32; ++i) {
      out[s * 64 + i] = uint8_t((W[s * 32 + i] & 15) - 8);
      out[s * 64 + 32 + i] = uint8_t((W[s * 32 + i] >> 4) - 8);
    }
  }
}

void decode_w2s_scalar(const uint8_t* W, int64_t steps, uint8_t* out) {
  for (int64_t s = 0; s < steps; s += 2) {
    for (int i = 0; i < 32; ++i) {
      const uint8_t b = W[(s / 2) * 32 + i];
      out[s * 64 + i] = uint8_t((b & 3) - 2);
      out[s * 64 + 32 + i] = uint8_t(((b >> 2) & 3) - 2);
      out[(s + 1) * 64 + i] = uint8_t(((b >> 4) & 3) - 2);
      out[(s + 1) * 64 + 32 + i] = uint8_t(((b >> 6) & 3) - 2);
    }
  }
}

void micro_w8_scalar(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                     int64_t ldc) {
  for (int64_t s = 0; s < steps; ++s) {
    const int16_t* w = reinterpret_cast<const int16_t*>(Wd + s * kDecStep);
    for (int r = 0; r < kMR; ++r) {
      const int16_t* a = reinterpret_cast<const int16_t*>(A + r * lda + 4 * s);
      for (int c = 0; c < kNR; ++c) {
        C[r * ldc + c] += int32_t(a[0]) * w[c * 2] + int32_t(a[1]) * w[c * 2 + 1];
      }
    }
  }
}

// uint8 activations x int8 weights, 4-k steps (the route of every 4/2-bit kernel)
void micro_xu_scalar(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps, int32_t* C,
                     int64_t ldc) {
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* w = reinterpret_cast<const int8_t*>(Wd + s * kDecStep);
    for (int r = 0; r < kMR; ++r) {
      const uint8_t* a = A + r * lda + 4 * s;
      for (int c = 0; c < kNR; ++c) {
        const int8_t* q = w + (c / 8) * 32 + (c % 8) * 4;
        int32_t acc = 0;
        for (int j = 0; j < 4; ++j) acc += int32_t(a[j]) * q[j];
        C[r * ldc + c] += acc;
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
void quantize_row_scalar(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                  float hi) {
  quantize_row_impl(s, d, n, sc, zp, lo, hi);
}

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace lcpaq
