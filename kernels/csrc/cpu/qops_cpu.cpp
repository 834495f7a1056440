// CPU implementations of the lcpaq ops: activation packing (+ im2col), blocked GEMM driver over
// the micro-kernels, fused epilogue, all parallel with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "epilogue.h"
#include "qgemm.h"

namespace lcpaq {
namespace {

// Instruction set of the kernels: 0 scalar, 1 AVX2+FMA, 2 AVX-VNNI (ymm vpdpbusd micro-kernel,
// the rest AVX2), 3 AVX-512 VNNI (zmm micro-kernel, AVX-512 flip/epilogue/quantize; decode AVX2).
// The best the CPU has, or lower with LCPAQ_KERNELS_ISA=scalar|avx2|avxvnni (read per call, so
// tests and benchmarks can compare the paths in one process; avxvnni falls back to avx2 on CPUs
// without it, e.g. Zen 4, which has AVX-512 VNNI only).
int isa_level() {
  static const bool avx2 = cpu_has_avx2_fma(), avxvnni = avx2 && cpu_has_avxvnni();
  static const int best = !avx2 ? 0 : cpu_has_avx512vnni() ? 3 : avxvnni ? 2 : 1;
  const char* isa = std::getenv("LCPAQ_KERNELS_ISA");
  if (isa == nullptr) return best;
  if (std::strcmp(isa, "scalar") == 0) return 0;
  if (std::strcmp(isa, "avx2") == 0) return std::min(best, 1);
  if (std::strcmp(isa, "avxvnni") == 0) return avxvnni ? 2 : std::min(best, 1);
  return best;
}

struct Epilogue {
  int mode = 1;  // 0: raw int32 sum x*q, 1: float32, 2: uint8 requantized
  void* out = nullptr;
  int64_t ldo = 0;  // element (m, n) -> out[m * ldo + n]
  const float* scale = nullptr;  // combined x_scale * w_scale[n]
  const float* bias = nullptr;
  int64_t zx = 0;
  float inv_out = 0.f;
  float out_zp = 0.f;
  bool relu = false;
};

// Source rows of the activation matrix: plain [M, K] rows or NHWC im2col rows.
struct RowSource {
  const uint8_t* x = nullptr;
  int64_t K = 0;
  bool conv = false;
  int64_t H = 0, W = 0, C = 0, OH = 0, OW = 0, KH = 1, KW = 1, sh = 1, sw = 1, ph = 0, pw = 0,
          dh = 1, dw = 1, c0 = 0, cg = 0;
  uint8_t pad = 0;

