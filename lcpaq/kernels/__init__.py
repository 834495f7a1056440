"""lcpaq's integer kernels: packed 8/4/2-bit weights, uint8/int8 activations, exact int32 GEMM.

The compiled extension (``lcpaq/_C*.so``: AVX2 CPU kernels, CUDA when built with nvcc) is loaded
lazily on first use; without it every op runs the pure-PyTorch integer reference and
:func:`status` says why. :func:`convert` turns a calibrated fake-quant model into one that runs
each quantized layer on the integer kernels at its own bit pair.

>>> import torch
>>> from lcpaq.kernels import pack_weight, qlinear
>>> x = torch.tensor([[3, 200]], dtype=torch.uint8)
>>> w = pack_weight(torch.tensor([[1, -1], [7, 2]]), 4)
>>> qlinear(x, w, 4, 2, torch.ones(2), 1.0, 0).tolist()
[[-197.0, 421.0]]
"""

from lcpaq.kernels._lib import LibStatus, available, status
from lcpaq.kernels.convert import IntConv2d, IntLinear, convert
from lcpaq.kernels.ops import qconv2d, qgemm_i32, qlinear, quantize_act
from lcpaq.kernels.pack import (
    blob_bytes,
    kernel_bits,
    pack_conv_weight,
    pack_weight,
    unpack_weight,
)

__all__ = [
    "IntConv2d", "IntLinear", "LibStatus", "available", "blob_bytes", "convert", "kernel_bits",
    "pack_conv_weight", "pack_weight", "qconv2d", "qgemm_i32", "qlinear", "quantize_act",
    "status", "unpack_weight",
]
