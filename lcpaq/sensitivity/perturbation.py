"""Quantization perturbations ||Q_b(W) - W||² and ||Q_b(x) - x||² per layer and bit-width.

Weights use lcpaq.quant's symmetric per-output-channel ``fake_quant_weight``; activations use
lcpaq.quant's per-tensor ``ActQuantizer`` (the one ``apply_policy`` inserts), calibrated by
``method`` on the layer's input over the calibration samples and then applied to them, so the
perturbation is the one the deployed layer sees on that data.

>>> import torch
>>> from lcpaq.testing.models import TinyMLP
>>> p = perturbations(TinyMLP().eval(), torch.randn(4, 8), ["fc1"], [4, 8], [8])
>>> p.w["fc1"][4] > p.w["fc1"][8] > 0
True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lcpaq.sensitivity.blocks import capture_inputs, weight_of


@dataclass(frozen=True)
class Perturbations:
    w: dict[str, dict[int, float]]  # layer -> w_bits -> ||Q(W) - W||²
    a: dict[str, dict[int, float]]  # layer -> a_bits -> ||Q(x) - x||² (over all calibration samples)
    numel: dict[str, tuple[int, int]]  # layer -> (n_w, n_a)


@torch.no_grad()
def perturbations(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str], w_bits: Iterable[int],
    a_bits: Iterable[int], *, method: str = "minmax", symmetric_act: bool = False,
) -> Perturbations:
    """Squared quantization error of every layer's weight and input for each bit-width."""
    from lcpaq.quant import fake_quant_weight
    from lcpaq.quant.quantizers import ActQuantizer

    w_bits, a_bits = sorted(set(w_bits)), sorted(set(a_bits))
    model.eval()
    with capture_inputs(model, layers) as acts:
        model(x)
    w_pert: dict[str, dict[int, float]] = {}
    a_pert: dict[str, dict[int, float]] = {}
    numel: dict[str, tuple[int, int]] = {}
    for ly in layers:
        w = weight_of(model, ly).detach()
        xi = acts[ly].detach()
        numel[ly] = (w.numel(), xi.numel())
        w_pert[ly] = {b: float((fake_quant_weight(w, b) - w).pow(2).sum()) for b in w_bits}
        a_pert[ly] = {}
        for b in a_bits:
            q = ActQuantizer(b, symmetric=symmetric_act, method=method)
            q.observe = True
            q(xi)
            q.observe = False
            q.compute_qparams()
            a_pert[ly][b] = float((q(xi) - xi).pow(2).sum())
    return Perturbations(w_pert, a_pert, numel)
