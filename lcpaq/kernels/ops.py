"""Public integer ops: the compiled ``torch.ops.lcpaq.*`` kernels, or the reference when absent.

Every function has the same signature as its ``torch.ops.lcpaq`` schema (kernels/csrc/ops.cpp).
"""

from __future__ import annotations

import torch

from lcpaq.kernels import reference
from lcpaq.kernels._lib import status


def _use_ext(x: torch.Tensor) -> bool:
    st = status()
    return st.loaded and (x.device.type == "cpu" or (x.device.type == "cuda" and st.cuda))


def _ext_bits(x: torch.Tensor, w_bits: int) -> int:
    # 7-bit blobs use the 8-bit layout: the CUDA kernels run them as 8-bit (CPU has a 7-bit kernel)
    return 8 if w_bits == 7 and x.device.type == "cuda" else int(w_bits)


def qgemm_i32(x: torch.Tensor, w_packed: torch.Tensor, w_bits: int, n: int) -> torch.Tensor:
    """Raw exact int32 sums ``x @ q.T`` (x uint8/int8 [M, K], q from the packed blob).

    >>> from lcpaq.kernels import pack_weight
    >>> x = torch.tensor([[255, 1]], dtype=torch.uint8)
    >>> qgemm_i32(x, pack_weight(torch.tensor([[-8, 7]]), 4), 4, 1).tolist()
    [[-2033]]
    """
    if _use_ext(x):
        return torch.ops.lcpaq.qgemm_i32(x, w_packed, _ext_bits(x, w_bits), n)
    return reference.qgemm_i32(x, w_packed, w_bits, n)


def qlinear(
    x: torch.Tensor, w_packed: torch.Tensor, w_bits: int, n: int, w_scale: torch.Tensor,
    x_scale: float, x_zero_point: int, bias: torch.Tensor | None = None, out_scale: float = 0.0,
    out_zero_point: int = 0, relu: bool = False,
) -> torch.Tensor:
    """Integer linear layer with fused epilogue (bias, ReLU, dequantize or requantize to uint8)."""
    args = (x, w_packed, w_bits, n, w_scale, float(x_scale), int(x_zero_point), bias,
            float(out_scale), int(out_zero_point), bool(relu))
    if _use_ext(x):
        return torch.ops.lcpaq.qlinear(x, w_packed, _ext_bits(x, w_bits), *args[3:])
    return reference.qlinear(*args)


def qconv2d(
    x: torch.Tensor, w_packed: torch.Tensor, w_bits: int, weight_shape: list[int],
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    w_scale: torch.Tensor, x_scale: float, x_zero_point: int, bias: torch.Tensor | None = None,
    out_scale: float = 0.0, out_zero_point: int = 0, relu: bool = False,
) -> torch.Tensor:
    """Integer conv2d; output NCHW shape in channels_last memory.

    CPU: NHWC im2col + packed GEMM, or for short kernel rows (one group, unit column dilation,
    KW * C <= 64, e.g. the 7x7 3-channel stem) a direct conv over the padded input
    (``LCPAQ_KERNELS_DIRECT=0`` forces im2col); both exact, so bit-identical.
    """
    args = (x, w_packed, w_bits, list(weight_shape), list(stride), list(padding), list(dilation),
            int(groups), w_scale, float(x_scale), int(x_zero_point), bias, float(out_scale),
            int(out_zero_point), bool(relu))
    if _use_ext(x):
        return torch.ops.lcpaq.qconv2d(x, w_packed, _ext_bits(x, w_bits), *args[3:])
    return reference.qconv2d(*args)


def quantize_act(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """float32 -> uint8 (qmin >= 0) or int8: clamp(round(x / scale) + zero_point, qmin, qmax)."""
    if _use_ext(x):
        return torch.ops.lcpaq.quantize_act(x, float(scale), int(zero_point), int(qmin), int(qmax))
    return reference.quantize_act(x, scale, zero_point, qmin, qmax)
