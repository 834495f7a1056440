"""``estimate_sensitivity``: the one verb of this package (traces, perturbations, Ω, report)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lcpaq.errors import SensitivityError
from lcpaq.policy import FLOAT_BITS, BitPair
from lcpaq.sensitivity.blocks import collect_batches
from lcpaq.sensitivity.fisher import (
    double_backward_failure,
    fallback_message,
    fisher_traces,
    warn_fallback,
)
from lcpaq.sensitivity.hutchinson import Progress, hutchinson_traces
from lcpaq.sensitivity.perturbation import perturbations
from lcpaq.sensitivity.report import SensitivityReport
from lcpaq.sensitivity.stats import TRACE_FLOOR


@dataclass(frozen=True)
class SensitivityConfig:
    """Options beyond the common ones of :func:`estimate_sensitivity`.

    ``batches``: calibration batches taken from the loader (concatenated; the loss is the mean
    cross-entropy over all their samples). ``layers``: default every Conv2d/Linear.
    ``activations``: also estimate input-activation traces (needed to choose a_bits).
    ``fisher_labels``/``fisher_samples``: the fallback's labels ("model" or "data") and sample cap.
    ``act_method``: activation calibration for the perturbation (minmax | percentile | mse).
    ``tol_floor``: the stop rule's floor, a fraction of the largest |trace| of the same kind
    (weights or inputs): a block stops at stderr < tol x max(|trace|, tol_floor x that largest).
    """

    batches: int = 2
    layers: tuple[str, ...] | None = None
    min_probes: int = 10
    activations: bool = True
    fisher_labels: str = "model"
    fisher_samples: int = 64
    act_method: str = "minmax"
    tol_floor: float = TRACE_FLOOR
    model_name: str = ""
    data_name: str = ""


def estimate_sensitivity(
    model: nn.Module,
    data: object,
    *,
    candidates: Sequence[BitPair],
    probes: int = 200,
    tol: float = 0.05,
    seed: int = 0,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    config: SensitivityConfig | None = None,
) -> SensitivityReport:
    """Per-layer Hessian traces (weights and inputs) and Ω for every candidate bit pair.

    ``data``: a DataLoader or list of (x, y) batches (the first ``config.batches`` are used), or
    one (x, y) pair. Hutchinson runs until every block's stderr < ``tol`` x max(|trace|,
    ``config.tol_floor`` x the largest |trace| of its kind) (at least ``config.min_probes`` probes)
    or ``probes`` probes: a near-zero trace is estimated to a fraction of the largest, not of itself. If an op of the model has no double
    backward (e.g. hardsigmoid), it warns naming the op and its modules and falls back to a
    Fisher estimate. ``progress(i, r)`` is called after every probe, ``r`` the largest
    stderr / max(|trace|, floor) (what the rule compares with ``tol``). The model is
    evaluated in eval mode and restored to its previous mode afterwards.

    >>> from lcpaq.testing.models import TinyMLP
    >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    >>> rep = estimate_sensitivity(TinyMLP(), (x, y), candidates=[(4, 8), (8, 8), (32, 32)], probes=20)
    >>> rep.omega("fc1", (4, 8)) >= rep.omega("fc1", (8, 8)) >= rep.omega("fc1", (32, 32)) == 0.0
    True
    """
    from lcpaq.quant import quantizable_names

    cfg = config or SensitivityConfig()
    if not candidates:
        raise SensitivityError("no candidate bit pairs; pass e.g. candidates=[(4, 8), (8, 8), (32, 32)]")
    if not 0 < tol:
        raise SensitivityError(f"tol={tol}; use a positive relative standard error such as 0.05")
    if not 0 <= cfg.tol_floor <= 1:
        raise SensitivityError(f"tol_floor={cfg.tol_floor}; use a fraction in [0, 1] such as {TRACE_FLOOR}")
    was_training = model.training
    model.eval()
    try:
        layers = list(cfg.layers) if cfg.layers is not None else quantizable_names(model)
        if not layers:
            raise SensitivityError("the model has no quantizable layer (Conv2d/Linear)")
        x, y = collect_batches(data, cfg.batches)
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        fallback = None
        try:
            wt, at, _ = hutchinson_traces(
                model, x, y, layers, activations=cfg.activations, max_probes=probes,
                min_probes=cfg.min_probes, tol=tol, floor=cfg.tol_floor, generator=gen, progress=progress)
            method = "hutchinson"
        except RuntimeError as e:
            op = double_backward_failure(e)
            if op is None:
                raise
            fallback = fallback_message(model, op, e)
            warn_fallback(fallback)
            wt, at = fisher_traces(
                model, x, y, layers, activations=cfg.activations, max_samples=cfg.fisher_samples,
                min_samples=min(cfg.min_probes, cfg.fisher_samples), tol=tol, floor=cfg.tol_floor,
                labels=cfg.fisher_labels,
                generator=gen, progress=progress)
            method = "fisher"
        wb = [p[0] for p in candidates if p[0] != FLOAT_BITS]
        ab = [p[1] for p in candidates if p[1] != FLOAT_BITS]
        pert = perturbations(model, x, layers, wb, ab, method=cfg.act_method)
    finally:
        model.train(was_training)
    taken = max(e.probes for e in wt.values())
    return SensitivityReport(
        model=cfg.model_name, data=cfg.data_name, seed=seed, probes=taken, method=method,
        weight_trace=wt, act_trace=at, numel=pert.numel, w_pert=pert.w, a_pert=pert.a,
        candidates=tuple(candidates),
        meta={"samples": int(x.shape[0]), "batches": cfg.batches, "tol": tol, "tol_floor": cfg.tol_floor,
              "max_probes": probes,
              "loss": "mean cross-entropy over the concatenated calibration samples (eval mode)",
              "act_method": cfg.act_method, "fallback": fallback,
              "probes_from": "seed" if generator is None else "caller generator",
              "fisher_labels": cfg.fisher_labels if method == "fisher" else None},
    )
