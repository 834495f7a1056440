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

// Per-thread scratch memory kept between calls (grow-only up to kKeepBytes): the packed
// activations, C tiles and decoded weights of a call need no allocation or fresh pages.
class Scratch {
 public:
  // 64-byte-aligned memory for `bytes`, valid until the next get() of this slot on this thread
  uint8_t* get(int64_t bytes) {
    if (bytes > cap_) {
      buf_.reset(new uint8_t[bytes + 64]);
      cap_ = bytes;
    }
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf_.get()) + 63) &
                                      ~uintptr_t(63));
  }
  // give a large buffer back after the call (one huge GEMM must not pin its memory)
  void trim() {
    if (cap_ > kKeepBytes) {
      buf_.reset();
      cap_ = 0;
    }
  }

 private:
  static constexpr int64_t kKeepBytes = int64_t(8) << 20;
  std::unique_ptr<uint8_t[]> buf_;
  int64_t cap_ = 0;
};
int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }
thread_local Scratch scratch_shared, scratch_task;

// How a GEMM of one weight width runs on this CPU: the micro-kernel, the weight decode and the
// packed activation element. Shared by the im2col GEMM and the direct convolution.
struct Route {
  int bits = 8;      // kernel width after the substitutions below (8, 7, 4, 2)
  bool w8 = false;   // full-range W8 on AVX2/scalar: int16 activations, 2-k steps
  bool w7 = false;   // 8-bit blob read as 4-k steps (AVX2 W7, and W8/W7 on VNNI)
  bool zmm = false;  // AVX-512 VNNI: two panels per micro-kernel call
  bool avx2 = false;
  int64_t esize = 1;  // bytes per packed activation value
  int64_t kk = 4;     // k values per kernel step
  int64_t bsteps = 0, ksteps = 0;  // blob steps, kernel steps per panel (K values: ksteps * kk)
  int64_t sb = 0;     // blob bytes per blob step
  int64_t offx = 0;   // activations are packed as x + offx (int8 in the unsigned slot: +128)
  uint8_t flip = 0;   // packing of 1-byte values: x ^ flip
  Micro micro = nullptr;
  Decode decode = nullptr;
  void (*epilogue)(const int32_t*, int64_t, const RowEpi&, void*) = nullptr;

  // kernel steps [k0, k0 + ks) of panel p (panels: the blob after its column sums) into out
  void dec(const uint8_t* panels, int64_t p, int64_t k0, int64_t ks, uint8_t* out) const {
    if (w7) {
      decode_w7_avx2(panels + (p * bsteps + 2 * k0) * sb, ks, std::min(2 * ks, bsteps - 2 * k0),
                     out);
    } else {
      decode(panels + (p * ksteps + k0) * sb, ks, out);
    }
  }
  // C[6][16] (+ C[6][16..32] for W1) += A-tile x decoded panel(s) W0 (W1)
  void tile(const uint8_t* A, int64_t lda, const uint8_t* W0, const uint8_t* W1, int64_t steps,
            int32_t* C, int64_t ldc) const {
    if (zmm) return micro_vnni(A, lda, W0, W1, steps, C, ldc);
    micro(A, lda, W0, steps, C, ldc);
    if (W1 != nullptr) micro(A, lda, W1, steps, C + kNR, ldc);
  }
};

Route make_route(int bits, bool xs8, int64_t K) {
  Route r;
  const int isa = isa_level();
  r.avx2 = isa >= 1;
  const bool vnni = isa >= 2;
  r.zmm = isa >= 3;
  if (bits == 7 && !r.avx2) bits = 8;  // same blob, exact either way
  // VNNI: 8-bit blobs take the 7-bit route (uint8 activations x int8 weights in 4-k steps), exact
  // for the full int8 range there (vpdpbusd does not saturate)
  if (bits == 8 && vnni) bits = 7;
  r.bits = bits;
  r.w7 = bits == 7;
  r.w8 = bits == 8;
  r.esize = r.w8 ? 2 : 1;
  r.kk = r.w8 ? 2 : 4;
  const int lbits = int(layout_bits(bits));
  r.bsteps = num_ksteps(lbits, K);
  r.ksteps = r.w7 ? (K + 3) / 4 : r.bsteps;  // W7: 4-k steps over the 8-bit blob's 2-k steps
  r.sb = step_bytes(lbits);
  // every route but W8's int16 one has the activations in vpmaddubsw's / vpdpbusd's unsigned
  // slot: uint8 as stored, int8 flipped to x + 128 (corrected with 128 * colsum)
  r.offx = (xs8 && !r.w8) ? -128 : 0;
  r.flip = (xs8 && !r.w8) ? 0x80 : 0;
  const bool avx2 = r.avx2;
  r.micro = vnni        ? micro_avxvnni  // (zmm: micro_vnni)
            : r.w7      ? micro_w7_avx2
            : r.w8      ? (avx2 ? micro_w8_avx2 : micro_w8_scalar)
            : bits == 4 ? (avx2 ? micro_w4_avx2 : micro_xu_scalar)
                        : (avx2 ? micro_w2_avx2 : micro_xu_scalar);
  r.decode = r.w8        ? (avx2 ? decode_w8_avx2 : decode_w8_scalar)
             : bits == 4 ? (avx2 ? decode_w4s_avx2 : decode_w4s_scalar)
                         : (avx2 ? decode_w2s_avx2 : decode_w2s_scalar);
  r.epilogue = r.zmm ? epilogue_row_avx512 : avx2 ? epilogue_row_avx2 : epilogue_row_scalar;
  return r;
}

