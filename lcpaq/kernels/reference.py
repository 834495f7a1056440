"""Pure-PyTorch integer reference of every lcpaq op (int64 accumulation, exact).

Used when the compiled extension is absent, and by the tests as the ground truth: the epilogue
does the same float32 operations in the same order as the C++ kernels, so results are bit-equal.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lcpaq.kernels.pack import conv_weight_rows, unpack_weight


def _epilogue(
    acc: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor, x_scale: float,
    x_zero_point: int, bias: torch.Tensor | None, out_scale: float, out_zero_point: int,
    relu: bool, dim: int,
) -> torch.Tensor:
    """acc: int64 raw sums x*q with the output channel on axis ``dim``."""
    shape = [1] * acc.dim()
    shape[dim] = -1
    corr = acc - x_zero_point * colsum.view(shape)
    comb = (w_scale.to(torch.float32).contiguous() * float(x_scale)).view(shape)
    y = corr.to(torch.float32) * comb
    if bias is not None:
        y = y + bias.to(torch.float32).view(shape)
    if relu:
        y = torch.where(y < 0, torch.zeros_like(y), y)
    if out_scale > 0:
        inv = torch.tensor(1.0 / out_scale, dtype=torch.float32)
        q = torch.round(y * inv) + float(out_zero_point)
        return q.clamp(0, 255).to(torch.uint8)
    return y


def qgemm_i32(x: torch.Tensor, w_packed: torch.Tensor, w_bits: int, n: int) -> torch.Tensor:
    q = unpack_weight(w_packed, w_bits, n, x.shape[-1]).to(torch.int64)
    return (x.to(torch.int64) @ q.T).to(torch.int32)


def qlinear(
    x: torch.Tensor, w_packed: torch.Tensor, w_bits: int, n: int, w_scale: torch.Tensor,
    x_scale: float, x_zero_point: int, bias: torch.Tensor | None, out_scale: float,
    out_zero_point: int, relu: bool,
) -> torch.Tensor:
    q = unpack_weight(w_packed, w_bits, n, x.shape[-1]).to(torch.int64)
    acc = x.to(torch.int64) @ q.T
    return _epilogue(acc, q.sum(1), w_scale, x_scale, x_zero_point, bias, out_scale,
                     out_zero_point, relu, acc.dim() - 1)


def qconv2d(
    x: torch.Tensor, w_packed: torch.Tensor, w_bits: int, weight_shape: list[int],
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    w_scale: torch.Tensor, x_scale: float, x_zero_point: int, bias: torch.Tensor | None,
    out_scale: float, out_zero_point: int, relu: bool,
) -> torch.Tensor:
    cout, cg, kh, kw = weight_shape
    coutg, k = cout // groups, cg * kh * kw
    from lcpaq.kernels.pack import blob_bytes

    gb = blob_bytes(w_bits, coutg, k)
    n, _, h, w = x.shape
    ph, pw = padding
    # pad with the zero point (the stored value of real 0), exact in float64
    xp = F.pad(x.to(torch.float64), (pw, pw, ph, ph), value=float(x_zero_point))
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride)  # [N, C*KH*KW, L], (c,kh,kw)
    oh = (h + 2 * ph - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pw - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.to(torch.int64).view(n, groups, k, oh * ow)
    accs, sums = [], []
    for g in range(groups):
        rows = unpack_weight(w_packed[g * gb : (g + 1) * gb], w_bits, coutg, k).to(torch.int64)
        qg = rows.view(coutg, kh, kw, cg).permute(0, 3, 1, 2).reshape(coutg, k)  # (c,kh,kw)
        accs.append(qg @ cols[:, g])  # [N, coutg, L]
        sums.append(qg.sum(1))
    acc = torch.cat(accs, dim=1).view(n, cout, oh, ow)
    y = _epilogue(acc, torch.cat(sums), w_scale, x_scale, x_zero_point, bias, out_scale,
                  out_zero_point, relu, 1)
    return y.contiguous(memory_format=torch.channels_last)


def quantize_act(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    q = torch.clamp(torch.round(x / s) + float(zero_point), qmin, qmax)
    return q.to(torch.int8 if qmin < 0 else torch.uint8)


__all__ = ["qconv2d", "qgemm_i32", "qlinear", "quantize_act", "conv_weight_rows"]
