"""Integer inference path: swap calibrated fake-quant layers for modules running the kernels.

:func:`convert` replaces every ``QuantConv2d`` / ``QuantLinear`` (from
:func:`lcpaq.quant.apply_policy` + calibration) whose weights *and* input activations are
quantized by :class:`IntConv2d` / :class:`IntLinear`: the input is quantized to uint8 (or int8
for symmetric activations) with the layer's calibrated (scale, zero point), the weight is stored
packed at the kernel width for its ``w_bits`` (2 -> 2, 3..4 -> 4, 5..8 -> 8 bits), and the exact
int32 GEMM's epilogue dequantizes to float32 and adds the bias. Layers with a float side stay
fake-quant. Outputs match the fake-quant model within float rounding (one activation step at most
where x / scale lands on a rounding tie).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lcpaq.errors import KernelError
from lcpaq.kernels.ops import qconv2d, qlinear, quantize_act
from lcpaq.kernels.pack import kernel_bits, pack_conv_weight, pack_weight
from lcpaq.policy import Policy

log = logging.getLogger(__name__)


def _act_params(layer: nn.Module, name: str) -> tuple[float, int, int, int]:
    from lcpaq.quant.quantizers import act_range

    aq = layer.act_qparams()  # type: ignore[operator]
    if aq is None:
        raise KernelError(f"layer '{name}' has float activations; it cannot run on int kernels")
    if not bool(getattr(layer.act_quant, "calibrated", True)):
        raise KernelError(
            f"layer '{name}' is not calibrated; pass calib_loader to lcpaq.quant.apply_policy "
            "or call lcpaq.quant.calibrate(model, loader) before convert()")
    scale, zp, bits, symmetric = aq
    qmin, qmax = act_range(bits, symmetric)
    return scale, zp, qmin, qmax


class _IntBase(nn.Module):
    w_packed: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None

    def _init_common(self, layer: nn.Module, name: str) -> torch.Tensor:
        self.w_bits, self.a_bits = int(layer.w_bits), int(layer.a_bits)  # type: ignore[arg-type]
        self.kbits = kernel_bits(self.w_bits)
        self.x_scale, self.x_zp, self.qmin, self.qmax = _act_params(layer, name)
        q, scale = layer.int_weight()  # type: ignore[operator]
        self.register_buffer("w_scale", scale.detach().to(torch.float32).contiguous())
        b = layer.bias  # type: ignore[union-attr]
        self.register_buffer("bias", None if b is None else b.detach().float().contiguous())
        return q

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_act(x.float(), self.x_scale, self.x_zp, self.qmin, self.qmax)


class IntConv2d(_IntBase):
    """A quantized conv running ``lcpaq::qconv2d`` (input float32 NCHW, output float32)."""

    def __init__(self, layer: nn.Conv2d, name: str = "") -> None:
        super().__init__()
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise KernelError(f"conv '{name}': only numeric zero padding is supported")
        q = self._init_common(layer, name)
        self.weight_shape = list(layer.weight.shape)
        self.stride, self.padding = list(layer.stride), list(layer.padding)  # type: ignore[arg-type]
        self.dilation, self.groups = list(layer.dilation), int(layer.groups)
        self.register_buffer("w_packed", pack_conv_weight(q, self.kbits, self.groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qconv2d(self._quant(x), self.w_packed, self.kbits, self.weight_shape, self.stride,
                       self.padding, self.dilation, self.groups, self.w_scale, self.x_scale,
                       self.x_zp, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.weight_shape}, stride={self.stride}, w_bits={self.w_bits} "
                f"(kernel {self.kbits}), a_bits={self.a_bits}")


class IntLinear(_IntBase):
    """A quantized linear layer running ``lcpaq::qlinear``."""

    def __init__(self, layer: nn.Linear, name: str = "") -> None:
        super().__init__()
        q = self._init_common(layer, name)
        self.out_features = int(layer.out_features)
        self.register_buffer("w_packed", pack_weight(q, self.kbits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(self._quant(x), self.w_packed, self.kbits, self.out_features, self.w_scale,
                       self.x_scale, self.x_zp, self.bias)

    def extra_repr(self) -> str:
        return f"out={self.out_features}, w_bits={self.w_bits} (kernel {self.kbits}), a_bits={self.a_bits}"


def convert(model: nn.Module, policy: Policy | None = None, *, inplace: bool = True) -> nn.Module:
    """Run every quantized layer of a calibrated fake-quant ``model`` on the integer kernels.

    ``policy`` (optional) is checked against the model: every layer it quantizes must already be a
    calibrated QuantConv2d/QuantLinear at those bits. Returns the model (a deep copy unless
    ``inplace``).

    >>> from lcpaq.testing.models import TinyResNet
    >>> from lcpaq.quant import apply_policy, quantizable_names
    >>> m = TinyResNet().eval()
    >>> pol = Policy.uniform(quantizable_names(m), 4, 8)
    >>> _ = apply_policy(m, pol, calib_loader=[torch.randn(2, *m.input_shape[1:])])
    >>> _ = convert(m, pol)
    """
    from lcpaq.quant.modules import QuantConv2d, QuantLinear

    if not inplace:
        import copy

        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    if policy is not None:
        for name, (w, a) in policy.items():
            if (w, a) == (32, 32):
                continue
            mod = modules.get(name)
            if not isinstance(mod, (QuantConv2d, QuantLinear)) or mod.bits != (w, a):
                raise KernelError(
                    f"layer '{name}' is not quantized at w{w}a{a} in the model; call "
                    "lcpaq.quant.apply_policy(model, policy, calib_loader=...) before convert()")
    n = 0
    for name, mod in list(modules.items()):
        if not isinstance(mod, (QuantConv2d, QuantLinear)) or 32 in mod.bits:
            continue
        new: nn.Module = IntConv2d(mod, name) if isinstance(mod, QuantConv2d) else IntLinear(mod, name)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        n += 1
    log.info("convert: %d layers on integer kernels", n)
    return model