// Accumulators start at the zero-point corrections, so the epilogue reads finished sums:
// colmul * colsum[n] (exact modulo 2^32, see epilogue.h). Fills rows [0, rows) x ncol of cbuf.
void init_tile_rows(const Route& rt, const Epilogue& ep, const int32_t* colsum, int64_t n0,
                    int64_t ncol, int64_t rows, int32_t* cbuf, int64_t ldc) {
  const int32_t colmul = int32_t(rt.offx - (ep.mode == 0 ? 0 : ep.zx));
  int32_t colterm[kNCP * kNR];
  for (int64_t i = 0; i < ncol; ++i) colterm[i] = colmul * colsum[n0 + i];
  for (int64_t r = 0; r < rows; ++r) std::memcpy(cbuf + r * ldc, colterm, ncol * 4);
}

// fused epilogue of output rows [m0, mend) x columns [n0, nend) from cbuf (row m0 first)
void epilogue_rows(const Route& rt, const Epilogue& ep, const int32_t* cbuf, int64_t ldc,
                   int64_t m0, int64_t mend, int64_t n0, int64_t nend) {
  RowEpi re{};
  re.mode = ep.mode;
  re.scale = ep.scale + n0;
  re.bias = ep.bias != nullptr ? ep.bias + n0 : nullptr;
  re.relu = ep.relu;
  re.inv_out = ep.inv_out;
  re.out_zp = ep.out_zp;
  const int64_t esz = ep.mode == 2 ? 1 : 4;
  for (int64_t m = m0; m < mend; ++m) {
    rt.epilogue(cbuf + (m - m0) * ldc, nend - n0, re,
                static_cast<uint8_t*>(ep.out) + (m * ep.ldo + n0) * esz);
  }
}

