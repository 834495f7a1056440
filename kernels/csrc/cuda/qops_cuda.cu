// CUDA implementations of the lcpaq ops on the same packed-weight blob as the CPU (cpu/qgemm.h).
//
// Tensor-core path (sm_80+, the default where the device has it): the packed 8/4/2-bit weights
// are decoded once per call into a plain int8 [N][Kp] matrix (Kp = K rounded up to 16, zero
// padded), activations are used as stored (uint8 or int8, row stride a multiple of 16 bytes;
// im2col writes that layout), and a 128xBN block tile is computed with
// mma.sync.m16n8k32 (u8 x s8 or s8 x s8 -> s32, exact) from a two-stage cp.async pipeline.
// The int32 accumulators never overflow: |x*q| <= 255*128 and K <= 65536.
// dp4a path (any sm_61+ device, or LCPAQ_CUDA_KERNEL=dp4a): activations are shifted to int8
// (a = x - 128 for uint8), 4 per 32-bit word, weights decoded on the fly, __dp4a, 16x16 tiles.
// Both paths share one epilogue (bias, ReLU, dequantize or requantize to uint8), written with
// explicit round-to-nearest intrinsics so that it matches the CPU kernels bit for bit.
// Only c10/cuda headers and the CUDA runtime are used (the local toolkit has no cuBLAS headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#include "qgemm.h"

