"""Integer inference path: swap calibrated fake-quant layers for modules running the kernels.

:func:`convert` replaces every ``QuantConv2d`` / ``QuantLinear`` (from
:func:`lcpaq.quant.apply_policy` + calibration) whose weights *and* input activations are
quantized by :class:`IntConv2d` / :class:`IntLinear`: the input is quantized to uint8 (or int8
for symmetric activations) with the layer's calibrated (scale, zero point), the weight is stored
packed at the kernel width for its ``w_bits`` (2 -> 2, 3..4 -> 4, 5..8 -> 8 bits), and the exact
int32 GEMM's epilogue dequantizes to float32 and adds the bias. Layers with a float side stay
fake-quant. Outputs match the fake-quant model within float rounding (one activation step at most
where x / scale lands on a rounding tie).

Fusion (``fuse=True``, needs a torch.fx-traceable model; skipped with a log line otherwise): along a
single-consumer chain conv -> [BatchNorm2d] -> [ReLU] -> next int layer, the BN is folded into the
conv's per-channel scale and bias (the BN module becomes ``nn.Identity`` when it is called only
there), the ReLU runs in the conv's epilogue, and when the next layer's input is 8-bit uint8 the
epilogue requantizes straight to that layer's (scale, zero point): the next layer takes the uint8
tensor without a quantize pass. A ReLU module that is also used elsewhere (torchvision's
BasicBlock.relu) stays in place; on the fused output it is a no-op.
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
        self.register_buffer("bias", None if b is None else b.detach().float().contiguous())  # type: ignore[operator]
        return q

    # fused epilogue (set by convert's fusion pass): ReLU, uint8 output on the consumer's grid
    relu: bool = False
    out_scale: float = 0.0
    out_zp: int = 0
    takes_u8: bool = False  # the producer already quantized the input to this layer's grid
    # names of the layers on the other end of a fused uint8 requantization (set by the fusion pass;
    # the kernels latency backend keys a layer's unit by their precision)
    requant_for: str = ""
    u8_from: str = ""

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_u8 and x.dtype == torch.uint8:
            return x
        return quantize_act(x.float(), self.x_scale, self.x_zp, self.qmin, self.qmax)

    def fold_bn(self, bn: nn.BatchNorm2d) -> None:
        """Fold an eval-mode BatchNorm that follows this layer into its scale and bias."""
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None  # convert checks track_running_stats
        g = (bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)) \
            / torch.sqrt(var.float() + bn.eps)
        beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(g)
        b = self.bias if self.bias is not None else torch.zeros_like(g)
        self.w_scale = (self.w_scale * g).contiguous()
        self.bias = ((b - mean.float()) * g + beta).contiguous()


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
                       self.x_zp, self.bias, self.out_scale, self.out_zp, self.relu)

    def extra_repr(self) -> str:
        fused = ("+relu" if self.relu else "") + ("+requant" if self.out_scale > 0 else "")
        return (f"{self.weight_shape}, stride={self.stride}, w_bits={self.w_bits} "
                f"(kernel {self.kbits}), a_bits={self.a_bits}" + (f", fused{fused}" if fused else ""))


class IntLinear(_IntBase):
    """A quantized linear layer running ``lcpaq::qlinear``."""

    def __init__(self, layer: nn.Linear, name: str = "") -> None:
        super().__init__()
        q = self._init_common(layer, name)
        self.out_features = int(layer.out_features)
        self.register_buffer("w_packed", pack_weight(q, self.kbits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(self._quant(x), self.w_packed, self.kbits, self.out_features, self.w_scale,
                       self.x_scale, self.x_zp, self.bias, self.out_scale, self.out_zp, self.relu)

    def extra_repr(self) -> str:
        return f"out={self.out_features}, w_bits={self.w_bits} (kernel {self.kbits}), a_bits={self.a_bits}"


class NhwcConv2d(nn.Conv2d):
    """A float conv that writes channels_last even when neither its input nor its weight has a
    layout (one input channel, e.g. an MNIST stem): torch would write NCHW there, and every float
    layer downstream would run NCHW or mix layouts in a residual add. Same parameters and
    state_dict as the nn.Conv2d it replaces (convert swaps the class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def _fuse(model: nn.Module, converted: set[str]) -> int:
    """Fusion pass over the fx graph (see the module docstring); returns the number of fusions."""
    from torch import fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (_IntBase, nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - untraceable models run unfused
        log.info("convert: no fusion (torch.fx cannot trace the model: %s: %s)", type(e).__name__, e)
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    def mod_of(node: fx.Node) -> nn.Module | None:
        return modules.get(str(node.target)) if node.op == "call_module" else None

    def single_user(node: fx.Node) -> fx.Node | None:
        while True:
            users = list(node.users)
            if len(users) != 1:
                return None
            u = users[0]
            if isinstance(mod_of(u), nn.Identity):
                node = u
                continue
            return u

    def is_relu(node: fx.Node) -> bool:
        if isinstance(mod_of(node), nn.ReLU):
            return True
        return node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu) \
            and len(node.args) == 1

    def replace(name: str) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, nn.Identity())

    n = 0
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in converted or calls[str(node.target)] != 1:
            continue
        layer = mod_of(node)
        assert isinstance(layer, _IntBase)
        u = single_user(node)
        bn = mod_of(u) if u is not None else None
        if u is not None and isinstance(layer, IntConv2d) and isinstance(bn, nn.BatchNorm2d) \
                and not bn.training and bn.track_running_stats and calls[str(u.target)] == 1:
            layer.fold_bn(bn)
            replace(str(u.target))
            n += 1
            u = single_user(u)
        if u is None or not is_relu(u):
            continue
        layer.relu = True
        if isinstance(mod_of(u), nn.ReLU) and calls[str(u.target)] == 1:
            replace(str(u.target))
        n += 1
        nxt = single_user(u)
        consumer = mod_of(nxt) if nxt is not None else None
        if nxt is not None and isinstance(consumer, _IntBase) and calls[str(nxt.target)] == 1 \
                and (consumer.qmin, consumer.qmax) == (0, 255):
            layer.out_scale, layer.out_zp = float(consumer.x_scale), int(consumer.x_zp)
            consumer.takes_u8 = True
            layer.requant_for, consumer.u8_from = str(nxt.target), str(node.target)
            n += 1
    return n