void gemm(int bits, bool xs8, int64_t M, int64_t N, const uint8_t* blob, const RowSource& src,
          const Epilogue& ep) {
  const int64_t K = src.K;
  const Route rt = make_route(bits, xs8, K);
  const bool avx2 = rt.avx2, w8 = rt.w8;
  const int64_t ksteps = rt.ksteps, Kpad = ksteps * rt.kk;
  const int64_t Mpad = (M + kMR - 1) / kMR * kMR, Npad = pad_n(N), P = Npad / kNR;
  // activations row-major (layout in qgemm.h); pad the stride off multiples of 1 KiB
  int64_t lda = Kpad * rt.esize;
  if (lda % 1024 == 0) lda += 64;
  const auto widen = avx2 ? widen_row_avx2 : widen_row_scalar;
  const auto flipr = rt.zmm ? flip_row_avx512 : avx2 ? flip_row_avx2 : flip_row_scalar;
  // one packed activation row
  auto pack_row = [&](int64_t m, uint8_t* row) {
    if (w8) {
      int16_t* d = reinterpret_cast<int16_t*>(row);
      const int16_t padv = xs8 ? int16_t(int8_t(src.pad)) : int16_t(src.pad);
      src.row(
          m, [&](int64_t off, const uint8_t* s, int64_t n) { widen(d + off, s, n, xs8); },
          [&](int64_t off, int64_t n) { std::fill(d + off, d + off + n, padv); });
      std::fill(d + K, d + Kpad, int16_t(0));
      return;
    }
    int8_t* d = reinterpret_cast<int8_t*>(row);
    const int8_t padv = int8_t(src.pad ^ rt.flip);
    src.row(
        m, [&](int64_t off, const uint8_t* s, int64_t n) { flipr(d + off, s, n, rt.flip); },
        [&](int64_t off, int64_t n) { std::fill(d + off, d + off + n, padv); });
    std::fill(d + K, d + Kpad, int8_t(0));
  };

  const int32_t* colsum = reinterpret_cast<const int32_t*>(blob);
  const uint8_t* panels = blob + 4 * Npad;
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
  // Plain uint8 rows on a 1-byte route are their own packed form: the micro-kernels read them in
  // place (no copy). Each row's last step reads up to 3 bytes of the next row, which meet the zero
  // weights that pad K. Not for K a multiple of 1 KiB (cache-set aliasing of the rows).
  const bool in_place = !src.conv && rt.flip == 0 && !w8 && K % 1024 != 0;

  // rows [m0, m0 + mrows) (A points at row m0, rows lda_a bytes apart) x panels [p0, p0 + np)
  auto compute = [&](const uint8_t* A, int64_t lda_a, int64_t m0, int64_t mrows, int64_t p0,
                     int64_t np, int32_t* cbuf, uint8_t* wd) {
    const int64_t n0 = p0 * kNR, ncol = np * kNR;
    init_tile_rows(rt, ep, colsum, n0, ncol, mrows, cbuf, ldc);
    uint8_t* wd1 = wd + KC * kDecStep;
    for (int64_t k0 = 0; k0 < ksteps; k0 += KC) {
      const int64_t ks = std::min(KC, ksteps - k0);
      // two panels (32 channels) per pass: one micro-kernel call on AVX-512 VNNI, two otherwise
      for (int64_t p = 0; p < np; p += 2) {
        const bool two = p + 1 < np;
        rt.dec(panels, p0 + p, k0, ks, wd);
        if (two) rt.dec(panels, p0 + p + 1, k0, ks, wd1);
        for (int64_t r = 0; r < mrows; r += kMR) {
          rt.tile(A + r * lda_a + k0 * 4, lda_a, wd, two ? wd1 : nullptr, ks,
                  cbuf + r * ldc + p * kNR, ldc);
        }
      }
    }
    epilogue_rows(rt, ep, cbuf, ldc, m0, std::min(m0 + mrows, M), n0, std::min(n0 + ncol, N));
  };

  if (mb >= 2 * at::get_num_threads()) {
    // Enough row blocks: each task packs its own MC rows (they stay in L2) and sweeps all N.
    at::parallel_for(0, mb, 1, [&](int64_t b, int64_t e) {
      const int64_t ab = align64(MC * lda), cb = align64(MC * ldc * 4);
      uint8_t* la = scratch_task.get(ab + cb + 2 * KC * kDecStep);
      int32_t* cbuf = reinterpret_cast<int32_t*>(la + ab);
      uint8_t* wd = la + ab + cb;
      for (int64_t t = b; t < e; ++t) {
        const int64_t m0 = t * MC, mrows = std::min(MC, Mpad - m0);
        if (in_place && m0 + mrows < M) {  // (the last row's over-read would leave the tensor)
          for (int64_t p0 = 0; p0 < P; p0 += NCP) {
            compute(src.x + m0 * K, K, m0, mrows, p0, std::min(NCP, P - p0), cbuf, wd);
          }
          continue;
        }
        for (int64_t r = 0; r < mrows; ++r) {
          if (m0 + r < M) {
            pack_row(m0 + r, la + r * lda);
          } else {
            std::memset(la + r * lda, 0, lda);
          }
        }
        for (int64_t p0 = 0; p0 < P; p0 += NCP) {
          compute(la, lda, m0, mrows, p0, std::min(NCP, P - p0), cbuf, wd);
        }
      }
    });
    return;
  }
  if (rt.zmm && M == 1) {  // GEMV: the weights straight from the blob (gemv_vnni)
    uint8_t* row = scratch_shared.get(align64(Kpad + 64));
    pack_row(0, row);
    std::memset(row + Kpad, 0, 64);
    const int lbits = int(layout_bits(rt.bits));
    at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
      int32_t cbuf[kNCP * kNR];
      for (int64_t t = b; t < e; ++t) {
        const int64_t p0 = t * NCP, np = std::min(NCP, P - p0);
        init_tile_rows(rt, ep, colsum, p0 * kNR, np * kNR, 1, cbuf, ldc);
        gemv_vnni(lbits, row, panels + p0 * rt.bsteps * rt.sb, rt.bsteps, int(np), cbuf);
        epilogue_rows(rt, ep, cbuf, ldc, 0, 1, p0 * kNR, std::min((p0 + np) * kNR, N));
      }
    });
    scratch_shared.trim();
    return;
  }
  // Few rows: pack all of A once, then parallelize over (row block, channel block) tasks.
  uint8_t* abuf = scratch_shared.get(Mpad * lda);
  std::memset(abuf + M * lda, 0, (Mpad - M) * lda);
  auto pack = [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) pack_row(m, abuf + m * lda);
  };
  if (M * K < (int64_t(1) << 20)) {
    pack(0, M);  // small: one parallel region fewer (each costs a fork/join)
  } else {
    at::parallel_for(0, M, 16, pack);
  }
  at::parallel_for(0, mb * nb, 1, [&](int64_t b, int64_t e) {
    const int64_t cb = align64(MC * ldc * 4);
    int32_t* cbuf = reinterpret_cast<int32_t*>(scratch_task.get(cb + 2 * KC * kDecStep));
    uint8_t* wd = reinterpret_cast<uint8_t*>(cbuf) + cb;
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = (t / nb) * MC, p0 = (t % nb) * NCP;
      compute(abuf + m0 * lda, lda, m0, std::min(MC, Mpad - m0), p0,
              std::min(NCP, P - p0), cbuf, wd);
    }
  });
  scratch_shared.trim();
}

