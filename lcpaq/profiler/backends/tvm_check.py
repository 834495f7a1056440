"""Predicted vs measured on TVM: mixed policies built whole by TVM against a TVM latency table.

``whole_vs_table(model, input_shape, hw, table, policies)`` exports each policy's whole model to
ONNX QDQ (:mod:`lcpaq.deploy.qdq`), builds it with TVM through lcpaq's lowering
(:func:`lcpaq.deploy.runtime.deploy_tvm_onnx`, the path of ``lcpaq validate``; tuned from the
profile's database, missing tasks tuned first) and times it at 1 thread (the calling thread's CPU
time: at 1 TVM thread the calling thread computes; wall time beside it) against the uniform W8A8
whole model, interleaved in short chunks (:func:`lcpaq.profiler.backends.ort.time_interleaved`,
as ORT's whole rows): each row carries ``rel`` = policy / W8A8, which holds where either time alone
drifts with this VM. The prediction is the table's :class:`~lcpaq.latency.LatencyModel`
(:func:`lcpaq.profiler.predict.latency_model`, the path of ``lcpaq predict``). Errors per policy:

- ``error_table_pct`` (primary where the table has whole-model references): the prediction vs
  ``rel x`` the table's own W8A8 whole-model time (its ``__whole__|w8a8`` row, timed when the table
  was profiled): both sides in the table's time, the machine's drift since then divided out;
- ``error_run_pct``: vs ``rel x median(W8A8 of this run)`` (:func:`lcpaq.profiler.blocks.drift_free_ms`):
  the drift within the run divided out, not the drift since the table;
- ``error_pct`` (raw): vs the policy's own chunk time now; ``error_wall_pct`` the same in wall time;
- ``error_calibrated_pct``: the table rescaled per class on the uniform fp32 / W8A8 whole models of
  this run (:func:`lcpaq.profiler.fidelity.calibrate_to_references`), vs ``rel x median(W8A8)``.

Whole-model reference rows (``record_references``): ``__whole__|w8a8`` and ``__whole__|fp32``, the
uniform builds of the table's model timed against each other (``time_interleaved``) just before and
just after the units are profiled; ``median_ms`` is the mean of the two, ``start_ms`` / ``end_ms``
each, ``p10_ms`` / ``p90_ms`` the lower / higher. They are ordinary rows (a later one supersedes an
earlier), so tables without them stay readable and such tables are scored on ``error_run_pct``.
``benchmarks/bench_tvm.py --predict N [--reprofile OUT]`` runs it on resnet18.

>>> # res = whole_vs_table(get_model("resnet18"), (1, 3, 224, 224), hw, "latency_tables/host-cpu-tvm/resnet18.jsonl",
>>> #                      {k: random_class_policy(names, np.random.default_rng(k), cands) for k in range(20)})
>>> # res["primary"], res[res["primary"]]["median_abs"], res["raw"]["max_abs"]
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.policy import Policy
from lcpaq.profiler.backend import MeasureSettings, Unit
from lcpaq.profiler.references import (  # the reference rows are any backend's; TVM tables made them first
    DEFAULT_SETTINGS,
    REFERENCES,
    WHOLE_KEY,
    profile_and_references,
    record_references,
    reference_key,
    reference_rows,
    table_references,
    time_references,
)


def _stats(rows: Sequence[Mapping[str, Any]], col: str) -> dict[str, float]:
    e = [abs(float(r[col])) for r in rows]
    return {"median_abs": float(np.median(e)), "max_abs": float(max(e)), "within_5pct": int(sum(v <= 5 for v in e)),
            "mean": float(np.mean([float(r[col]) for r in rows]))}


def build_whole(model: Any, input_shape: Sequence[int], hw: Any, policies: Mapping[Any, Policy], *,
                backend: Any = None, calib: np.ndarray | None = None,
                log: Callable[[str], None] | None = None) -> tuple[dict[Any, Any], dict[str, Any]]:
    """Each policy's whole model exported to QDQ, lowered, tuned where the database lacks a task and
    compiled (or its kept build loaded), its outputs checked against the fake-quant model.
    Returns (deployments by policy id, build figures by str(id))."""
    import torch

    from lcpaq.deploy.qdq import export_qdq
    from lcpaq.deploy.runtime import check_outputs, deploy_tvm_onnx
    from lcpaq.profiler.backend import get_backend
    from lcpaq.quant import apply_policy

    say = log or (lambda _s: None)
    shape = (1, *tuple(input_shape)[1:])
    model = model.eval()
    x = calib if calib is not None else np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    be = backend if backend is not None else get_backend("tvm", hw)
    deps, build = {}, {}
    for k, pol in policies.items():
        t0 = time.perf_counter()
        fq = apply_policy(copy.deepcopy(model), pol, calib_loader=[torch.from_numpy(x)], calib_batches=1).eval()
        dep = deploy_tvm_onnx(export_qdq(fq, shape, calib_inputs=[x], dynamic_batch=False), x[:1], hw, backend=be)
        chk = check_outputs(dep, fq, x[:2])
        deps[k] = dep
        build[str(k)] = {"s": round(time.perf_counter() - t0, 1), "max_abs_err": chk["max_abs_err"],
                         "ref_abs_max": chk["ref_abs_max"], "top1_agreement": chk["top1_agreement"],
                         "notes": list(dep.notes), "load": os.getloadavg()[0]}
        say(f"built {k}: {build[str(k)]['s']} s, |out - fake-quant| {chk['max_abs_err']:.3g} "
            f"(of {chk['ref_abs_max']:.3g}), load {os.getloadavg()[0]:.2f}")
    return deps, build


def reference_builds(model: Any, input_shape: Sequence[int], hw: Any, **kw: Any) -> tuple[dict[Any, Any], dict]:
    """The uniform fp32 and W8A8 whole builds of ``model`` (:func:`build_whole`)."""
    from lcpaq.quant import quantizable_names

    names = quantizable_names(model)
    return build_whole(model, input_shape, hw, {k: Policy.uniform(names, *p) for k, p in REFERENCES.items()}, **kw)


def profile_with_references(inventory: Any, model: Any, input_shape: Sequence[int], hw: Any, out: str | Path, *,
                            deps: Mapping[Any, Any] | None = None, model_name: str = "",
                            settings: MeasureSettings = DEFAULT_SETTINGS, log: Callable[[str], None] | None = None,
                            **kw: Any) -> dict[str, Any]:
    """``lcpaq.profiler.run.profile`` into ``out`` bracketed by the whole-model references (timed
    just before and just after, appended as ``__whole__`` rows;
    :func:`lcpaq.profiler.references.profile_and_references`). ``deps``: the reference builds when
    already built (else built here; ``kw`` goes to :func:`build_whole`)."""
    from lcpaq.profiler.run import profile

    if deps is None or not all(k in deps for k in REFERENCES):
        deps, _ = reference_builds(model, input_shape, hw, log=log, **kw)
    return profile_and_references(lambda: profile(inventory, hw, out), deps, hw, out, model_name=model_name,
                                  settings=settings, log=log)


def whole_vs_table(model: Any, input_shape: Sequence[int], hw: Any, table: str | Path, policies: Mapping[Any, Policy],
                   *, settings: MeasureSettings | None = None, backend: Any = None, model_name: str = "",
                   calib: np.ndarray | None = None, deps: Mapping[Any, Any] | None = None,
                   interleave: Mapping[str, int] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per policy: measured (whole TVM build, ``rel`` to the W8A8 build) and predicted (``table``)
    ms and % errors (module doc).

    ``model``: a float nn.Module; ``policies``: id -> Policy over its quantizable layers; ``deps``:
    builds already made (:func:`build_whole`, by the same ids and "fp32" / "w8a8"); ``interleave``:
    ``time_interleaved``'s ``rounds``, ``calls``, ``settle`` (default ``3 * repeat`` rounds of
    ``number`` calls after 1 untimed call; ``{"calls": 1, "settle": 0}``: call by call).
    Returns {"rows", "uniform", "primary", "table_refs", and per error column its stats: "table"
    (where the table has references), "run", "raw", "wall", "calibrated"; build, timing and load
    figures, "deployments"}.
    """
    import torch

    from lcpaq.graph import trace
    from lcpaq.profiler.backends.ort import time_interleaved
    from lcpaq.profiler.blocks import drift_free_ms
    from lcpaq.profiler.fidelity import calibrate_to_references
    from lcpaq.profiler.predict import latency_model
    from lcpaq.profiler.table import read_table
    from lcpaq.quant import quantizable_names

    say = log or (lambda _s: None)
    shape = (1, *tuple(input_shape)[1:])
    model = model.eval()
    names = quantizable_names(model)
    pairs = list(dict.fromkeys([*REFERENCES.values(), *(tuple(p[n]) for p in policies.values() for n in names)]))
    tab = read_table(table)
    lm = latency_model(tab, trace(model, shape, name=model_name), pairs)
    table_refs = table_references(tab)
    pols: dict[Any, Policy] = {k: Policy.uniform(names, *p) for k, p in REFERENCES.items()}
    pols.update(policies)
    t_start = time.perf_counter()
    have = dict(deps or {})
    built, build = build_whole(model, shape, hw, {k: p for k, p in pols.items() if k not in have},
                               backend=backend, calib=calib, log=log)
    have.update(built)
    t_build = time.perf_counter() - t_start
    st = settings or DEFAULT_SETTINGS
    inter = dict(interleave or {})
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load0, t1 = os.getloadavg()[0], time.perf_counter()
        ref_start = time_references(have, st, **inter)
        rows = []
        for k in policies:
            t = time_interleaved(have["w8a8"].call, have[k].call, st, **inter)
            rows.append({"policy": k, "measured_ms": t["ms"], "measured_wall_ms": t["wall_ms"], "ref_ms": t["ref_ms"],
                         "rel": t["rel"], "fp32_layers": sum(1 for n in names if tuple(policies[k][n]) == (32, 32)),
                         "layers": len(names)})
        ref_end = time_references(have, st, **inter)
        load1, t_time = os.getloadavg()[0], time.perf_counter() - t1
    finally:
        torch.set_num_threads(old)
    ref_run = float(np.median([r["ref_ms"] for r in rows]))
    in_ref = drift_free_ms([{"ref_ms": r["ref_ms"], "rel": r["rel"]} for r in rows]).tolist()  # rel x ref_run
    rel_fp32 = (ref_start["rel_fp32"] + ref_end["rel_fp32"]) / 2
    cal = calibrate_to_references(lm, {(8, 8): ref_run, (32, 32): rel_fp32 * ref_run})
    for r, meas in zip(rows, in_ref, strict=True):
        pol = policies[r["policy"]]
        pred, pred_cal = lm.predict(pol), cal.predict(pol)
        r.update(predicted_ms=pred, measured_run_ms=meas, error_pct=100 * (pred / r["measured_ms"] - 1),
                 error_run_pct=100 * (pred / meas - 1), error_wall_pct=100 * (pred / r["measured_wall_ms"] - 1),
                 drift=r["ref_ms"] / ref_run, predicted_calibrated_ms=pred_cal,
                 error_calibrated_pct=100 * (pred_cal / meas - 1))
        if "w8a8" in table_refs:
            r["measured_table_ms"] = r["rel"] * table_refs["w8a8"]
            r["error_table_pct"] = 100 * (pred / r["measured_table_ms"] - 1)
        say(f"#{r['policy']} fp32 {r['fp32_layers']}/{r['layers']} rel {r['rel']:.4f} meas {r['measured_ms']:.3f} "
            f"(wall {r['measured_wall_ms']:.3f}) pred {pred:.3f} err raw {r['error_pct']:+.1f}% run "
            f"{r['error_run_pct']:+.1f}%" + (f" table {r['error_table_pct']:+.1f}%" if "w8a8" in table_refs else "")
            + f" calibrated {r['error_calibrated_pct']:+.1f}% drift {r['drift']:.3f}")
    uniform = {k: {"measured_ms": ref_start[k], "measured_wall_ms": ref_start[f"{k}_wall"], "end_ms": ref_end[k],
                   "run_ms": ref_run * (1.0 if k == "w8a8" else rel_fp32), "predicted_ms": lm.predict(pols[k]),
                   **({"table_ms": table_refs[k]} if k in table_refs else {})} for k in REFERENCES}
    if "w8a8" in table_refs:  # the uniform fp32 build in table time (rel_fp32 x table W8A8) vs its own row
        uniform["fp32"]["in_table_time_ms"] = rel_fp32 * table_refs["w8a8"]
    out = {"rows": rows, "uniform": uniform, "table_refs": table_refs,
           "primary": "table" if "w8a8" in table_refs else "run",
           "raw": _stats(rows, "error_pct"), "run": _stats(rows, "error_run_pct"),
           "wall": _stats(rows, "error_wall_pct"), "calibrated": _stats(rows, "error_calibrated_pct"),
           "references": {"start": ref_start, "end": ref_end, "run_w8a8_ms": ref_run, "rel_fp32": rel_fp32},
           "build": build, "build_s": round(t_build, 1), "timing_s": round(t_time, 1), "load_timing_start": load0,
           "load_timing_end": load1, "interleave": {"rounds": inter.get("rounds") or 3 * st.repeat,
                                                     "calls": inter.get("calls") or st.number,
                                                     "settle": inter.get("settle", 1)},
           "settings": {"warmup": st.warmup, "number": st.number, "repeat": st.repeat, "metric": st.metric},
           "deployments": have}
    if "w8a8" in table_refs:
        out["table"] = _stats(rows, "error_table_pct")
    return out