  template <class Copy, class Fill>
  void row(int64_t m, Copy copy, Fill fill) const {
    if (!conv) {
      copy(0, x + m * K, K);
      return;
    }
    const int64_t n = m / (OH * OW), r = m % (OH * OW), oh = r / OW, ow = r % OW;
    const bool rows_contiguous = dw == 1 && cg == C;  // KW pixels x C channels adjacent in NHWC
    for (int64_t kh = 0; kh < KH; ++kh) {
      const int64_t ih = oh * sh - ph + kh * dh;
      if (ih < 0 || ih >= H) {
        fill(kh * KW * cg, KW * cg);
        continue;
      }
      const int64_t iw0 = ow * sw - pw;
      if (rows_contiguous) {
        const int64_t kw0 = std::max<int64_t>(0, -iw0), kw1 = std::min<int64_t>(KW, W - iw0);
        const int64_t off = kh * KW * cg;
        if (kw0 > 0) fill(off, kw0 * cg);
        if (kw1 > kw0) copy(off + kw0 * cg, x + ((n * H + ih) * W + iw0 + kw0) * C, (kw1 - kw0) * cg);
        if (kw1 < KW) fill(off + std::max(kw0, kw1) * cg, (KW - std::max(kw0, kw1)) * cg);
        continue;
      }
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = iw0 + kw * dw;
        const int64_t off = (kh * KW + kw) * cg;
        if (iw < 0 || iw >= W) {
          fill(off, cg);
        } else {
          copy(off, x + ((n * H + ih) * W + iw) * C + c0, cg);
        }
      }
    }
  }
};

int64_t layout_bits(int64_t bits) { return bits == 7 ? 8 : bits; }  // 7-bit: 8-bit blob layout

constexpr int64_t kNCP = 4;  // panels (of kNR channels) per task

void gemm(int bits, bool xs8, int64_t M, int64_t N, const uint8_t* blob, const RowSource& src,
          const Epilogue& ep) {
  const int64_t K = src.K;
  const int isa = isa_level();
  const bool avx2 = isa >= 1, vnni = isa >= 2, zmm = isa >= 3;
  if (bits == 7 && !avx2) bits = 8;  // same blob, exact either way
  // VNNI: 8-bit blobs take the 7-bit route (uint8 activations x int8 weights in 4-k steps), exact
  // for the full int8 range there (vpdpbusd does not saturate)
  if (bits == 8 && vnni) bits = 7;
  const bool w7 = bits == 7;
  // unsigned activations x signed weights (4-k steps): W7 on AVX2, every width on VNNI (W4/W2
  // weights decoded to q = u - 2^(bits-1) there: no activation flip, no row sums)
  const bool xu = w7 || vnni;
  const int lbits = int(layout_bits(bits));
  // W7: 4-k steps over the 8-bit blob's 2-k steps (bsteps per panel)
  const int64_t bsteps = num_ksteps(lbits, K);
  const int64_t ksteps = w7 ? (K + 3) / 4 : bsteps, Kpad = ksteps * (w7 ? 4 : kstep_k(bits));
  const int64_t Mpad = (M + kMR - 1) / kMR * kMR, Npad = pad_n(N), P = Npad / kNR;
  const bool w8 = bits == 8;
  const int64_t esize = w8 ? 2 : 1;
  // activations row-major (layout in qgemm.h); pad the stride off multiples of 1 KiB
  int64_t lda = Kpad * esize;
  if (lda % 1024 == 0) lda += 64;
  const auto widen = avx2 ? widen_row_avx2 : widen_row_scalar;
  const auto flipr = zmm ? flip_row_avx512 : avx2 ? flip_row_avx2 : flip_row_scalar;
  const auto sumr = avx2 ? sum_row_avx2 : sum_row_scalar;  // (the VNNI route needs no sums)
  const auto epir = zmm ? epilogue_row_avx512 : avx2 ? epilogue_row_avx2 : epilogue_row_scalar;
  // one packed activation row; returns its sum (W4/W2 correction term)
  auto pack_row = [&](int64_t m, uint8_t* row) -> int32_t {
    if (w8) {
      int16_t* d = reinterpret_cast<int16_t*>(row);
      const int16_t padv = xs8 ? int16_t(int8_t(src.pad)) : int16_t(src.pad);
      src.row(
          m, [&](int64_t off, const uint8_t* s, int64_t n) { widen(d + off, s, n, xs8); },
          [&](int64_t off, int64_t n) { std::fill(d + off, d + off + n, padv); });
      std::fill(d + K, d + Kpad, int16_t(0));
      return 0;
    }
    // W4/W2 on AVX2: a = x - 128 for uint8 (flip the top bit), a = x for int8;
    // xu route: uint8 as is, int8 + 128 (flip) for the unsigned slot
    int8_t* d = reinterpret_cast<int8_t*>(row);
    const uint8_t flip = (xs8 != xu) ? 0 : 0x80;
    const int8_t padv = int8_t(src.pad ^ flip);
    src.row(
        m, [&](int64_t off, const uint8_t* s, int64_t n) { flipr(d + off, s, n, flip); },
        [&](int64_t off, int64_t n) { std::fill(d + off, d + off + n, padv); });
    std::fill(d + K, d + Kpad, int8_t(0));
    return xu ? 0 : sumr(d, K);  // xu needs no row sums (weights are not offset)
  };

  const int32_t* colsum = reinterpret_cast<const int32_t*>(blob);
  const uint8_t* panels = blob + 4 * Npad;
  const int64_t sb = step_bytes(lbits);
  const int64_t KC = 128;               // k-steps per block (256 or 512 k values)
  // tasks of up to MC rows x 64 output channels. MC: as many rows as keep the packed block within
  // ~256 KiB of L2, 96..384 (each task decodes every weight panel once: with the VNNI kernels
  // 96-row tasks lost 2-7 % to it). The row blocks are made equal (a multiple of kMR each) and
  // their number a multiple of the threads, so that the threads' contiguous task ranges carry
  // equal work (M=128 as 96+36 rows gave 2 threads only 1.4x)
  const int64_t MC0 = std::clamp<int64_t>(256 * 1024 / lda / kMR * kMR, 16 * kMR, 64 * kMR);
  const int64_t NCP = kNCP, nth = at::get_num_threads();
  int64_t mb0 = (Mpad + MC0 - 1) / MC0;
  if (mb0 >= 2 * nth) mb0 = (mb0 + nth - 1) / nth * nth;  // a multiple of the threads: balance
  const int64_t MC = ((Mpad + mb0 - 1) / mb0 + kMR - 1) / kMR * kMR;
  const int64_t ldc = NCP * kNR;
  const int64_t mb = (Mpad + MC - 1) / MC, nb = (P + NCP - 1) / NCP;
  const Micro micro = vnni        ? micro_avxvnni  // (zmm: micro_vnni below)
                      : w7        ? micro_w7_avx2
                      : bits == 8 ? (avx2 ? micro_w8_avx2 : micro_w8_scalar)
                      : bits == 4 ? (avx2 ? micro_w4_avx2 : micro_u8_scalar)
                                  : (avx2 ? micro_w2_avx2 : micro_u8_scalar);
  const Decode decode = bits == 8   ? (avx2 ? decode_w8_avx2 : decode_w8_scalar)
                        : bits == 4 ? (xu ? decode_w4s_avx2 : avx2 ? decode_w4_avx2 : decode_w4_scalar)
                                    : (xu ? decode_w2s_avx2 : avx2 ? decode_w2_avx2 : decode_w2_scalar);
  const int64_t h = (bits == 8 || xu) ? 0 : (int64_t(1) << (bits - 1));
  // W4/W2 on AVX2 shift uint8 activations by -128; the xu route shifts int8 ones by +128
  const int64_t offx = xu ? (xs8 ? -128 : 0) : ((xs8 || w8) ? 0 : 128);

  // rows [m0, m0 + mrows) (A points at row m0, rs at its row sums) x panels [p0, p0 + np)
  auto compute = [&](const uint8_t* A, const int32_t* rs, int64_t m0, int64_t mrows, int64_t p0,
                     int64_t np, int32_t* cbuf, uint8_t* wd) {
    // accumulators start at the zero-point corrections, so the epilogue reads finished sums:
    // colmul * colsum[n] - h * rowsum[m] (exact modulo 2^32, see epilogue.h)
    const int64_t n0 = p0 * kNR, ncol = np * kNR;
    const int32_t colmul = int32_t(offx - (ep.mode == 0 ? 0 : ep.zx));
    int32_t colterm[kNCP * kNR];
    for (int64_t i = 0; i < ncol; ++i) colterm[i] = colmul * colsum[n0 + i];
    for (int64_t r = 0; r < mrows; ++r) {
      const int32_t rc = int32_t(h * rs[r]);
      int32_t* c = cbuf + r * ldc;
      for (int64_t i = 0; i < ncol; ++i) c[i] = colterm[i] - rc;
    }
    // decoded panel p of k-block [k0, k0 + ks) into out
    auto dec = [&](int64_t p, int64_t k0, int64_t ks, uint8_t* out) {
      if (w7) {
        decode_w7_avx2(panels + ((p0 + p) * bsteps + 2 * k0) * sb, ks,
                       std::min(2 * ks, bsteps - 2 * k0), out);
      } else {
        decode(panels + ((p0 + p) * ksteps + k0) * sb, ks, out);
      }
    };
    for (int64_t k0 = 0; k0 < ksteps; k0 += KC) {
      const int64_t ks = std::min(KC, ksteps - k0);
      if (zmm) {  // two panels (32 channels) per micro-tile
        uint8_t* wd1 = wd + KC * kDecStep;
        for (int64_t p = 0; p < np; p += 2) {
          const bool two = p + 1 < np;
          dec(p, k0, ks, wd);
          if (two) dec(p + 1, k0, ks, wd1);
          for (int64_t r = 0; r < mrows; r += kMR) {
            micro_vnni(A + r * lda + k0 * 4, lda, wd, two ? wd1 : nullptr, ks,
                   cbuf + r * ldc + p * kNR, ldc);
          }
        }
        continue;
      }
      for (int64_t p = 0; p < np; ++p) {
        dec(p, k0, ks, wd);
        for (int64_t r = 0; r < mrows; r += kMR) {
          micro(A + r * lda + k0 * 4, lda, wd, ks, cbuf + r * ldc + p * kNR, ldc);
        }
      }
    }
    // fused epilogue, one vectorized row segment at a time
    const int64_t mend = std::min(m0 + mrows, M), nend = std::min(n0 + ncol, N);
    RowEpi re{};
    re.mode = ep.mode;
    re.scale = ep.scale + n0;
    re.bias = ep.bias != nullptr ? ep.bias + n0 : nullptr;
    re.relu = ep.relu;
    re.inv_out = ep.inv_out;
    re.out_zp = ep.out_zp;
    const int64_t esz = ep.mode == 2 ? 1 : 4;
    for (int64_t m = m0; m < mend; ++m) {
      epir(cbuf + (m - m0) * ldc, nend - n0, re,
           static_cast<uint8_t*>(ep.out) + (m * ep.ldo + n0) * esz);
    }
  };
  auto aligned = [](std::unique_ptr<uint8_t[]>& buf, int64_t bytes) {
    buf.reset(new uint8_t[bytes + 64]);
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) &
                                      ~uintptr_t(63));
  };

  if (mb >= 2 * at::get_num_threads()) {
    // Enough row blocks: each task packs its own MC rows (they stay in L2) and sweeps all N.
    at::parallel_for(0, mb, 1, [&](int64_t b, int64_t e) {
      std::vector<int32_t> cbuf(MC * ldc), rs(MC);
      std::unique_ptr<uint8_t[]> wbuf, abuf;
      uint8_t* wd = aligned(wbuf, 2 * KC * kDecStep);
      uint8_t* la = aligned(abuf, MC * lda);
      for (int64_t t = b; t < e; ++t) {
        const int64_t m0 = t * MC, mrows = std::min(MC, Mpad - m0);
        for (int64_t r = 0; r < mrows; ++r) {
          if (m0 + r < M) {
            rs[r] = pack_row(m0 + r, la + r * lda);
          } else {
            std::memset(la + r * lda, 0, lda);
            rs[r] = 0;
          }
        }
        for (int64_t p0 = 0; p0 < P; p0 += NCP) {
          compute(la, rs.data(), m0, mrows, p0, std::min(NCP, P - p0), cbuf.data(), wd);
        }
      }
    });
    return;
  }
  // Few rows: pack all of A once, then parallelize over (row block, channel block) tasks.
  std::unique_ptr<uint8_t[]> abuf(new uint8_t[Mpad * lda]);
  std::vector<int32_t> rowsum(Mpad, 0);
  std::memset(abuf.get() + M * lda, 0, (Mpad - M) * lda);
  auto pack = [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) rowsum[m] = pack_row(m, abuf.get() + m * lda);
  };
  if (M * K < (int64_t(1) << 20)) {
    pack(0, M);  // small: one parallel region fewer (each costs a fork/join)
  } else {
    at::parallel_for(0, M, 16, pack);
  }
  at::parallel_for(0, mb * nb, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> cbuf(MC * ldc);
    std::unique_ptr<uint8_t[]> wbuf;
    uint8_t* wd = aligned(wbuf, 2 * KC * kDecStep);
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = (t / nb) * MC, p0 = (t % nb) * NCP;
      compute(abuf.get() + m0 * lda, rowsum.data() + m0, m0, std::min(MC, Mpad - m0), p0,
              std::min(NCP, P - p0), cbuf.data(), wd);
    }
  });
}