// Direct convolution for convs whose kernel rows are short runs of input (KW * C values, e.g. the
// 7x7 stride-2 stem: 7 columns x 3 channels = 21 bytes), where im2col spent more time copying
// runs than the GEMM spent on them. The micro-kernels read the padded input image itself: for
// kernel row kh, the 6 rows of a tile are 6 consecutive output pixels of one output row, sw * C
// values apart in input row oh * sh + kh * dh, each reading S = ceil(KW * C / kk) steps of its
// run. The weights are re-laid once per call to match: each kernel row's KW * C values padded
// with zero weights to S * kk, so the values read past a run (the next pixel's) meet zero
// weights and the sums stay exact. Padding pixels hold the zero point, as in im2col.
struct DirectPlan {
  int64_t L = 0, S = 0;      // values per kernel row, kernel steps per kernel row
  int64_t OWpad = 0, Hp = 0, Wp = 0;  // output row padded to whole tiles; padded image rows, pixels
};

DirectPlan direct_plan(const RowSource& src, const Route& rt) {
  DirectPlan d;
  d.L = src.KW * src.C;
  d.S = (d.L + rt.kk - 1) / rt.kk;
  d.OWpad = (src.OW + kMR - 1) / kMR * kMR;
  d.Hp = (src.OH - 1) * src.sh + (src.KH - 1) * src.dh + 1;
  const int64_t over = (d.S * rt.kk - d.L + src.C - 1) / src.C;  // pixels read past the last run
  d.Wp = std::max((d.OWpad - 1) * src.sw + src.KW + over, src.pw + src.W);
  return d;
}

// Worth it (and possible) for one group, unit column dilation and runs of at most 64 values;
// LCPAQ_KERNELS_DIRECT=0 (read per call) turns it off: im2col + GEMM, for comparisons.
bool direct_conv_fits(const RowSource& src, int64_t groups) {
  const char* env = std::getenv("LCPAQ_KERNELS_DIRECT");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return groups == 1 && src.dw == 1 && src.KW * src.C <= 64 && src.KH * src.KW > 1 &&
         src.H * src.W * src.C <= (int64_t(1) << 22);
}

