"""Validation of ``lcpaq.sensitivity/1`` JSON: every malformed field is a SensitivityError that
names the field and says how to fix it (regenerate with ``lcpaq sensitivity``)."""

from __future__ import annotations

import math
from typing import Any

from lcpaq.errors import SensitivityError
from lcpaq.policy import FLOAT_BITS, format_bits
from lcpaq.sensitivity.report import (
    METHODS,
    SENSITIVITY_SCHEMA,
    SensitivityReport,
    parse_candidates,
)
from lcpaq.sensitivity.stats import TraceEstimate

_FIX = "; regenerate it with `lcpaq sensitivity`"


def _err(source: str, where: str, what: str) -> SensitivityError:
    return SensitivityError(f"{source}: {where} {what}{_FIX}")


def _finite(v: Any, source: str, where: str, *, minimum: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(source, where, f"must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise _err(source, where, f"must be >= {minimum}, got {v!r}")
    return float(v)


def _int(v: Any, source: str, where: str, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(source, where, f"must be an integer >= {minimum}, got {v!r}")
    return v


def _estimate(v: Any, method: str, source: str, where: str) -> TraceEstimate:
    if not isinstance(v, dict):
        raise _err(source, where, f"must be an object {{mean, stderr, probes}}, got {type(v).__name__}")
    for k in ("mean", "stderr", "probes"):
        if k not in v:
            raise _err(source, where, f"lacks '{k}'")
    se = math.inf if v["stderr"] is None else _finite(v["stderr"], source, f"{where}.stderr", minimum=0.0)
    return TraceEstimate(_finite(v["mean"], source, f"{where}.mean"), se,
                         _int(v["probes"], source, f"{where}.probes", minimum=1), method)


def _pert(v: Any, source: str, where: str) -> dict[int, float]:
    if not isinstance(v, dict):
        raise _err(source, where, "must be an object mapping bits to a squared error")
    out = {}
    for b, x in v.items():
        if not str(b).isdigit() or not 2 <= int(b) <= 8:
            raise _err(source, f"{where}[{b!r}]", "key must be a bit-width 2..8")
        out[int(b)] = _finite(x, source, f"{where}[{b!r}]", minimum=0.0)
    return out


def report_from_dict(d: Any, source: str = "report") -> SensitivityReport:
    """Check every field of a ``lcpaq.sensitivity/1`` dict and build the report."""
    if not isinstance(d, dict):
        raise _err(source, "the document", f"must be a JSON object, got {type(d).__name__}")
    if d.get("schema") != SENSITIVITY_SCHEMA:
        raise SensitivityError(f"{source}: schema {d.get('schema')!r}, expected '{SENSITIVITY_SCHEMA}'"
                               " (is this a sensitivity report?)")
    for k in ("model", "data", "seed", "probes", "method", "candidates", "layers"):
        if k not in d:
            raise _err(source, f"field '{k}'", "is missing (malformed report)")
    method = d["method"]
    if method not in METHODS:
        raise _err(source, "'method'", f"must be one of {METHODS}, got {method!r}")
    if not isinstance(d["model"], str) or not isinstance(d["data"], str):
        raise _err(source, "'model'/'data'", "must be strings")
    cands = parse_candidates(d["candidates"], source)
    layers = d["layers"]
    if not isinstance(layers, dict) or not layers:
        raise _err(source, "'layers'", "must be a non-empty object keyed by layer name (malformed report)")
    wt, at, numel, wp, ap = {}, {}, {}, {}, {}
    for ly, v in layers.items():
        w = f"layers[{ly!r}]"
        if not isinstance(v, dict):
            raise _err(source, w, "must be an object")
        for k in ("weight_trace", "numel_w", "numel_a", "w_pert", "a_pert"):
            if k not in v:
                raise _err(source, f"{w}.{k}", "is missing (malformed report)")
        wt[ly] = _estimate(v["weight_trace"], method, source, f"{w}.weight_trace")
        if v.get("act_trace") is not None:
            at[ly] = _estimate(v["act_trace"], method, source, f"{w}.act_trace")
        numel[ly] = (_int(v["numel_w"], source, f"{w}.numel_w", minimum=1),
                     _int(v["numel_a"], source, f"{w}.numel_a", minimum=1))
        wp[ly] = _pert(v["w_pert"], source, f"{w}.w_pert")
        ap[ly] = _pert(v["a_pert"], source, f"{w}.a_pert")
        for wb, ab in cands:
            if wb != FLOAT_BITS and wb not in wp[ly]:
                raise _err(source, f"{w}.w_pert", f"has no entry for {wb} bits (candidate {format_bits((wb, ab))})")
            if ab != FLOAT_BITS and ab not in ap[ly]:
                raise _err(source, f"{w}.a_pert", f"has no entry for {ab} bits (candidate {format_bits((wb, ab))})")
    if at and set(at) != set(wt):
        raise _err(source, "'act_trace'", "must be given for every layer or for none")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise _err(source, "'meta'", "must be an object")
    rep = SensitivityReport(
        model=d["model"], data=d["data"], seed=_int(d["seed"], source, "'seed'"),
        probes=_int(d["probes"], source, "'probes'", minimum=1), method=method,
        weight_trace=wt, act_trace=at, numel=numel, w_pert=wp, a_pert=ap, candidates=cands, meta=meta,
    )
    _check_omega(rep, layers, source)
    return rep


def _check_omega(rep: SensitivityReport, layers: dict, source: str) -> None:
    """The stored Ω table is for readers; it must agree with the traces it was computed from."""
    for ly, v in layers.items():
        stored = v.get("omega")
        if stored is None:
            continue
        if not isinstance(stored, dict):
            raise _err(source, f"layers[{ly!r}].omega", "must be an object keyed like 'w4a8'")
        for p in rep.candidates:
            key = format_bits(p)
            if key not in stored:
                raise _err(source, f"layers[{ly!r}].omega", f"lacks candidate '{key}'")
            got = _finite(stored[key], source, f"layers[{ly!r}].omega[{key!r}]", minimum=0.0)
            want = rep.omega(ly, p)
            if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12):
                raise _err(source, f"layers[{ly!r}].omega[{key!r}]",
                           f"= {got:.6g} disagrees with its traces and perturbations ({want:.6g}); "
                           "the file was edited by hand")
