"""Sensitivity: per-layer Hessian traces (Hutchinson, one HVP for every layer's weight and input)
x per-bit-width quantization perturbation -> Ω(layer, (w_bits, a_bits)), in a versioned report.

Modules: ``stats`` (running mean/stderr, probes), ``blocks`` (data, which tensors), ``hutchinson``
(the estimator), ``fisher`` (fallback without double backward), ``perturbation`` (||Q(W) - W||²),
``report``/``validate`` (``lcpaq.sensitivity/1`` JSON, Ω), ``api`` (``estimate_sensitivity``).

>>> # rep = estimate_sensitivity(model, loader, candidates=[(4, 8), (8, 8), (32, 32)], seed=0)
>>> # rep.omega("layer1.0.conv1", (4, 8)); rep.omega_table(); rep.save("sens.json")
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: ``report``/``validate``/``stats`` are torch-free, so the search (which must not
# import torch) can load a report; the estimators import torch when first used.
_EXPORTS = {
    "SensitivityConfig": "api", "estimate_sensitivity": "api",
    "capture_inputs": "blocks", "collect_batches": "blocks",
    "fisher_traces": "fisher",
    "hutchinson_blocks": "hutchinson", "hutchinson_traces": "hutchinson",
    "Perturbations": "perturbation", "perturbations": "perturbation",
    "OMEGA_VARIANTS": "report", "SENSITIVITY_SCHEMA": "report", "SensitivityReport": "report",
    "RunningStats": "stats", "TraceEstimate": "stats", "rademacher": "stats",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lcpaq.sensitivity.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lcpaq.sensitivity' has no attribute '{name}'")


__all__ = sorted(_EXPORTS)