void direct_conv(int bits, bool xs8, int64_t batch, int64_t N, const uint8_t* blob,
                 const RowSource& src, const Epilogue& ep) {
  const Route rt = make_route(bits, xs8, src.K);
  const DirectPlan d = direct_plan(src, rt);
  const int64_t C = src.C, es = rt.esize, Npad = pad_n(N), P = Npad / kNR;
  const int64_t T = src.KH * d.S;       // kernel steps per output pixel
  const int64_t rowb = d.Wp * C * es;   // bytes per padded image row
  const int64_t imgb = align64(d.Hp * rowb + 64), wsegb = P * T * kDecStep;
  uint8_t* img = scratch_shared.get(imgb + wsegb);
  uint8_t* wseg = img + imgb;
  const int32_t* colsum = reinterpret_cast<const int32_t*>(blob);
  const uint8_t* panels = blob + 4 * Npad;

  // weights: panel p, step kh * S + j / kk, lane j % kk holds k = kh * L + j (j < L), else 0
  {
    std::vector<uint8_t> tmp(rt.ksteps * kDecStep + 64);
    std::memset(wseg, 0, wsegb);
    for (int64_t p = 0; p < P; ++p) {
      rt.dec(panels, p, 0, rt.ksteps, tmp.data());
      uint8_t* w = wseg + p * T * kDecStep;
      for (int64_t kh = 0; kh < src.KH; ++kh) {
        for (int64_t j = 0; j < d.L; ++j) {
          const int64_t k = kh * d.L + j, t = kh * d.S + j / rt.kk;
          for (int64_t c = 0; c < kNR; ++c) {
            // byte (c / 8) * 32 + (c % 8) * 4 + lane * es of a step holds column c (qgemm.h)
            const int64_t cofs = (c / 8) * 32 + (c % 8) * 4;
            std::memcpy(w + t * kDecStep + cofs + (j % rt.kk) * es,
                        tmp.data() + (k / rt.kk) * kDecStep + cofs + (k % rt.kk) * es, es);
          }
        }
      }
    }
  }
  const auto widen = rt.avx2 ? widen_row_avx2 : widen_row_scalar;
  const auto flipr = rt.zmm ? flip_row_avx512 : rt.avx2 ? flip_row_avx2 : flip_row_scalar;
  const int16_t pad16 = xs8 ? int16_t(int8_t(src.pad)) : int16_t(src.pad);
  const uint8_t pad8 = uint8_t(src.pad ^ rt.flip);
  // `n` values of padded image starting at byte `at`: pad values, or a converted input run
  auto fill = [&](uint8_t* at, int64_t n) {
    if (es == 2) {
      std::fill(reinterpret_cast<int16_t*>(at), reinterpret_cast<int16_t*>(at) + n, pad16);
    } else {
      std::memset(at, pad8, n);
    }
  };
  auto copy = [&](uint8_t* at, const uint8_t* s, int64_t n) {
    if (es == 2) {
      widen(reinterpret_cast<int16_t*>(at), s, n, xs8);
    } else {
      flipr(reinterpret_cast<int8_t*>(at), s, n, rt.flip);
    }
  };
  const int64_t ldc = kNCP * kNR, lda = src.sw * C * es;
  for (int64_t b = 0; b < batch; ++b) {
    const uint8_t* x = src.x + b * src.H * src.W * C;
    at::parallel_for(0, d.Hp, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* row = img + r * rowb;
        const int64_t ih = r - src.ph;
        if (ih < 0 || ih >= src.H) {
          fill(row, d.Wp * C);
          continue;
        }
        const int64_t wn = std::min(src.W, d.Wp - src.pw);  // input pixels inside the padded row
        fill(row, src.pw * C);
        copy(row + src.pw * C * es, x + ih * src.W * C, wn * C);
        fill(row + (src.pw + wn) * C * es, (d.Wp - src.pw - wn) * C);
      }
    });
    fill(img + d.Hp * rowb, 64 / es);  // the over-read of the last row stays defined
    at::parallel_for(0, src.OH, 1, [&](int64_t o0, int64_t o1) {
      int32_t* cbuf = reinterpret_cast<int32_t*>(scratch_task.get(d.OWpad * ldc * 4));
      for (int64_t oh = o0; oh < o1; ++oh) {
        const int64_t m0 = (b * src.OH + oh) * src.OW;
        for (int64_t p0 = 0; p0 < P; p0 += kNCP) {
          const int64_t np = std::min(kNCP, P - p0), n0 = p0 * kNR;
          init_tile_rows(rt, ep, colsum, n0, np * kNR, d.OWpad, cbuf, ldc);
          for (int64_t p = 0; p < np; p += 2) {
            const bool two = p + 1 < np;
            const uint8_t* w0 = wseg + (p0 + p) * T * kDecStep;
            for (int64_t ow0 = 0; ow0 < d.OWpad; ow0 += kMR) {
              for (int64_t kh = 0; kh < src.KH; ++kh) {
                const uint8_t* A = img + (oh * src.sh + kh * src.dh) * rowb + ow0 * lda;
                const uint8_t* wk = w0 + kh * d.S * kDecStep;
                rt.tile(A, lda, wk, two ? wk + T * kDecStep : nullptr, d.S,
                        cbuf + ow0 * ldc + p * kNR, ldc);
              }
            }
          }
          epilogue_rows(rt, ep, cbuf, ldc, m0, m0 + src.OW, n0, std::min(n0 + np * kNR, N));
        }
      }
    });
  }
  scratch_shared.trim();
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
  if (direct_conv_fits(src, groups)) {
    Epilogue ep = make_epilogue(comb, fb, x_zp, out_scale, out_zp, relu);
    ep.ldo = Cout;
    ep.out = out.data_ptr();
    direct_conv(int(bits), xs8, N, Cout, w_packed.data_ptr<uint8_t>(), src, ep);
    return out;
  }
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
  const auto qrow = isa >= 3 ? quantize_row_avx512 : isa >= 1 ? quantize_row_avx2 : quantize_row_scalar;
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
