"""Sensitivity: per-layer Hessian traces (Hutchinson, one HVP for all layers) x per-bit-width
quantization perturbation -> Ω(layer, (w_bits, a_bits)), in a reusable versioned report.

>>> # rep = estimate_sensitivity(model, loader, candidates=[(4, 8), (8, 8)], seed=0)
>>> # rep.omega("layer1.conv1", (4, 8))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from lcpaq.policy import FLOAT_BITS, BitPair
from lcpaq.sensitivity.hutchinson import (
    TraceEstimate,
    capture_inputs,
    fisher_traces,
    hutchinson_traces,
    supports_double_backward,
    warn_fallback,
)
from lcpaq.sensitivity.report import OMEGA_VARIANTS, SENSITIVITY_SCHEMA, SensitivityReport


def _batches(data, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0], data[1]
    xs, ys = [], []
    for i, (x, y) in enumerate(data):
        if i >= batches:
            break
        xs.append(x)
        ys.append(y)
    if not xs:
        from lcpaq.errors import SensitivityError

        raise SensitivityError("no calibration data: the loader yielded no batch")
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def perturbations(model: nn.Module, x: torch.Tensor, layers: Sequence[str], bits: Iterable[int],
                  a_bits: Iterable[int]) -> tuple[dict, dict, dict]:
    """||Q_b(W) - W||^2 and ||Q_b(x) - x||^2 (minmax grid on these samples) per layer and bits."""
    from lcpaq.quant import fake_quant_act, fake_quant_weight, qparams_from_range

    with capture_inputs(model, layers) as acts:
        model(x)
    w_pert, a_pert, numel = {}, {}, {}
    for ly in layers:
        w = model.get_submodule(ly).weight.detach()
        xi = acts[ly].detach()
        numel[ly] = (w.numel(), xi.numel())
        w_pert[ly] = {b: float((fake_quant_weight(w, b) - w).pow(2).sum()) for b in bits}
        lo, hi = float(xi.min()), float(xi.max())
        a_pert[ly] = {}
        for b in a_bits:
            sc, zp = qparams_from_range(lo, hi, b, False)
            a_pert[ly][b] = float((fake_quant_act(xi, torch.tensor(sc), zp, b, False) - xi).pow(2).sum())
    return w_pert, a_pert, numel


def estimate_sensitivity(
    model: nn.Module,
    data,
    *,
    candidates: Sequence[BitPair],
    layers: Sequence[str] | None = None,
    probes: int = 200,
    min_probes: int = 10,
    tol: float = 0.05,
    seed: int = 0,
    generator: torch.Generator | None = None,
    batches: int = 2,
    activations: bool = True,
    model_name: str = "",
    data_name: str = "",
    progress: Callable[[int, float], None] | None = None,
) -> SensitivityReport:
    """Hutchinson traces of every quantizable layer and Ω for every candidate bit pair.

    ``data``: a loader of (x, y) batches (the first ``batches`` are concatenated) or an (x, y) pair.
    Falls back, with a warning, to a Fisher estimate when the model has ops without double backward.
    """
    from lcpaq.quant import quantizable_names

    model.eval()
    layers = list(layers) if layers is not None else quantizable_names(model)
    x, y = _batches(data, batches)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    reason = supports_double_backward(model, x, y, layers)
    if reason is None:
        wt, at, _ = hutchinson_traces(model, x, y, layers, activations=activations, max_probes=probes,
                                      min_probes=min_probes, tol=tol, generator=gen, progress=progress)
        method = "hutchinson"
    else:
        warn_fallback(reason)
        wt, at = fisher_traces(model, x, y, layers, activations=activations)
        method = "fisher"
    wb = sorted({p[0] for p in candidates if p[0] != FLOAT_BITS})
    ab = sorted({p[1] for p in candidates if p[1] != FLOAT_BITS})
    w_pert, a_pert, numel = perturbations(model, x, layers, wb, ab)
    n_probes = max(e.probes for e in wt.values())
    return SensitivityReport(
        model=model_name, data=data_name, seed=seed, probes=n_probes, method=method,
        weight_trace={ly: (e.mean, e.stderr) for ly, e in wt.items()},
        act_trace={ly: (e.mean, e.stderr) for ly, e in at.items()},
        numel=numel, w_pert=w_pert, a_pert=a_pert, candidates=tuple(candidates),
        meta={"samples": int(x.shape[0]), "tol": tol, "fallback_reason": reason},
    )


__all__ = [
    "OMEGA_VARIANTS", "SENSITIVITY_SCHEMA", "SensitivityReport", "TraceEstimate", "estimate_sensitivity",
    "fisher_traces", "hutchinson_traces", "perturbations",
]
