// lcpaq integer GEMM: packed-weight format and micro-kernel interfaces (shared by CPU and CUDA).
//
// Packed weight blob (uint8, one per group), produced by lcpaq.kernels.pack_weight:
//   [ colsum: int32 x Npad ][ panels: P x ksteps x step_bytes ]
// Npad = ceil(N/16)*16, P = Npad/16 panels of NR=16 output channels.
//   bits 8: kstep = 2 k-values, step_bytes 32: byte c*2+j = int8 q[col c, k j] (two's complement)
//   bits 4: kstep = 4 k-values, step_bytes 32: byte c*4+j (c<8): low nibble u[c, j], high u[c+8, j]
//   bits 2: kstep = 4 k-values, ksteps even, 32 bytes per 2 steps: byte c*4+j holds crumbs
//           u[c, j], u[c+8, j], u[c, 4+j], u[c+8, 4+j] (bits 1:0, 3:2, 5:4, 7:6)
//   with u = q + 2^(bits-1) (offset binary) for 4 and 2 bits; padding holds q = 0.
// colsum[n] = sum_k q[n, k] over the real K (used for zero-point corrections).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define LCPAQ_HD __host__ __device__
#else
#define LCPAQ_HD
#endif

namespace lcpaq {

constexpr int kMR = 6;   // rows per micro-tile
constexpr int kNR = 16;  // output channels per panel

LCPAQ_HD inline int64_t kstep_k(int bits) { return bits == 8 ? 2 : 4; }
LCPAQ_HD inline int64_t num_ksteps(int bits, int64_t K) {
  int64_t s = (K + kstep_k(bits) - 1) / kstep_k(bits);
  if (bits == 2) s = (s + 1) / 2 * 2;
  return s;
}
LCPAQ_HD inline int64_t step_bytes(int bits) { return bits == 2 ? 16 : 32; }
LCPAQ_HD inline int64_t pad_n(int64_t N) { return (N + kNR - 1) / kNR * kNR; }
LCPAQ_HD inline int64_t blob_bytes(int bits, int64_t N, int64_t K) {
  return 4 * pad_n(N) + (pad_n(N) / kNR) * num_ksteps(bits, K) * step_bytes(bits);
}

// Packed activations: row-major, row stride lda bytes (padded off multiples of 1 KiB to avoid
// cache-set aliasing); k-step s of row r is the 4 bytes at A + r * lda + 4 * s: 2 int16
// (W8: x as stored) or 4 uint8 (every other kernel: uint8 x as stored, int8 x flipped to x + 128).

// Weight panels are decoded once per (k-block, panel) into a small L1-resident buffer of
// 64 bytes per k-step, reused by every row tile:
//   W8:    int16 [step][16 cols][2 k]     (two ymm: cols 0-7, cols 8-15)
//   others: int8 q [step][2][8 cols][4 k] (two ymm: cols 0-7, cols 8-15)
constexpr int kDecStep = 64;
using Decode = void (*)(const uint8_t* W, int64_t steps, uint8_t* out);
// C[kMR][kNR] (row stride ldc) += A-tile x decoded panel over `steps` k-steps.
// Exact sum x*q of the packed (possibly flipped) activations; the caller starts C at the
// zero-point corrections.
using Micro = void (*)(const uint8_t* A, int64_t lda, const uint8_t* Wd, int64_t steps,
                       int32_t* C, int64_t ldc);

void decode_w8_scalar(const uint8_t*, int64_t, uint8_t*);
void decode_w4s_scalar(const uint8_t*, int64_t, uint8_t*);
void decode_w2s_scalar(const uint8_t*, int64_t, uint8_t*);
void decode_w8_avx2(const uint8_t*, int64_t, uint8_t*);
// W4/W2: signed q = u - 2^(bits-1) (the int8 weight operand of every 4/2-bit kernel)
void decode_w4s_avx2(const uint8_t*, int64_t, uint8_t*);
void decode_w2s_avx2(const uint8_t*, int64_t, uint8_t*);
void micro_w8_scalar(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);
void micro_xu_scalar(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);
void micro_w8_avx2(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);
void micro_w4_avx2(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);
void micro_w2_avx2(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);
// 7-bit weights (8-bit blob layout, values in [-64, 63]), CPU/AVX2 only: 4-k steps of uint8
// activations (int8 ones flipped by +128) against int8 weights decoded as [2][8 cols][4 k];
// `avail` = 8-bit blob steps present (the last 4-k step may have only one).
void decode_w7_avx2(const uint8_t* W, int64_t steps, int64_t avail, uint8_t* out);
void micro_w7_avx2(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);

bool cpu_has_avx2_fma();

// AVX-512 VNNI (qgemm_vnni.cpp): C[kMR][32] (or [kMR][16] when W1 is null) += A-tile x two
// decoded panels, one vpdpbusd per 4-k step and 16 channels: uint8 activations x int8 weights
// (decode_w7_avx2 for 8-bit blobs, any int8 value; decode_w4s/w2s_avx2 for 4/2-bit ones).
void micro_vnni(const uint8_t*, int64_t, const uint8_t*, const uint8_t*, int64_t, int32_t*,
                int64_t);
// One activation row (M = 1) x np <= 4 panels read from the blob (lbits 8, 4 or 2; W = the first
// panel, bsteps blob steps per panel): C[0 .. 16 np) += sum_k x[k] q[n, k]. x: packed uint8 row
// (int8 flipped), zero-padded to 16 bytes past the last step.
void gemv_vnni(int lbits, const uint8_t* x, const uint8_t* W, int64_t bsteps, int np, int32_t* C);
bool cpu_has_avx512vnni();
// AVX-VNNI (VEX, ymm; qgemm_avxvnni.cpp): the same route 16 channels at a time (Micro signature)
void micro_avxvnni(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);
bool cpu_has_avxvnni();
void flip_row_avx512(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip);
void quantize_row_avx512(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                         float hi);

struct RowEpi;
// vectorized helpers (epilogue.h), one copy per ISA
void epilogue_row_scalar(const int32_t* c, int64_t n, const RowEpi& e, void* out);
void epilogue_row_avx2(const int32_t* c, int64_t n, const RowEpi& e, void* out);
void epilogue_row_avx512(const int32_t* c, int64_t n, const RowEpi& e, void* out);
void widen_row_scalar(int16_t* d, const uint8_t* s, int64_t n, bool xs8);
void widen_row_avx2(int16_t* d, const uint8_t* s, int64_t n, bool xs8);
void flip_row_scalar(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip);
void flip_row_avx2(int8_t* d, const uint8_t* s, int64_t n, uint8_t flip);
void quantize_row_scalar(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                         float hi);
void quantize_row_avx2(const float* s, uint8_t* d, int64_t n, float sc, float zp, float lo,
                       float hi);

}  // namespace lcpaq
