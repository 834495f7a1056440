"""``apply_policy(model, policy)``: the one in-place verb that turns a model mixed-precision."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lcpaq.errors import ConfigError
from lcpaq.policy import FLOAT_BITS, Policy
from lcpaq.quant.modules import QUANT_TYPES, QuantConv2d, QuantLinear
from lcpaq.quant.quantizers import CALIB_METHODS

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of every Conv2d/Linear (wrapped or not), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_policy(
    model: nn.Module, policy: Policy, *, calib_loader: Iterable | None = None,
    calib_batches: int = 4, method: str = "minmax", symmetric_act: bool = False,
) -> nn.Module:
    """Replace every Conv2d/Linear named in ``policy`` by its fake-quant twin, in place.

    Calibrates activation ranges on ``calib_loader`` (``calib_batches`` batches) when given.
    Layers at (32, 32) stay float. Returns ``model`` for chaining.

    >>> from lcpaq.models import get_model
    >>> m = get_model("mnist_resnet")
    >>> _ = apply_policy(m, Policy.uniform(quantizable_names(m), 8, 8))
    """
    policy.validate(quantizable_names(model))
    if method not in CALIB_METHODS:  # checked up front so a bad call leaves the model untouched
        raise ConfigError(f"unknown calibration method '{method}'; use one of {', '.join(CALIB_METHODS)}")
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QUANTIZABLE) or name not in policy:
            continue
        w, a = policy[name]
        if isinstance(mod, QUANT_TYPES):  # re-applying: unwrap the float view first
            mod = _as_float(mod)
        if (w, a) == (FLOAT_BITS, FLOAT_BITS):
            new: nn.Module = mod
        elif isinstance(mod, nn.Conv2d):
            new = QuantConv2d.from_float(mod, w, a, symmetric_act=symmetric_act, method=method)
        else:
            new = QuantLinear.from_float(mod, w, a, symmetric_act=symmetric_act, method=method)
        _set_module(model, name, new)
    if calib_loader is not None:
        calibrate(model, calib_loader, batches=calib_batches)
    return model


def _as_float(q: nn.Module) -> nn.Module:
    base = nn.Conv2d if isinstance(q, nn.Conv2d) else nn.Linear
    f = base.__new__(base)
    f.__dict__.update({k: v for k, v in q.__dict__.items() if k not in ("w_bits", "a_bits")})
    f._modules = {k: v for k, v in q._modules.items() if k != "act_quant"}
    return f


@torch.no_grad()
def calibrate(model: nn.Module, loader: Iterable, batches: int = 4) -> nn.Module:
    """Run ``batches`` batches through ``model`` to set every activation quantizer's range.

    Each quantizer uses the method it was built with (``apply_policy(..., method=...)``).

    >>> apply_policy(model, policy)            # doctest: +SKIP
    >>> calibrate(model, train_loader, 4)      # doctest: +SKIP
    """
    quants = [m.act_quant for m in model.modules() if isinstance(m, QUANT_TYPES) and m.act_quant is not None]
    if not quants:
        return model
    was_training = model.training
    model.eval()
    for q in quants:
        q.reset_stats()
        q.observe = True
    try:
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x)
    finally:
        for q in quants:
            q.observe = False
    for q in quants:
        q.compute_qparams()
    model.train(was_training)
    return model


def policy_of(model: nn.Module) -> Policy:
    """The policy a (partly) quantized model currently runs."""
    bits = {}
    for n, m in model.named_modules():
        if isinstance(m, QUANT_TYPES):
            bits[n] = (m.w_bits, m.a_bits)
        elif isinstance(m, QUANTIZABLE):
            bits[n] = (FLOAT_BITS, FLOAT_BITS)
    return Policy(bits)
