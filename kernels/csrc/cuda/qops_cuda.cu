// CUDA implementations of the lcpaq ops on the same packed-weight blob as the CPU (cpu/qgemm.h).
//
// Int8 path: activations are shifted to int8 (a = x - 128 for uint8) and 4 of them are packed in
// one 32-bit word; weights of every width (8-bit bytes, 4-bit nibbles, 2-bit crumbs) are decoded
// to int8 words and multiplied with __dp4a (sm_61+), exact int32 accumulation. A 16x16 tile of
// outputs per block stages activations and decoded weights in shared memory.
// Only c10/cuda headers are used (the local toolkit has no cuBLAS/cuSPARSE headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

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
  const int64_t raw = int64_t(acc) + int64_t(xs8 ? 0 : 128) * colsum[n];
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

// NHWC im2col rows in (kh, kw, c) order for one group, padded with the zero point.
__global__ void im2col_kernel(const uint8_t* __restrict__ x, uint8_t* __restrict__ cols,
                              int64_t Nb, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW,
                              int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                              int64_t pw, int64_t dh, int64_t dw, int64_t c0, int64_t cg,
                              uint8_t pad) {
  const int64_t K = KH * KW * cg, total = Nb * OH * OW * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    const int64_t c = k % cg, kw = (k / cg) % KW, kh = k / (cg * KW);
    const int64_t n = m / (OH * OW), r = m % (OH * OW), oh = r / OW, ow = r % OW;
    const int64_t ih = oh * sh - ph + kh * dh, iw = ow * sw - pw + kw * dw;
    cols[i] = (ih < 0 || ih >= H || iw < 0 || iw >= W) ? pad
                                                       : x[((n * H + ih) * W + iw) * C + c0 + c];
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

void launch_gemm(const uint8_t* x, int64_t M, int64_t K, int64_t ldx, bool xs8,
                 const uint8_t* blob, int64_t N, int bits, const EpiParams& ep) {
  if (M == 0 || N == 0) return;
  dim3 block(TILE, TILE), grid((N + TILE - 1) / TILE, (M + TILE - 1) / TILE);
  auto stream = c10::cuda::getCurrentCUDAStream();
  qgemm_kernel<<<grid, block, 0, stream>>>(x, M, K, ldx, xs8, blob, N, bits, ep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(b->numel() == n, "lcpaq: bias has ", b->numel(), " values, expected ", n);
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
  launch_gemm(static_cast<const uint8_t*>(xc.data_ptr()), M, K, K, x.scalar_type() == at::kChar,
              w.data_ptr<uint8_t>(), n, int(bits), ep);
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
  launch_gemm(static_cast<const uint8_t*>(xc.data_ptr()), M, K, K, x.scalar_type() == at::kChar,
              w.data_ptr<uint8_t>(), n, int(bits), ep);
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
  auto cols = at::empty({M, K}, x.options());
  auto comb = (w_scale.to(at::kFloat).contiguous() * float(x_scale)).contiguous();
  auto fb = fbias(bias, Cout);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool xs8 = x.scalar_type() == at::kChar;
  for (int64_t g = 0; g < groups; ++g) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((M * K + threads - 1) / threads, 65535);
    im2col_kernel<<<blocks, threads, 0, stream>>>(
        static_cast<const uint8_t*>(xc.data_ptr()), cols.data_ptr<uint8_t>(), N, H, W, C, OH,
        OW, KH, KW, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        g * cg, cg, uint8_t(x_zp & 0xFF));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    EpiParams ep = epi(comb, fb, x_zp, out_scale, out_zp, relu);
    ep.scale += g * coutg;
    if (ep.bias != nullptr) ep.bias += g * coutg;
    ep.ldo = Cout;
    ep.out = static_cast<uint8_t*>(out.data_ptr()) + g * coutg * (out_scale > 0 ? 1 : 4);
    launch_gemm(cols.data_ptr<uint8_t>(), M, K, K, xs8, w.data_ptr<uint8_t>() + g * gb, coutg,
                int(bits), ep);
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
