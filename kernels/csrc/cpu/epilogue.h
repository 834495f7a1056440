// Row epilogue and activation-row transforms, written as plain loops so the compiler vectorizes
// them; included (internal linkage) by the scalar TU and by the AVX2 TU (8-wide there).
//
// The rows arrive corrected: the driver starts each accumulator at the zero-point terms
// (colmul * colsum[n]) instead of 0, so c = sum_k (x - zx) * q (modes 1, 2) or
// sum_k x * q (mode 0). int32 wrapping arithmetic is exact: the final sum satisfies
// |c| <= 255 * 128 * K < 2^31 for K <= 65536, and two's-complement intermediates are exact
// modulo 2^32 (built with -fwrapv).
#pragma once
#include <cmath>
#include <cstdint>

namespace lcpaq {

struct RowEpi {
  int mode;  // 0 raw int32 sum x*q, 1 float32, 2 uint8
  const float* scale;
  const float* bias;
  bool relu;
  float inv_out;
  float out_zp;
};

template <int MODE, bool BIAS, bool RELU>
static inline void epilogue_loop(const int32_t* __restrict c, int64_t n, const RowEpi& e,
                                 void* out) {
  const float* __restrict sc = e.scale;
  const float* __restrict bs = e.bias;
  const float inv = e.inv_out, zp = e.out_zp;
  float* __restrict of = static_cast<float*>(out);
  uint8_t* __restrict ou = static_cast<uint8_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    float y = static_cast<float>(c[i]) * sc[i];
    if (BIAS) y = y + bs[i];
    if (RELU) y = y < 0.f ? 0.f : y;
    if (MODE == 1) {
      of[i] = y;
    } else {
      float q = std::nearbyint(y * inv) + zp;
      q = q < 0.f ? 0.f : (q > 255.f ? 255.f : q);
      ou[i] = static_cast<uint8_t>(static_cast<int32_t>(q));
    }
  }
}

template <int MODE>
static inline void epilogue_mode(const int32_t* c, int64_t n, const RowEpi& e, void* out) {
  if (e.bias != nullptr) {
    if (e.relu) epilogue_loop<MODE, true, true>(c, n, e, out);
    else epilogue_loop<MODE, true, false>(c, n, e, out);
  } else {
    if (e.relu) epilogue_loop<MODE, false, true>(c, n, e, out);
    else epilogue_loop<MODE, false, false>(c, n, e, out);
  }
}

static inline void epilogue_row_impl(const int32_t* __restrict c, int64_t n, const RowEpi& e,
                                     void* out) {
  if (e.mode == 0) {
    int32_t* __restrict o = static_cast<int32_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = c[i];
  } else if (e.mode == 1) {
    epilogue_mode<1>(c, n, e, out);
  } else {
    epilogue_mode<2>(c, n, e, out);
  }
}

// uint8/int8 activations -> int16 (W8 path)
static inline void widen_row_impl(int16_t* __restrict d, const uint8_t* __restrict s, int64_t n, bool xs8) {
  if (xs8) {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<int8_t>(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  }
}

// int8 -> unsigned slot x + 128 (flip = 0x80), uint8 as stored (flip = 0)
static inline void flip_row_impl(int8_t* __restrict d, const uint8_t* __restrict s, int64_t n, uint8_t flip) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<int8_t>(s[i] ^ flip);
}

// float32 -> uint8/int8 codes: clamp(round_half_even(x / scale) + zp, lo, hi)
static inline void quantize_row_impl(const float* __restrict s, uint8_t* __restrict d, int64_t n,
                                     float sc, float zp, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint(s[i] / sc) + zp;
    q = q < lo ? lo : (q > hi ? hi : q);
    d[i] = static_cast<uint8_t>(static_cast<int32_t>(q));  // int8 stored two's complement
  }
}

}  // namespace lcpaq