// Integers in error messages go through std::to_string, not c10::str's ostream: on one GPU
// machine (gcc 13.3, torch 2.11) formatting an integer through the stream crashed the process
// instead of raising (numeric stream facets of two C++ runtimes), while strings formatted fine.
std::string num(int64_t v) { return std::to_string(v); }

void check_common(const at::Tensor& x, const at::Tensor& w, int64_t bits, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kByte || x.scalar_type() == at::kChar,
              "lcpaq: activations must be uint8 or int8, got ", x.scalar_type(),
              "; quantize them first (lcpaq.kernels.quantize_act)");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 1 && w.is_contiguous(),
              "lcpaq: w_packed must be a contiguous 1-D uint8 blob from lcpaq.kernels.pack_weight");
  TORCH_CHECK(bits == 8 || bits == 7 || bits == 4 || bits == 2,
              "lcpaq: w_bits must be 8, 7, 4 or 2, got ", num(bits));
  TORCH_CHECK(K >= 1 && K <= 65536, "lcpaq: reduction size K=", num(K),
              " out of range [1, 65536] (int32 accumulation must not overflow)");
}

Epilogue make_epilogue(const at::Tensor& comb, const c10::optional<at::Tensor>& bias,
                       int64_t x_zp, double out_scale, int64_t out_zp, bool relu) {
  Epilogue ep;
  ep.mode = out_scale > 0 ? 2 : 1;
  ep.scale = comb.data_ptr<float>();
  ep.bias = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  ep.zx = x_zp;
  ep.inv_out = out_scale > 0 ? static_cast<float>(1.0 / out_scale) : 0.f;
  ep.out_zp = static_cast<float>(out_zp);
  ep.relu = relu;
  return ep;
}

