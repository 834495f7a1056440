"""Calibration pieces of the proxy evaluator: activation ranges by ActQuantizer's rule, reduced
once per layer (:class:`Observed`), and output-aware weight clipping (:func:`refit_weight`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lcpaq.quant.quantizers import act_range, fake_quant_weight, qparams_from_range


@torch.no_grad()
def refit_weight(layer: nn.Module, x: torch.Tensor, bits: int, *, grid: int = 16) -> torch.Tensor:
    """``bits``-bit fake-quantized weight of ``layer`` with per-channel clipping chosen to keep its
    *output* on inputs ``x``: for each output channel c the scale alpha * max|w_c| / qmax, alpha in
    [0.25, 1], minimising sum_d E[x_d^2] dw_cd^2 (the output error with the inputs' second moments,
    the diagonal of their Gram matrix: the full matrix cost 5x the whole tune on digits).

    A cheap stand-in for what fine-tuning can recover: max|w| scaling is far from the best
    low-bit grid (at 2 bits it keeps only {-max, 0, max}), a gap QAT closes by moving the weights.
    """
    from lcpaq.quant.quantizers import weight_qmax

    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple):
            return fake_quant_weight(w, bits).detach()
        # E[x^2] per unfolded input position: per input channel, shifted by the kernel offsets
        cols = F.unfold(x.pow(2), layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # [N, D, L]
        h = cols.mean((0, 2))
    else:
        h = x.reshape(-1, x.shape[-1]).pow(2).mean(0)
    wf = w.reshape(w.shape[0], -1)  # [C, D]
    qmax = weight_qmax(bits)
    amax = wf.abs().amax(1).clamp_min(1e-8)
    alphas = torch.linspace(0.25, 1.0, grid)
    sc = (alphas[:, None] * amax[None, :] / qmax)[..., None]  # [A, C, 1]
    err = ((torch.clamp(torch.round(wf[None] / sc), -qmax, qmax) * sc - wf[None]).pow(2) * h).sum(2)  # [A, C]
    best = sc[err.argmin(0), torch.arange(wf.shape[0])]  # [C, 1]
    return (torch.clamp(torch.round(wf / best), -qmax, qmax) * best).reshape(w.shape)


class Observed:
    """One layer's observed activations, reduced once and shared by every (bits, method) asking for
    a range: min/max of all values, the sample the clipping methods read (as ActQuantizer draws it),
    its nonzero values (mse) and the percentile range (bits-independent)."""

    __slots__ = ("lo", "hi", "sample", "_nonzero", "_pct")

    def __init__(self, x: torch.Tensor, max_samples: int) -> None:
        flat = x.detach().reshape(-1).float()
        self.lo, self.hi = flat.min().item(), flat.max().item()
        k = max_samples // 4
        self.sample = flat if flat.numel() <= k else flat[
            torch.randint(flat.numel(), (k,), generator=torch.Generator().manual_seed(0))]
        self._nonzero: torch.Tensor | None = None
        self._pct: dict[float, tuple[float, float]] = {}

    def nonzero(self) -> torch.Tensor:
        if self._nonzero is None:
            self._nonzero = self.sample[self.sample != 0]
        return self._nonzero

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        if percentile not in self._pct:
            p = percentile / 100.0
            s = self.sample
            lo = torch.quantile(s, 1 - p).item() if self.lo < 0 else self.lo
            self._pct[percentile] = (lo, torch.quantile(s, p).item())
        return self._pct[percentile]

    def clip_range(self, bits: int, method: str, symmetric: bool, percentile: float) -> tuple[float, float]:
        """(lo, hi) of the ``bits``-bit grid by ``method`` (ActQuantizer.compute_qparams' rule)."""
        if method == "minmax":
            return self.lo, self.hi
        if method == "percentile":
            return self.percentile_range(percentile)
        # mse: the 48 clipping ratios' (scale, zero point) in float64 tensor ops (the same IEEE
        # operations as qparams_from_range on Python floats, so the same values), then every
        # ratio's error in one op; zeros (half of a post-ReLU input) quantize exactly to zero on
        # every grid (the zero point is an integer in range): they add nothing and are left out
        ratios = torch.logspace(-2, 0, 48).double()
        qmin, qmax = act_range(bits, symmetric)
        lo_r, hi_r = (self.lo * ratios).clamp(max=0.0), (self.hi * ratios).clamp(min=0.0)
        if symmetric:
            sc64 = torch.maximum(lo_r.abs(), hi_r.abs()).clamp(min=1e-8) / qmax
            zp64 = torch.zeros_like(sc64)
        else:
            sc64 = (hi_r - lo_r).clamp(min=1e-8) / (qmax - qmin)
            zp64 = (qmin - lo_r / sc64).round().clamp(qmin, qmax)
        sc, zp = sc64.float().unsqueeze(1), zp64.float().unsqueeze(1)
        nz = self.nonzero().unsqueeze(0)
        d = torch.div(nz, sc)
        if bool((zp == zp[0]).all()):  # one zero point (always for inputs >= 0): scalar bounds, 3x faster
            d.clamp_(qmin - float(zp[0]), qmax - float(zp[0]))
        else:
            d.clamp_(qmin - zp, qmax - zp)
        d.round_().mul_(sc).sub_(nz)
        r = float(ratios[int(torch.argmin(d.mul_(d).sum(1)))])
        return self.lo * r, self.hi * r


def act_qparams(x: torch.Tensor, bits: int, *, method: str = "minmax", symmetric: bool = False,
                percentile: float = 99.99, max_samples: int = 1 << 18) -> tuple[float, int]:
    """(scale, zero_point) of ``bits``-bit activations seen as ``x``, by ``method``.

    The rule of :class:`lcpaq.quant.ActQuantizer` (one observed batch, then ``compute_qparams``)
    with the ``mse`` clipping grid evaluated in one tensor op instead of 48 passes (the costly
    part of a proxy tune's first trials); checked against ActQuantizer in the tests.
    """
    lo, hi = Observed(x, max_samples).clip_range(bits, method, symmetric, percentile)
    return qparams_from_range(lo, hi, bits, symmetric)
