"""Fake-quant layers that replace nn.Conv2d / nn.Linear in place (same names, same weights).

``QuantConv2d`` *is* an ``nn.Conv2d`` (subclass), so state_dict keys, tracing and everything that
looks for convs keep working; it quantizes its input activation at ``a_bits`` and its weight at
``w_bits`` (32 = leave in fp32).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lcpaq.errors import ConfigError
from lcpaq.quant.quantizers import FLOAT_BITS, ActQuantizer, fake_quant_weight, quantize_weight


class _QuantMixin:
    w_bits: int
    a_bits: int
    act_quant: ActQuantizer | None
    weight: nn.Parameter

    def _setup(self, w_bits: int, a_bits: int, *, symmetric_act: bool, method: str) -> None:
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.act_quant = (
            ActQuantizer(a_bits, symmetric=symmetric_act, method=method) if a_bits != FLOAT_BITS else None
        )

    def qweight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.w_bits)

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    def int_weight(self, *, reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer weight codes (int8 storage) and per-output-channel fp32 scales."""
        if self.w_bits == FLOAT_BITS:
            raise ConfigError("layer keeps fp32 weights (w_bits=32): no integer weights to read back")
        return quantize_weight(self.weight, self.w_bits, reduce_range=reduce_range)

    def act_qparams(self) -> tuple[float, int, int, bool] | None:
        """(scale, zero_point, bits, symmetric) of the input activation, None if fp32."""
        aq = self.act_quant
        if aq is None:
            return None
        return float(aq.scale.abs()), int(aq.zero_point), aq.bits, aq.symmetric

    @property
    def bits(self) -> tuple[int, int]:
        return self.w_bits, self.a_bits

    @classmethod
    def from_float(cls, m: nn.Module, w_bits: int, a_bits: int, *, symmetric_act: bool = False,
                   method: str = "minmax"):
        """A quantized twin of float layer ``m`` that shares its parameters and buffers."""
        q = cls.__new__(cls)
        q.__dict__.update(m.__dict__)
        q._parameters = dict(m._parameters)
        q._buffers = dict(m._buffers)
        q._modules = dict(m._modules)
        q._setup(w_bits, a_bits, symmetric_act=symmetric_act, method=method)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"  # type: ignore[misc]


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.qinput(x), self.qweight(), self.bias)


QUANT_TYPES = (QuantConv2d, QuantLinear)