def convert(model: nn.Module, policy: Policy | None = None, *, inplace: bool = True,
            fuse: bool = True, channels_last: bool = True) -> nn.Module:
    """Run every quantized layer of a calibrated fake-quant ``model`` on the integer kernels.

    ``policy`` (optional) is checked against the model: every layer it quantizes must already be a
    calibrated QuantConv2d/QuantLinear at those bits. ``fuse``: fold BN, ReLU and the next layer's
    input quantization into the epilogues (module docstring). ``channels_last``: store the weights
    of the convs that stay float in channels_last memory, so they run NHWC like the integer convs
    (whose outputs are channels_last) whatever layout reaches them. Without it a float conv takes
    its input's layout, which depends on layers far upstream: a float chain fed by a 1-channel
    input ran NCHW, 44 -> 65 us for one mnist_resnet conv, so a layer's cost depended on the
    precision of layers two blocks away. Returns the model (a deep copy unless ``inplace``).

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
    done: set[str] = set()
    for name, mod in list(modules.items()):
        if not isinstance(mod, (QuantConv2d, QuantLinear)) or 32 in mod.bits:
            continue
        new: nn.Module = IntConv2d(mod, name) if isinstance(mod, QuantConv2d) else IntLinear(mod, name)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        done.add(name)
    fused = _fuse(model, done) if fuse and done else 0
    if channels_last:
        for mod in model.modules():
            if type(mod) is nn.Conv2d:
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
                if mod.in_channels == 1:  # a 1-channel input and weight have no layout: say it
                    mod.__class__ = NhwcConv2d
    log.info("convert: %d layers on integer kernels, %d fusions", len(done), fused)
    return model