at::Tensor combined_scale(const at::Tensor& w_scale, double x_scale, int64_t n) {
  TORCH_CHECK(w_scale.numel() == n, "lcpaq: w_scale has ", num(w_scale.numel()), " values, expected ",
              num(n), " (one per output channel)");
  return (w_scale.to(at::kFloat).contiguous() * static_cast<float>(x_scale)).contiguous();
}

c10::optional<at::Tensor> float_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return c10::nullopt;
  TORCH_CHECK(bias->numel() == n, "lcpaq: bias has ", num(bias->numel()), " values, expected ", num(n));
  return bias->to(at::kFloat).contiguous();
}

at::Tensor qgemm_i32_cpu(const at::Tensor& x, const at::Tensor& w_packed, int64_t bits,
                         int64_t n) {
  TORCH_CHECK(x.dim() == 2, "lcpaq::qgemm_i32: x must be 2-D [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  check_common(x, w_packed, bits, K);
  TORCH_CHECK(w_packed.numel() == blob_bytes(layout_bits(bits), n, K), "lcpaq: w_packed has ",
              num(w_packed.numel()), " bytes, expected ", num(blob_bytes(layout_bits(bits), n, K)),
              " for N=", num(n), " K=", num(K), " bits=", num(bits));
  auto xc = x.contiguous();
  auto out = at::empty({M, n}, x.options().dtype(at::kInt));
  if (M == 0 || n == 0) return out;
  RowSource src;
  src.x = static_cast<const uint8_t*>(xc.data_ptr());
  src.K = K;
  Epilogue ep;
  ep.mode = 0;
  ep.out = out.data_ptr();
  ep.ldo = n;
  gemm(int(bits), x.scalar_type() == at::kChar, M, n, w_packed.data_ptr<uint8_t>(), src, ep);
  return out;
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& w_packed, int64_t bits, int64_t n,
                       const at::Tensor& w_scale, double x_scale, int64_t x_zp,
                       const c10::optional<at::Tensor>& bias, double out_scale, int64_t out_zp,
                       bool relu) {
  TORCH_CHECK(x.dim() >= 1, "lcpaq::qlinear: x must have a last dimension K");
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  check_common(x, w_packed, bits, K);
  TORCH_CHECK(w_packed.numel() == blob_bytes(layout_bits(bits), n, K), "lcpaq: w_packed has ",
              num(w_packed.numel()), " bytes, expected ", num(blob_bytes(layout_bits(bits), n, K)));
  auto shape = x.sizes().vec();
  shape.back() = n;
  auto out = at::empty(shape, x.options().dtype(out_scale > 0 ? at::kByte : at::kFloat));
  if (M == 0 || n == 0) return out;
  auto xc = x.contiguous();
  auto comb = combined_scale(w_scale, x_scale, n);
  auto fb = float_bias(bias, n);
  Epilogue ep = make_epilogue(comb, fb, x_zp, out_scale, out_zp, relu);
  ep.out = out.data_ptr();
  ep.ldo = n;
  RowSource src;
  src.x = static_cast<const uint8_t*>(xc.data_ptr());
  src.K = K;
  gemm(int(bits), x.scalar_type() == at::kChar, M, n, w_packed.data_ptr<uint8_t>(), src, ep);
  return out;
}

at::Tensor qconv2d_cpu(const at::Tensor& x, const at::Tensor& w_packed, int64_t bits,
                       at::IntArrayRef wshape, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, const at::Tensor& w_scale,
                       double x_scale, int64_t x_zp, const c10::optional<at::Tensor>& bias,
                       double out_scale, int64_t out_zp, bool relu) {
  TORCH_CHECK(x.dim() == 4, "lcpaq::qconv2d: x must be NCHW");
  TORCH_CHECK(wshape.size() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "lcpaq::qconv2d: weight_shape needs 4 values, stride/padding/dilation 2 each");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = wshape[0], cg = wshape[1], KH = wshape[2], KW = wshape[3];
  TORCH_CHECK(groups >= 1 && C == cg * groups && Cout % groups == 0,
              "lcpaq::qconv2d: channels do not match: x has ", num(C), " channels, weight expects ",
              num(cg), " x groups ", num(groups), ", Cout ", num(Cout));
  const int64_t OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "lcpaq::qconv2d: empty output");
  const int64_t K = cg * KH * KW, coutg = Cout / groups;
  check_common(x, w_packed, bits, K);
  const int64_t gb = blob_bytes(layout_bits(bits), coutg, K);
  TORCH_CHECK(w_packed.numel() == gb * groups, "lcpaq: w_packed has ", num(w_packed.numel()),
              " bytes, expected ", num(gb * groups), " (", num(groups), " groups)");
  auto out = at::empty({N, Cout, OH, OW}, x.options()
                                              .dtype(out_scale > 0 ? at::kByte : at::kFloat)
                                              .memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0) return out;
  auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto comb = combined_scale(w_scale, x_scale, Cout);
  auto fb = float_bias(bias, Cout);
  const bool xs8 = x.scalar_type() == at::kChar;
  RowSource src;
  src.x = static_cast<const uint8_t*>(xc.data_ptr());
  src.K = K;
  src.conv = true;
  src.H = H, src.W = W, src.C = C, src.OH = OH, src.OW = OW, src.KH = KH, src.KW = KW;
  src.sh = stride[0], src.sw = stride[1], src.ph = padding[0], src.pw = padding[1];
  src.dh = dilation[0], src.dw = dilation[1], src.cg = cg;
  src.pad = static_cast<uint8_t>(x_zp & 0xFF);
  for (int64_t g = 0; g < groups; ++g) {
    src.c0 = g * cg;
    Epilogue ep = make_epilogue(comb, fb, x_zp, out_scale, out_zp, relu);
    const int64_t col0 = g * coutg;
    ep.scale += col0;
    if (ep.bias != nullptr) ep.bias += col0;
    ep.ldo = Cout;
    const int64_t esz = out_scale > 0 ? 1 : 4;
    ep.out = static_cast<uint8_t*>(out.data_ptr()) + col0 * esz;
    gemm(int(bits), xs8, N * OH * OW, coutg, w_packed.data_ptr<uint8_t>() + g * gb, src, ep);
  }
  return out;
}

