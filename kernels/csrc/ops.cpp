// lcpaq::* operator schemas. Implementations: cpu/qops_cpu.cpp (CPU), cuda/qops_cuda.cu (CUDA);
// quantize_act: float32 -> uint8 (qmin >= 0) or int8, clamp(round(x / scale) + zp, qmin, qmax).
// fake (meta) kernels are registered in Python (lcpaq/kernels/_ops.py).
//
// Conventions shared by every op:
//  x: uint8 or int8 activations, real value x_scale * (x - x_zero_point).
//  w_packed: uint8 blob from lcpaq.kernels.pack_weight (layout in cpu/qgemm.h), weights
//            symmetric per output channel, real value w_scale[n] * q.
//  epilogue: y = float(acc - x_zp * colsum[n]) * (float(x_scale) * w_scale[n]) [+ bias[n]]
//            [relu]; out_scale > 0 requantizes to uint8: clamp(round(y * float(1/out_scale))
//            + out_zero_point, 0, 255); out_scale <= 0 returns y as float32.
#include <torch/library.h>

TORCH_LIBRARY(lcpaq, m) {
  m.def("qgemm_i32(Tensor x, Tensor w_packed, int w_bits, int n) -> Tensor");
  m.def(
      "qlinear(Tensor x, Tensor w_packed, int w_bits, int n, Tensor w_scale, float x_scale, "
      "int x_zero_point, Tensor? bias, float out_scale, int out_zero_point, bool relu) -> Tensor");
  m.def(
      "qconv2d(Tensor x, Tensor w_packed, int w_bits, int[] weight_shape, int[] stride, "
      "int[] padding, int[] dilation, int groups, Tensor w_scale, float x_scale, "
      "int x_zero_point, Tensor? bias, float out_scale, int out_zero_point, bool relu) -> Tensor");
  m.def("quantize_act(Tensor x, float scale, int zero_point, int qmin, int qmax) -> Tensor");
}