def kernel_profile(be: Any, onnx_bytes: bytes, x1: np.ndarray, runs: int = 5) -> dict[str, float]:
    """Per-kernel thread-CPU us of one inference of a whole-model QDQ graph built by ``be``, by
    kernel name (median of ``runs``): the Relax VM's instrument hook around every call instruction
    (a few us of Python per call included)."""
    import tvm
    from tvm import relax

    ex, _, params, _ = be.compile(Unit("deploy:whole-model", onnx_bytes, {"x": x1}, {}, (8, 8)))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = be._args(Unit("p", onnx_bytes, {"x": x1}), params, dev)
    tot: dict[str, float] = {}
    start: dict[str, int] = {}

    def instrument(func: Any, name: Any, before: bool, ret: Any, *a: Any) -> int:  # noqa: ARG001 - VM signature
        if before:
            start[str(name)] = time.thread_time_ns()
        else:
            tot[str(name)] = tot.get(str(name), 0.0) + (time.thread_time_ns() - start.pop(str(name))) / 1e3
        return 0

    vm.set_instrument(instrument)
    per: dict[str, list[float]] = {}
    for _ in range(runs + 1):  # the first run is a warm-up
        tot.clear()
        vm["main"](*args)
        for k, v in tot.items():
            per.setdefault(k, []).append(v)
    med = {k: float(np.median(v[1:])) for k, v in per.items() if len(v) > 1}
    return dict(sorted(med.items(), key=lambda kv: -kv[1]))


__all__ = ["whole_vs_table", "build_whole", "reference_builds", "time_references", "reference_rows",
           "record_references", "profile_with_references", "table_references", "reference_key",
           "kernel_profile", "REFERENCES", "WHOLE_KEY"]
