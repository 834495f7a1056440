"""Pack / unpack integer weights into the kernels' blob format (8, 7, 4 or 2 bits per weight).

The blob is what every ``torch.ops.lcpaq`` op takes as ``w_packed`` (layout documented in
``kernels/csrc/cpu/qgemm.h``): an int32 column-sum header (for zero-point corrections) followed
by panels of 16 output channels, 2 (8-bit) or 4 (4/2-bit) reduction values per step, bit-packed
(4-bit: two weights per byte, 2-bit: four). The 7-bit width uses the 8-bit layout with values in
[-64, 63]: the CPU runs it on a faster exact kernel (u8 x s7 pairs fit int16 in vpmaddubsw; see
qgemm_avx2.cpp). Pure PyTorch, so the reference path needs no build.
"""

from __future__ import annotations

import torch

from lcpaq.errors import KernelError

NR = 16
KERNEL_BITS = (2, 4, 7, 8)


def kernel_bits(w_bits: int) -> int:
    """Smallest kernel width that holds ``w_bits``-bit weights: 2 -> 2, 3..4 -> 4, 5..7 -> 7, 8 -> 8.

    >>> kernel_bits(3)
    4
    """
    if not 2 <= w_bits <= 8:
        raise KernelError(f"no integer kernel for {w_bits}-bit weights; use 2..8 (32 stays fp32)")
    return 2 if w_bits == 2 else (4 if w_bits <= 4 else (7 if w_bits <= 7 else 8))


def _layout(bits: int) -> int:
    return 8 if bits == 7 else bits  # 7-bit weights are stored in the 8-bit layout


def _ksteps(bits: int, k: int) -> int:
    bits = _layout(bits)
    kk = 2 if bits == 8 else 4
    s = (k + kk - 1) // kk
    return s + (s % 2) if bits == 2 else s


def _pad_n(n: int) -> int:
    return (n + NR - 1) // NR * NR


def blob_bytes(bits: int, n: int, k: int) -> int:
    """Size in bytes of the blob for an ``n x k`` weight at ``bits``."""
    bits = _layout(bits)
    return 4 * _pad_n(n) + (_pad_n(n) // NR) * _ksteps(bits, k) * (16 if bits == 2 else 32)


def _check_bits(bits: int) -> None:
    if bits not in KERNEL_BITS:
        raise KernelError(f"kernel weight width must be one of {KERNEL_BITS}, got {bits}")


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer weights ``q`` [N, K] (values in the signed ``bits`` range) into a uint8 blob.

    >>> q = torch.tensor([[1, -2, 3], [0, 7, -8]])
    >>> blob = pack_weight(q, 4)
    >>> torch.equal(unpack_weight(blob, 4, 2, 3), q.to(torch.int8))
    True
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise KernelError(f"pack_weight wants a 2-D [N, K] weight, got shape {tuple(q.shape)}")
    q = q.detach().to("cpu", torch.int32)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise KernelError(
            f"weights out of the {bits}-bit range [{lo}, {hi}] (got {int(q.min())}..{int(q.max())});"
            " quantize with lcpaq.quant.quantize_weight(w, bits) first"
        )
    n, k = q.shape
    bits = _layout(bits)
    ks, kk = _ksteps(bits, k), (2 if bits == 8 else 4)
    npad, p = _pad_n(n), _pad_n(n) // NR
    full = torch.zeros(npad, ks * kk, dtype=torch.int32)
    full[:n, :k] = q
    colsum = torch.zeros(npad, dtype=torch.int32)
    colsum[:n] = q.sum(1, dtype=torch.int64).to(torch.int32)
    if bits == 8:
        panels = (full.view(p, NR, ks, 2).permute(0, 2, 1, 3) & 0xFF).to(torch.uint8)
    elif bits == 4:
        t = (full + 8).view(p, NR, ks, 4).permute(0, 2, 1, 3)
        panels = (t[:, :, :8] | (t[:, :, 8:] << 4)).to(torch.uint8)
    else:
        t = (full + 2).view(p, NR, ks // 2, 2, 4).permute(0, 2, 1, 3, 4)
        panels = (
            t[:, :, :8, 0] | (t[:, :, 8:, 0] << 2) | (t[:, :, :8, 1] << 4) | (t[:, :, 8:, 1] << 6)
        ).to(torch.uint8)
    return torch.cat([colsum.view(torch.uint8), panels.reshape(-1)]).contiguous()


def unpack_weight(blob: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: int8 [n, k]."""
    _check_bits(bits)
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != blob_bytes(bits, n, k):
        raise KernelError(
            f"w_packed must be a 1-D uint8 blob of {blob_bytes(bits, n, k)} bytes for "
            f"n={n} k={k} bits={bits}; got {tuple(blob.shape)} {blob.dtype}"
        )
    bits = _layout(bits)
    ks, kk = _ksteps(bits, k), (2 if bits == 8 else 4)
    npad, p = _pad_n(n), _pad_n(n) // NR
    b = blob.to("cpu")[4 * npad :].to(torch.int32)
    if bits == 8:
        t = b.view(p, ks, NR, 2)
        t = torch.where(t > 127, t - 256, t)
    elif bits == 4:
        t = b.view(p, ks, 8, 4)
        t = torch.cat([t & 15, t >> 4], dim=2) - 8
    else:
        t = b.view(p, ks // 2, 8, 4)
        s0 = torch.cat([t & 3, (t >> 2) & 3], dim=2)
        s1 = torch.cat([(t >> 4) & 3, (t >> 6) & 3], dim=2)
        t = torch.stack([s0, s1], dim=3) - 2  # [p, ks/2, 16, 2, 4]
        t = t.permute(0, 2, 1, 3, 4).reshape(p, NR, ks * 4)
        return t.reshape(npad, ks * 4)[:n, :k].to(torch.int8).contiguous()
    full = t.permute(0, 2, 1, 3).reshape(npad, ks * kk)
    return full[:n, :k].to(torch.int8).contiguous()


def conv_weight_rows(q: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Conv weight [Cout, Cin/g, KH, KW] -> per group [Cout/g, KH*KW*Cin/g] rows in the kernels'
    reduction order (kh, kw, c), which matches an NHWC im2col."""
    cout, cg, kh, kw = q.shape
    if cout % groups:
        raise KernelError(f"Cout={cout} is not divisible by groups={groups}")
    t = q.reshape(groups, cout // groups, cg, kh, kw).permute(0, 1, 3, 4, 2)
    return [t[g].reshape(cout // groups, kh * kw * cg) for g in range(groups)]


def pack_conv_weight(q: torch.Tensor, bits: int, groups: int = 1) -> torch.Tensor:
    """Pack a conv weight [Cout, Cin/g, KH, KW] (integers) for ``lcpaq::qconv2d``."""
    return torch.cat([pack_weight(r, bits) for r in conv_weight_rows(q, groups)])