namespace lcpaq {
namespace {

constexpr int TILE = 16;
constexpr int KT = 64;  // k values staged per iteration (multiple of 4)

struct EpiParams {
  int mode;  // 0 int32 raw, 1 float32, 2 uint8
  void* out;
  int64_t ldo;
  const float* scale;
  const float* bias;
  int64_t zx;
  float inv_out;
  float out_zp;
  bool relu;
};

// q[n, k] decoded from the blob (signed value).
__device__ __forceinline__ int decode_w(const uint8_t* panels, int bits, int64_t ksteps, int64_t n,
                                        int64_t k) {
  const int64_t p = n / kNR;
  const int c = int(n % kNR);
  if (bits == 8) {
    const int64_t s = k / 2;
    return int(int8_t(panels[(p * ksteps + s) * 32 + c * 2 + (k % 2)]));
  }
  const int64_t s = k / 4;
  const int j = int(k % 4);
  if (bits == 4) {
    const uint8_t b = panels[(p * ksteps + s) * 32 + (c % 8) * 4 + j];
    return int(c >= 8 ? (b >> 4) : (b & 15)) - 8;
  }
  const int64_t pair = s / 2;
  const int st = int(s % 2);
  const uint8_t b = panels[(p * ksteps + pair * 2) * 16 + (c % 8) * 4 + j];
  const int shift = (c >= 8 ? 2 : 0) + st * 4;
  return int((b >> shift) & 3) - 2;
}

// Epilogue for one output: raw = exact sum_k x*q.
__device__ __forceinline__ void store_out(const EpiParams& ep, int64_t m, int64_t n, int64_t raw,
                                          const int32_t* colsum) {
  if (ep.mode == 0) {
    static_cast<int32_t*>(ep.out)[m * ep.ldo + n] = int32_t(raw);
    return;
  }
  const int64_t corr = raw - ep.zx * colsum[n];
  float y = __fmul_rn(__ll2float_rn(corr), ep.scale[n]);  // no FMA contraction: match the CPU
  if (ep.bias != nullptr) y = __fadd_rn(y, ep.bias[n]);
  if (ep.relu) y = y < 0.f ? 0.f : y;
  if (ep.mode == 1) {
    static_cast<float*>(ep.out)[m * ep.ldo + n] = y;
  } else {
    float q = __fadd_rn(rintf(__fmul_rn(y, ep.inv_out)), ep.out_zp);
    q = fminf(fmaxf(q, 0.f), 255.f);
    static_cast<uint8_t*>(ep.out)[m * ep.ldo + n] = uint8_t(q);
  }
}

__global__ void qgemm_kernel(const uint8_t* __restrict__ x, int64_t M, int64_t K, int64_t ldx,
                             bool xs8, const uint8_t* __restrict__ blob, int64_t N, int bits,
                             EpiParams ep) {
  __shared__ int32_t As[TILE][KT / 4 + 1];
  __shared__ int32_t Ws[TILE][KT / 4 + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m = int64_t(blockIdx.y) * TILE + ty, n = int64_t(blockIdx.x) * TILE + tx;
  const int64_t npad = pad_n(N), ksteps = num_ksteps(bits, K);
  const int32_t* colsum = reinterpret_cast<const int32_t*>(blob);
  const uint8_t* panels = blob + 4 * npad;
  const int flip = xs8 ? 0 : 128;
  int32_t acc = 0;
  for (int64_t k0 = 0; k0 < K; k0 += KT) {
    // each thread stages KT/4/TILE words of A (row ty) and of W (column tx of this block)
    for (int w = tx; w < KT / 4; w += TILE) {
      uint32_t av = 0, wv = 0;
      const int64_t am = int64_t(blockIdx.y) * TILE + ty;
      const int64_t wn = int64_t(blockIdx.x) * TILE + ty;
      for (int j = 0; j < 4; ++j) {
        const int64_t k = k0 + w * 4 + j;
        int a = 0, q = 0;
        if (k < K && am < M) {
          const uint8_t xv = x[am * ldx + k];
          a = xs8 ? int(int8_t(xv)) : int(xv) - flip;
        }
        if (k < K && wn < N) q = decode_w(panels, bits, ksteps, wn, k);
        av |= uint32_t(uint8_t(int8_t(a))) << (8 * j);
        wv |= uint32_t(uint8_t(int8_t(q))) << (8 * j);
      }
      As[ty][w] = int32_t(av);
      Ws[ty][w] = int32_t(wv);
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < KT / 4; ++w) acc = __dp4a(As[ty][w], Ws[tx][w], acc);
    __syncthreads();
  }
  if (m >= M || n >= N) return;
  store_out(ep, m, n, int64_t(acc) + int64_t(xs8 ? 0 : 128) * colsum[n], colsum);
}


// ---------------------------------------------------------------- tensor-core (IMMA) path

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// c += a (16x32, row) * b (32x8, col); a uint8 (XS8 false) or int8, b int8; exact s32.
template <bool XS8>
__device__ __forceinline__ void mma_16832(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (XS8) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // built without sm_80+ code: the host never selects this path then (see imma_ok)
#endif
}

// Implicit-GEMM view of an NHWC conv input for one group (cg % 16 == 0): row m = (n, oh, ow),
// k = (kh, kw, c); every 16-byte chunk of a row lies in one tap. Taps outside the image read
// `padbuf`, 16 bytes of the zero point.
struct ConvGeo {
  const uint8_t* padbuf;
  int64_t H, W, C, OH, OW, KW, sh, sw, ph, pw, dh, dw, c0, cg;
};

// C[M, N] = A[M, Kp] x B[N, Kp]^T, A uint8/int8, B int8, exact int32. A is either a matrix
// (rows of lda bytes, 16-byte aligned, columns K..Kp-1 zero) or, with IMPLICIT, gathered from
// the conv input `A` through `geo` (no im2col buffer). BM x BN outputs per block, WM x WN warps,
// BK = 64 k per stage, two-stage cp.async pipeline. Shared rows are padded to 80 bytes: the
// fragment loads (8 rows x 4 words per warp) then hit 32 distinct banks.
template <int BM, int BN, int WM, int WN, bool XS8, bool IMPLICIT>
__global__ void __launch_bounds__(WM* WN * 32)
    imma_gemm_kernel(const uint8_t* __restrict__ A, int64_t M, int64_t Kp, int64_t lda,
                     const int8_t* __restrict__ B, int64_t N, const int32_t* __restrict__ colsum,
                     EpiParams ep, ConvGeo geo) {
  constexpr int BK = 64, LDS = BK + 16, THREADS = WM * WN * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NT = WTN / 8;
  constexpr int AIT = (BM * 4 + THREADS - 1) / THREADS;
  __shared__ __align__(16) uint8_t As[2][BM][LDS];
  __shared__ __align__(16) int8_t Bs[2][BN][LDS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN, g = lane >> 2, t = lane & 3;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0;
  const int ktiles = int((Kp + BK - 1) / BK);
  // per A chunk this thread loads: the row's image base and top-left input coordinate
  int64_t rbase[AIT];
  int ih0[AIT], iw0[AIT];
  if constexpr (IMPLICIT) {
#pragma unroll
    for (int j = 0; j < AIT; ++j) {
      const int64_t gm = m0 + ((tid + j * THREADS) >> 2);
      const int64_t n = gm / (geo.OH * geo.OW), r = gm % (geo.OH * geo.OW);
      rbase[j] = n * geo.H * geo.W * geo.C + geo.c0;
      ih0[j] = int((r / geo.OW) * geo.sh - geo.ph);
      iw0[j] = int((r % geo.OW) * geo.sw - geo.pw);
    }
  }

  auto load = [&](int st, int kt) {
    const int64_t k0 = int64_t(kt) * BK;
#pragma unroll
    for (int j = 0; j < AIT; ++j) {
      const int i = tid + j * THREADS;
      if (i >= BM * 4) break;
      const int r = i >> 2, ch = i & 3;
      const int64_t gm = m0 + r, gk = k0 + ch * 16;
      const bool ok = gm < M && gk < Kp;
      const uint8_t* src = A;
      if constexpr (IMPLICIT) {
        if (ok) {
          const int64_t tap = gk / geo.cg, c = gk - tap * geo.cg;
          const int64_t kh = tap / geo.KW, kw = tap - kh * geo.KW;
          const int64_t ih = ih0[j] + kh * geo.dh, iw = iw0[j] + kw * geo.dw;
          src = (ih >= 0 && ih < geo.H && iw >= 0 && iw < geo.W)
                    ? A + rbase[j] + (ih * geo.W + iw) * geo.C + c
                    : geo.padbuf;
        }
      } else {
        if (ok) src = A + gm * lda + gk;
      }
      cp_async16(&As[st][r][ch * 16], src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = tid; i < BN * 4; i += THREADS) {
      const int r = i >> 2, ch = i & 3;
      const int64_t gn = n0 + r, gk = k0 + ch * 16;
      const bool ok = gn < N && gk < Kp;
      cp_async16(&Bs[st][r][ch * 16], ok ? B + gn * Kp + gk : B, ok ? 16 : 0);
    }
    cp_async_commit();
  };

  load(0, 0);
  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt & 1;
    if (kt + 1 < ktiles) {
      load(st ^ 1, kt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = wm * WTM + i * 16 + g;
        af[i][0] = *reinterpret_cast<const uint32_t*>(&As[st][r][kk + t * 4]);
        af[i][1] = *reinterpret_cast<const uint32_t*>(&As[st][r + 8][kk + t * 4]);
        af[i][2] = *reinterpret_cast<const uint32_t*>(&As[st][r][kk + 16 + t * 4]);
        af[i][3] = *reinterpret_cast<const uint32_t*>(&As[st][r + 8][kk + 16 + t * 4]);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int c = wn * WTN + j * 8 + g;
        bf[j][0] = *reinterpret_cast<const uint32_t*>(&Bs[st][c][kk + t * 4]);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(&Bs[st][c][kk + 16 + t * 4]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_16832<XS8>(acc[i][j], af[i], bf[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + wm * WTM + i * 16 + g + h * 8;
          const int64_t n = n0 + wn * WTN + j * 8 + t * 2 + e;
          if (m < M && n < N) store_out(ep, m, n, int64_t(acc[i][j][h * 2 + e]), colsum);
        }
}

// The packed blobs of G groups (gb bytes each) as plain int8 [G][N][Kp] (zero beyond K), and
// their column sums gathered into int32 [G][N].
__global__ void decode_weights_kernel(const uint8_t* __restrict__ blobs, int bits, int64_t G,
                                      int64_t N, int64_t K, int64_t Kp, int64_t gb,
                                      int8_t* __restrict__ out, int32_t* __restrict__ colsum) {
  const int64_t npad = pad_n(N), ksteps = num_ksteps(bits, K);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < G * N * Kp;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / (N * Kp), r = i % (N * Kp), n = r / Kp, k = r % Kp;
    const uint8_t* blob = blobs + g * gb;
    out[i] = k < K ? int8_t(decode_w(blob + 4 * npad, bits, ksteps, n, k)) : int8_t(0);
    if (k == 0) colsum[g * N + n] = reinterpret_cast<const int32_t*>(blob)[n];
  }
}

// Depthwise conv (groups == C, one output channel per group), NHWC in and out, one thread per
// output: exact int32 sum over the KH*KW taps (padding = the zero point), then the epilogue.
template <bool XS8>
__global__ void depthwise_kernel(const uint8_t* __restrict__ x, int64_t Nb, int64_t H, int64_t W,
                                 int64_t C, int64_t OH, int64_t OW, int64_t KH, int64_t KW,
                                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                 int64_t dw, const int8_t* __restrict__ wd, int64_t Kp,
                                 uint8_t pad, const int32_t* __restrict__ colsum, EpiParams ep) {
  const int64_t total = Nb * OH * OW * C;
  const int padv = XS8 ? int(int8_t(pad)) : int(pad);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, m = i / C;
    const int64_t n = m / (OH * OW), r = m % (OH * OW), oh = r / OW, ow = r % OW;
    int acc = 0;
    for (int64_t kh = 0; kh < KH; ++kh) {
      const int64_t ih = oh * sh - ph + kh * dh;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = ow * sw - pw + kw * dw;
        int xv = padv;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
          const uint8_t b = x[((n * H + ih) * W + iw) * C + c];
          xv = XS8 ? int(int8_t(b)) : int(b);
        }
        acc += xv * int(wd[c * Kp + kh * KW + kw]);
      }
    }
    store_out(ep, m, c, int64_t(acc), colsum);
  }
}

// NHWC im2col rows in (kh, kw, c) order for one group, padded with the zero point; row stride
// Kp >= K bytes, the tail k in [K, Kp) zero (it meets zero weights). One thread per (row, tap)
// copies the tap's cg contiguous channels, 16 bytes at a time where both sides are aligned.
__global__ void im2col_kernel(const uint8_t* __restrict__ x, uint8_t* __restrict__ cols,
                              int64_t Nb, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW,
                              int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                              int64_t pw, int64_t dh, int64_t dw, int64_t c0, int64_t cg,
                              int64_t Kp, uint8_t pad) {
  const int64_t taps = KH * KW, K = taps * cg, total = Nb * OH * OW * taps;
  const bool vec = cg % 16 == 0 && c0 % 16 == 0 && C % 16 == 0 && Kp % 16 == 0;
  const uint32_t p4 = 0x01010101u * pad;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / taps, tap = i % taps, kh = tap / KW, kw = tap % KW;
    const int64_t n = m / (OH * OW), r = m % (OH * OW), oh = r / OW, ow = r % OW;
    const int64_t ih = oh * sh - ph + kh * dh, iw = ow * sw - pw + kw * dw;
    uint8_t* dst = cols + m * Kp + tap * cg;
    const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
    const uint8_t* src = inside ? x + ((n * H + ih) * W + iw) * C + c0 : nullptr;
    if (vec) {
      const uint4 padv = make_uint4(p4, p4, p4, p4);
      for (int64_t c = 0; c < cg; c += 16)
        *reinterpret_cast<uint4*>(dst + c) =
            inside ? *reinterpret_cast<const uint4*>(src + c) : padv;
    } else {
      for (int64_t c = 0; c < cg; ++c) dst[c] = inside ? src[c] : pad;
    }
    if (tap == taps - 1)
      for (int64_t k = K; k < Kp; ++k) cols[m * Kp + k] = 0;
  }
}

__global__ void quantize_kernel(const float* __restrict__ s, uint8_t* __restrict__ d, int64_t n,
                                float sc, float z, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float q = __fadd_rn(rintf(__fdiv_rn(s[i], sc)), z);
    q = fminf(fmaxf(q, lo), hi);
    d[i] = uint8_t(int32_t(q));
  }
}

int64_t round16(int64_t k) { return (k + 15) / 16 * 16; }

int grid_for(int64_t n, int threads) {
  return int(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

// Per-device facts read once (every op call asks): -1 = not read yet. Benign race: concurrent
// first calls store the same value.
constexpr int kMaxDevices = 64;
std::atomic<int> g_imma_hw[kMaxDevices];
std::atomic<int> g_sms[kMaxDevices];

int read_imma_hw(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (major < 8) return 0;
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, imma_gemm_kernel<128, 64, 4, 2, false, false>) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return fa.binaryVersion >= 80 ? 1 : 0;
}

int read_sms(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return n;
}

int cached(std::atomic<int>* table, int device, int (*read)(int)) {
  if (device < 0 || device >= kMaxDevices) return read(device);
  int v = table[device].load(std::memory_order_relaxed);
  if (v < 0) {
    v = read(device);
    table[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

struct InitCaches {
  InitCaches() {
    for (int i = 0; i < kMaxDevices; ++i) g_imma_hw[i] = g_sms[i] = -1;
  }
} g_init_caches;

// The tensor-core path runs when the device is sm_80+, the extension holds sm_80+ code for it,
// and LCPAQ_CUDA_KERNEL is not "dp4a" (read on every call: tests switch it).
bool imma_ok(int device) {
  const char* e = std::getenv("LCPAQ_CUDA_KERNEL");
  if (e != nullptr && std::strcmp(e, "dp4a") == 0) return false;
  return cached(g_imma_hw, device, read_imma_hw) == 1;
}

int num_sms(int device) { return cached(g_sms, device, read_sms); }

template <int BM, int BN, int WM, int WN, bool IMPLICIT>
void launch_imma_cfg(const uint8_t* A, int64_t M, int64_t Kp, int64_t lda, bool xs8,
                     const int8_t* Wd, int64_t N, const int32_t* colsum, const EpiParams& ep,
                     const ConvGeo& geo, cudaStream_t stream) {
  dim3 grid(unsigned((N + BN - 1) / BN), unsigned((M + BM - 1) / BM));
  if (xs8)
    imma_gemm_kernel<BM, BN, WM, WN, true, IMPLICIT>
        <<<grid, WM * WN * 32, 0, stream>>>(A, M, Kp, lda, Wd, N, colsum, ep, geo);
  else
    imma_gemm_kernel<BM, BN, WM, WN, false, IMPLICIT>
        <<<grid, WM * WN * 32, 0, stream>>>(A, M, Kp, lda, Wd, N, colsum, ep, geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool IMPLICIT>
void launch_imma_t(const uint8_t* A, int64_t M, int64_t Kp, int64_t lda, bool xs8,
                   const int8_t* Wd, int64_t N, const int32_t* colsum, const EpiParams& ep,
                   const ConvGeo& geo, int device) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t sms = num_sms(device);
  const int64_t big = ((M + 127) / 128) * ((N + 127) / 128);
  const int64_t mid = ((M + 127) / 128) * ((N + 63) / 64);
  if (N > 64 && big >= 2 * sms)
    launch_imma_cfg<128, 128, 2, 4, IMPLICIT>(A, M, Kp, lda, xs8, Wd, N, colsum, ep, geo, stream);
  else if (mid >= sms)
    launch_imma_cfg<128, 64, 4, 2, IMPLICIT>(A, M, Kp, lda, xs8, Wd, N, colsum, ep, geo, stream);
  else  // fewer blocks than SMs at 128x64 (short M or few channels): smaller tiles, more blocks
    launch_imma_cfg<64, 64, 2, 2, IMPLICIT>(A, M, Kp, lda, xs8, Wd, N, colsum, ep, geo, stream);
}

// A: [M, Kp] rows of lda bytes (lda % 16 == 0, 16-byte aligned, columns K..Kp-1 zero), or the
// conv input through geo (geo.padbuf set). Wd: int8 [N, Kp]. Tile shape by problem size:
// 128x128 when that still fills two waves of the SMs, else 128x64 when that fills one, else
// 64x64 (short M: deep layers and linear layers at small batch).
void launch_imma(const uint8_t* A, int64_t M, int64_t Kp, int64_t lda, bool xs8, const int8_t* Wd,
                 int64_t N, const int32_t* colsum, const EpiParams& ep, int device,
                 const ConvGeo* geo = nullptr) {
  if (M == 0 || N == 0) return;
  TORCH_CHECK(M / 64 < 65535, "lcpaq: too many rows for one CUDA launch");
  if (geo != nullptr)
    launch_imma_t<true>(A, M, Kp, lda, xs8, Wd, N, colsum, ep, *geo, device);
  else
    launch_imma_t<false>(A, M, Kp, lda, xs8, Wd, N, colsum, ep, ConvGeo{}, device);
}

// Decoded weights of G groups: int8 [G, N, Kp] and int32 column sums [G, N].
std::pair<at::Tensor, at::Tensor> decode_weights(const at::Tensor& w, int bits, int64_t G,
                                                 int64_t N, int64_t K, int64_t Kp) {
  auto wd = at::empty({G, N, Kp}, w.options().dtype(at::kChar));
  auto cs = at::empty({G, N}, w.options().dtype(at::kInt));
  const int64_t n = G * N * Kp;
  if (n == 0) return {wd, cs};
  decode_weights_kernel<<<grid_for(n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w.data_ptr<uint8_t>(), bits, G, N, K, Kp, blob_bytes(bits, N, K), wd.data_ptr<int8_t>(),
      cs.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {wd, cs};
}

void launch_dp4a(const uint8_t* x, int64_t M, int64_t K, int64_t ldx, bool xs8,
                 const uint8_t* blob, int64_t N, int bits, const EpiParams& ep) {
  if (M == 0 || N == 0) return;
  dim3 block(TILE, TILE), grid((N + TILE - 1) / TILE, (M + TILE - 1) / TILE);
  auto stream = c10::cuda::getCurrentCUDAStream();
  qgemm_kernel<<<grid, block, 0, stream>>>(x, M, K, ldx, xs8, blob, N, bits, ep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// GEMM of a contiguous [M, K] activation matrix against one packed blob, by either path.
void gemm_any(const at::Tensor& x2d, bool xs8, const at::Tensor& w, int bits, int64_t N,
              const EpiParams& ep) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const int dev = x2d.get_device();
  if (!imma_ok(dev)) {
    launch_dp4a(static_cast<const uint8_t*>(x2d.data_ptr()), M, K, K, xs8, w.data_ptr<uint8_t>(),
                N, bits, ep);
    return;
  }
  const int64_t Kp = round16(K);
  at::Tensor a = x2d;
  if (Kp != K || reinterpret_cast<uintptr_t>(x2d.data_ptr()) % 16 != 0) {
    a = at::zeros({M, Kp}, x2d.options());
    a.narrow(1, 0, K).copy_(x2d);
  }
  auto [wd, cs] = decode_weights(w, bits, 1, N, K, Kp);
  launch_imma(static_cast<const uint8_t*>(a.data_ptr()), M, Kp, Kp, xs8, wd.data_ptr<int8_t>(), N,
              cs.data_ptr<int32_t>(), ep, dev);
}

EpiParams epi(const at::Tensor& comb, const c10::optional<at::Tensor>& fb, int64_t zx,
              double out_scale, int64_t out_zp, bool relu) {
  EpiParams ep{};
  ep.mode = out_scale > 0 ? 2 : 1;
  ep.scale = comb.data_ptr<float>();
  ep.bias = fb.has_value() ? fb->data_ptr<float>() : nullptr;
  ep.zx = zx;
  ep.inv_out = out_scale > 0 ? float(1.0 / out_scale) : 0.f;
  ep.out_zp = float(out_zp);
  ep.relu = relu;
  return ep;
}

c10::optional<at::Tensor> fbias(const c10::optional<at::Tensor>& b, int64_t n) {
  if (!b.has_value() || !b->defined()) return c10::nullopt;
  TORCH_CHECK(b->numel() == n, "lcpaq: bias has ", std::to_string(b->numel()), " values, expected ",
              std::to_string(n));
  return b->to(at::kFloat).contiguous();
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t bits, int64_t n, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kByte || x.scalar_type() == at::kChar,
              "lcpaq: activations must be uint8 or int8");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "lcpaq: w_bits must be 8, 4 or 2");
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kByte && w.dim() == 1 && w.is_contiguous(),
              "lcpaq: w_packed must be a contiguous 1-D uint8 CUDA tensor");
  TORCH_CHECK(K >= 1 && K <= 65536, "lcpaq: K out of range [1, 65536]");
}

at::Tensor qgemm_i32_cuda(const at::Tensor& x, const at::Tensor& w, int64_t bits, int64_t n) {
  TORCH_CHECK(x.dim() == 2, "lcpaq::qgemm_i32: x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  check(x, w, bits, n, K);
  TORCH_CHECK(w.numel() == blob_bytes(int(bits), n, K), "lcpaq: w_packed size mismatch");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto out = at::empty({M, n}, x.options().dtype(at::kInt));
  EpiParams ep{};
  ep.mode = 0;
  ep.out = out.data_ptr();
  ep.ldo = n;
  gemm_any(xc, x.scalar_type() == at::kChar, w, int(bits), n, ep);
  return out;
}

at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& w, int64_t bits, int64_t n,
                        const at::Tensor& w_scale, double x_scale, int64_t x_zp,
                        const c10::optional<at::Tensor>& bias, double out_scale, int64_t out_zp,
                        bool relu) {
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  check(x, w, bits, n, K);
  TORCH_CHECK(w.numel() == blob_bytes(int(bits), n, K), "lcpaq: w_packed size mismatch");
  c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape.back() = n;
  auto out = at::empty(shape, x.options().dtype(out_scale > 0 ? at::kByte : at::kFloat));
  auto xc = x.contiguous();
  auto comb = (w_scale.to(at::kFloat).contiguous() * float(x_scale)).contiguous();
  auto fb = fbias(bias, n);
  EpiParams ep = epi(comb, fb, x_zp, out_scale, out_zp, relu);
  ep.out = out.data_ptr();
  ep.ldo = n;
  gemm_any(xc.view({M, K}), x.scalar_type() == at::kChar, w, int(bits), n, ep);
  return out;
}

at::Tensor qconv2d_cuda(const at::Tensor& x, const at::Tensor& w, int64_t bits,
                        at::IntArrayRef ws, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, const at::Tensor& w_scale,
                        double x_scale, int64_t x_zp, const c10::optional<at::Tensor>& bias,
                        double out_scale, int64_t out_zp, bool relu) {
  TORCH_CHECK(x.dim() == 4 && ws.size() == 4, "lcpaq::qconv2d: x must be NCHW, weight 4-D");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = ws[0], cg = ws[1], KH = ws[2], KW = ws[3];
  TORCH_CHECK(groups >= 1 && C == cg * groups && Cout % groups == 0,
              "lcpaq::qconv2d: channel mismatch");
  const int64_t OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  const int64_t K = cg * KH * KW, coutg = Cout / groups, M = N * OH * OW;
  check(x, w, bits, coutg, K);
  const int64_t gb = blob_bytes(int(bits), coutg, K);
  TORCH_CHECK(w.numel() == gb * groups, "lcpaq: w_packed size mismatch");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({N, Cout, OH, OW}, x.options()
                                              .dtype(out_scale > 0 ? at::kByte : at::kFloat)
                                              .memory_format(at::MemoryFormat::ChannelsLast));
  auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto comb = (w_scale.to(at::kFloat).contiguous() * float(x_scale)).contiguous();
  auto fb = fbias(bias, Cout);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool xs8 = x.scalar_type() == at::kChar;
  const auto* xp = static_cast<const uint8_t*>(xc.data_ptr());
  const uint8_t pad = uint8_t(x_zp & 0xFF);
  const size_t osz = out_scale > 0 ? 1 : 4;
  if (M == 0 || Cout == 0) return out;
  const int dev = x.get_device();
  if (groups == C && cg == 1 && coutg == 1) {  // depthwise
    const int64_t Kp = KH * KW;
    auto [wd, cs] = decode_weights(w, int(bits), groups, 1, K, Kp);
    EpiParams ep = epi(comb, fb, x_zp, out_scale, out_zp, relu);
    ep.ldo = Cout;
    ep.out = out.data_ptr();
    const int64_t total = M * Cout;
    if (xs8)
      depthwise_kernel<true><<<grid_for(total, 256), 256, 0, stream>>>(
          xp, N, H, W, C, OH, OW, KH, KW, stride[0], stride[1], padding[0], padding[1],
          dilation[0], dilation[1], wd.data_ptr<int8_t>(), Kp, pad, cs.data_ptr<int32_t>(), ep);
    else
      depthwise_kernel<false><<<grid_for(total, 256), 256, 0, stream>>>(
          xp, N, H, W, C, OH, OW, KH, KW, stride[0], stride[1], padding[0], padding[1],
          dilation[0], dilation[1], wd.data_ptr<int8_t>(), Kp, pad, cs.data_ptr<int32_t>(), ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  const bool imma = imma_ok(dev);
  const int64_t Kp = imma ? round16(K) : K;
  // implicit GEMM (no im2col buffer) when every 16-byte chunk of a row lies in one tap
  const bool implicit = imma && cg % 16 == 0 && C % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(xp) % 16 == 0;
  at::Tensor wd, cs, cols, padbuf;
  if (imma) std::tie(wd, cs) = decode_weights(w, int(bits), groups, coutg, K, Kp);
  if (implicit)
    padbuf = at::full({16}, int64_t(pad), x.options().dtype(at::kByte));
  else
    cols = at::empty({M, Kp}, x.options());
  for (int64_t g = 0; g < groups; ++g) {
    EpiParams ep = epi(comb, fb, x_zp, out_scale, out_zp, relu);
    ep.scale += g * coutg;
    if (ep.bias != nullptr) ep.bias += g * coutg;
    ep.ldo = Cout;
    ep.out = static_cast<uint8_t*>(out.data_ptr()) + g * coutg * osz;
    if (implicit) {
      const ConvGeo geo{padbuf.data_ptr<uint8_t>(), H, W, C, OH, OW, KW, stride[0], stride[1],
                        padding[0], padding[1], dilation[0], dilation[1], g * cg, cg};
      launch_imma(xp, M, Kp, 0, xs8, wd.data_ptr<int8_t>() + g * coutg * Kp, coutg,
                  cs.data_ptr<int32_t>() + g * coutg, ep, dev, &geo);
      continue;
    }
    im2col_kernel<<<grid_for(M * KH * KW, 256), 256, 0, stream>>>(
        xp, static_cast<uint8_t*>(cols.data_ptr()), N, H, W, C, OH, OW, KH, KW, stride[0],
        stride[1], padding[0], padding[1], dilation[0], dilation[1], g * cg, cg, Kp, pad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto* A = static_cast<const uint8_t*>(cols.data_ptr());
    if (imma)
      launch_imma(A, M, Kp, Kp, xs8, wd.data_ptr<int8_t>() + g * coutg * Kp, coutg,
                  cs.data_ptr<int32_t>() + g * coutg, ep, dev);
    else
      launch_dp4a(A, M, K, K, xs8, w.data_ptr<uint8_t>() + g * gb, coutg, int(bits), ep);
  }
  return out;
}

at::Tensor quantize_act_cuda(const at::Tensor& x, double scale, int64_t zp, int64_t qmin,
                             int64_t qmax) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale > 0, "lcpaq::quantize_act: float32, scale>0");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(x.suggest_memory_format());
  auto out = at::empty_like(xc, xc.options().dtype(qmin < 0 ? at::kChar : at::kByte));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  quantize_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      xc.data_ptr<float>(), static_cast<uint8_t*>(out.data_ptr()), n, float(scale), float(zp),
      float(qmin), float(qmax));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcpaq, CUDA, m) {
  m.impl("qgemm_i32", &qgemm_i32_cuda);
  m.impl("qlinear", &qlinear_cuda);
  m.impl("qconv2d", &qconv2d_cuda);
  m.impl("quantize_act", &quantize_act_cuda);
}

}  // namespace lcpaq
