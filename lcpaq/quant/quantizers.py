"""Uniform quantizers: symmetric per-channel weights, per-tensor activations (asymmetric by
default), bits 2..8, with straight-through rounding so QAT can train through them.

>>> q, scale = quantize_weight(torch.randn(8, 3, 3, 3), 4)
>>> int(q.abs().max()) <= 7
True
"""

from __future__ import annotations

import torch
from torch import nn

from lcpaq.errors import ConfigError

FLOAT_BITS = 32
CALIB_METHODS = ("minmax", "percentile", "mse")


def _check(bits: int) -> None:
    if not (2 <= bits <= 8):
        raise ConfigError(f"quantizer bits={bits} out of range; use 2..8 (32 = no quantization)")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def weight_qmax(bits: int, *, reduce_range: bool = False) -> int:
    """Largest integer of a symmetric ``bits``-bit weight grid (one bit less with reduce_range)."""
    _check(bits)
    b = bits - 1 if reduce_range and bits > 2 else bits
    return 2 ** (b - 1) - 1


def weight_scale(w: torch.Tensor, bits: int, *, reduce_range: bool = False) -> torch.Tensor:
    """Per-output-channel symmetric scale: max|w| / qmax (channel axis 0)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-8)
    return amax / weight_qmax(bits, reduce_range=reduce_range)


def quantize_weight(w: torch.Tensor, bits: int, *, reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization: returns (int8 codes, fp32 scale[C_out])."""
    scale = weight_scale(w, bits, reduce_range=reduce_range)
    qmax = weight_qmax(bits, reduce_range=reduce_range)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w.detach() / scale.view(shape)), -qmax, qmax).to(torch.int8)
    return q, scale.float()


def fake_quant_weight(w: torch.Tensor, bits: int, *, reduce_range: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``w`` (STE for the gradient); ``bits=32`` returns ``w`` unchanged."""
    if bits == FLOAT_BITS:
        return w
    scale = weight_scale(w, bits, reduce_range=reduce_range)
    qmax = weight_qmax(bits, reduce_range=reduce_range)
    shape = (-1,) + (1,) * (w.dim() - 1)
    s = scale.view(shape)
    x = w / s
    # Pure STE: the scale comes from max|w|, so nothing is really clipped; clamping outside the
    # detached part would zero the gradient of each channel's largest weight (x = qmax + eps).
    return (x + (torch.clamp(torch.round(x), -qmax, qmax) - x).detach()) * s


def act_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of an activation grid: [-(2^(b-1)-1), 2^(b-1)-1] or [0, 2^b - 1]."""
    _check(bits)
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def qparams_from_range(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) covering [lo, hi] (always including 0)."""
    qmin, qmax = act_range(bits, symmetric)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi), 1e-8)
        return amax / qmax, 0
    scale = max(hi - lo, 1e-8) / (qmax - qmin)
    zp = int(round(qmin - lo / scale))
    return scale, max(qmin, min(qmax, zp))


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: int, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-tensor fake quantization with STE rounding (gradient flows to x and to scale, LSQ-style)."""
    qmin, qmax = act_range(bits, symmetric)
    # Same values as ONNX QuantizeLinear, saturate(round(x / s) + zp) with round-half-even; the
    # clamp goes before the rounding (identical for integer bounds) so the STE mask is "x inside
    # the grid", not "rounded x inside" (float noise at the edge would zero the gradient).
    q = round_ste(torch.clamp(x / scale, qmin - zero_point, qmax - zero_point))
    return q * scale


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with an observer for calibration.

    States: ``observe=True`` records statistics and passes x through; after :meth:`compute_qparams`
    it fake-quantizes. ``scale`` is a Parameter so QAT can learn it (LSQ-style); frozen by default.
    """

    def __init__(self, bits: int, *, symmetric: bool = False, method: str = "minmax",
                 percentile: float = 99.99, max_samples: int = 1 << 18) -> None:
        super().__init__()
        _check(bits)
        if method not in CALIB_METHODS:
            raise ConfigError(f"unknown calibration method '{method}'; use one of {CALIB_METHODS}")
        self.bits, self.symmetric, self.method = bits, symmetric, method
        self.percentile, self.max_samples = percentile, max_samples
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observe = False
        self._lo, self._hi = float("inf"), float("-inf")
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, method={self.method}"

    def reset_stats(self) -> None:
        self._lo, self._hi, self._samples = float("inf"), float("-inf"), []

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self._lo = min(self._lo, flat.min().item())
        self._hi = max(self._hi, flat.max().item())
        if self.method != "minmax":
            k = self.max_samples // 4
            if flat.numel() <= k:  # small tensors: keep everything (no sampling noise)
                self._samples.append(flat.clone())
            else:
                idx = torch.randint(flat.numel(), (k,), generator=self._gen)
                self._samples.append(flat[idx])

    @torch.no_grad()
    def compute_qparams(self) -> None:
        """Turn the recorded statistics into (scale, zero_point) by the chosen method."""
        if self._lo == float("inf"):
            raise ConfigError("activation quantizer saw no data; calibrate with at least one batch")
        lo, hi = self._lo, self._hi
        if self.method != "minmax" and self._samples:
            s = torch.cat(self._samples)
            if self.method == "percentile":
                p = self.percentile / 100.0
                lo = torch.quantile(s, 1 - p).item() if lo < 0 else lo
                hi = torch.quantile(s, p).item()
            else:  # mse: pick the clipping ratio that minimises the quantization MSE
                best, best_err = (lo, hi), float("inf")
                # geometric grid: outliers can make the best range a small fraction of min/max
                for r in torch.logspace(-2, 0, 48).tolist():
                    sc, zp = qparams_from_range(lo * r, hi * r, self.bits, self.symmetric)
                    err = (fake_quant_act(s, torch.tensor(sc), zp, self.bits, self.symmetric) - s).pow(2).mean().item()
                    if err < best_err:
                        best, best_err = (lo * r, hi * r), err
                lo, hi = best
        sc, zp = qparams_from_range(lo, hi, self.bits, self.symmetric)
        self.scale.data.fill_(sc)
        self.zero_point.fill_(zp)
        self.calibrated.fill_(True)
        self._samples = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self._record(x)
            return x
        if not bool(self.calibrated):
            raise ConfigError(
                "activation quantizer used before calibration; pass calib_loader to apply_policy "
                "or call lcpaq.quant.calibrate(model, loader)"
            )
        return fake_quant_act(x, self.scale.abs().clamp_min(1e-8), int(self.zero_point), self.bits, self.symmetric)