at::Tensor quantize_act_cpu(const at::Tensor& x, double scale, int64_t zp, int64_t qmin,
                            int64_t qmax) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "lcpaq::quantize_act: x must be float32");
  TORCH_CHECK(scale > 0, "lcpaq::quantize_act: scale must be > 0");
  TORCH_CHECK(qmin <= qmax && (qmin >= 0 ? qmax <= 255 : (qmin >= -128 && qmax <= 127)),
              "lcpaq::quantize_act: [qmin, qmax] must fit uint8 (qmin >= 0) or int8");
  auto xc = x.contiguous(x.suggest_memory_format());
  auto out = at::empty_like(xc, xc.options().dtype(qmin < 0 ? at::kChar : at::kByte));
  // Same arithmetic as the fake-quant path: round_half_even(x / scale) + zp, clamped.
  const float sc = static_cast<float>(scale), z = static_cast<float>(zp);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const float* s = xc.data_ptr<float>();
  uint8_t* d = static_cast<uint8_t*>(out.data_ptr());
  const int isa = isa_level();
  const auto qrow = isa >= 3 ? quantize_row_avx512 : isa == 1 ? quantize_row_avx2 : quantize_row_scalar;
  at::parallel_for(0, xc.numel(), 16384, [&](int64_t b, int64_t e) {
    qrow(s + b, d + b, e - b, sc, z, lo, hi);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcpaq, CPU, m) {
  m.impl("qgemm_i32", &qgemm_i32_cpu);
  m.impl("qlinear", &qlinear_cpu);
  m.impl("qconv2d", &qconv2d_cpu);
  m.impl("quantize_act", &quantize_act_cpu);
}

}  // namespace lcpaq
