"""Predicted vs measured on TVM: mixed policies built whole by TVM against a TVM latency table.

``whole_vs_table(model, input_shape, hw, table, policies)`` exports each policy's whole model to
ONNX QDQ (:mod:`lcpaq.deploy.qdq`), builds it with TVM through lcpaq's lowering
(:func:`lcpaq.deploy.runtime.deploy_tvm_onnx`, the path of ``lcpaq validate``; tuned from the
profile's database, missing tasks tuned first) and times it at 1 thread: the calling thread's CPU
time (at 1 TVM thread the calling thread computes) with wall time beside it, each policy
interleaved with the uniform W8A8 whole model (reference, policy, reference, policy; fastest
round). The prediction is the table's :class:`~lcpaq.latency.LatencyModel`
(:func:`lcpaq.profiler.predict.latency_model`, the path of ``lcpaq predict``), raw, and calibrated
per class on the uniform fp32 / W8A8 whole models measured in the same run
(:func:`lcpaq.profiler.fidelity.calibrate_to_references`) with each policy's reference drift
divided out. ``benchmarks/bench_tvm.py --predict`` runs it on resnet18.

>>> # res = whole_vs_table(get_model("resnet18"), (1, 3, 224, 224), hw, "latency_tables/host-cpu-tvm/resnet18.jsonl",
>>> #                      {k: random_class_policy(names, np.random.default_rng(k), cands) for k in range(20)})
>>> # res["raw"]["median_abs"], res["calibrated"]["max_abs"]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.policy import Policy
from lcpaq.profiler.backend import MeasureSettings, Unit

REFERENCES = {"fp32": (32, 32), "w8a8": (8, 8)}


def _stats(rows: Sequence[Mapping[str, Any]], col: str) -> dict[str, float]:
    e = [abs(float(r[col])) for r in rows]
    return {"median_abs": float(np.median(e)), "max_abs": float(max(e)), "within_5pct": int(sum(v <= 5 for v in e)),
            "mean": float(np.mean([float(r[col]) for r in rows]))}


def whole_vs_table(model: Any, input_shape: Sequence[int], hw: Any, table: str | Path, policies: Mapping[Any, Policy],
                   *, rounds: int = 2, settings: MeasureSettings | None = None, backend: Any = None,
                   model_name: str = "", calib: np.ndarray | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per policy: measured (whole TVM build) and predicted (``table``) ms and % errors (module doc).

    ``model``: a float nn.Module; ``policies``: id -> Policy over its quantizable layers.
    Returns {"rows", "uniform", "raw", "wall", "calibrated", "build", timing and load figures}.
    """
    import os

    import torch

    from lcpaq.deploy.qdq import export_qdq
    from lcpaq.deploy.runtime import check_outputs, deploy_tvm_onnx
    from lcpaq.graph import trace
    from lcpaq.profiler.backend import get_backend
    from lcpaq.profiler.backends.ort import time_callable
    from lcpaq.profiler.fidelity import calibrate_to_references
    from lcpaq.profiler.predict import latency_model
    from lcpaq.quant import apply_policy, quantizable_names

    say = log or (lambda _s: None)
    shape = (1, *tuple(input_shape)[1:])
    model = model.eval()
    names = quantizable_names(model)
    pairs = list(dict.fromkeys([*REFERENCES.values(), *(tuple(p[n]) for p in policies.values() for n in names)]))
    lm = latency_model(table, trace(model, shape, name=model_name), pairs)
    x = calib if calib is not None else np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    be = backend if backend is not None else get_backend("tvm", hw)
    pols: dict[Any, Policy] = {k: Policy.uniform(names, *p) for k, p in REFERENCES.items()}
    pols.update(policies)
    deps, build = {}, {}
    t_start = time.perf_counter()
    for k, pol in pols.items():  # export, lower, tune what the database lacks, compile (or load the kept build)
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
    t_build = time.perf_counter() - t_start
    st = settings or MeasureSettings(warmup=3, number=3, repeat=5, threads=1, metric="thread_cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(1)

    def timed(k: Any) -> tuple[float, float]:
        cpu, wall = time_callable(deps[k].call, st)
        return float(np.median(cpu)), float(np.median(wall))

    try:
        load0, t1 = os.getloadavg()[0], time.perf_counter()
        ref: dict[str, list[tuple[float, float]]] = {k: [] for k in REFERENCES}
        for _ in range(rounds):  # fp32 w8a8 fp32 w8a8
            for k in REFERENCES:
                ref[k].append(timed(k))
        rows = []
        for k in policies:
            pol_ms, ref_ms = [], []
            for _ in range(rounds):  # ref pol ref pol
                ref_ms.append(timed("w8a8"))
                pol_ms.append(timed(k))
            meas, wall = min(pol_ms)
            rows.append({"policy": k, "measured_ms": meas, "measured_wall_ms": wall, "ref_ms": min(ref_ms)[0],
                         "fp32_layers": sum(1 for n in names if tuple(policies[k][n]) == (32, 32)),
                         "layers": len(names)})
        ref_end = {k: min(timed(k) for _ in range(rounds)) for k in REFERENCES}
        load1, t_time = os.getloadavg()[0], time.perf_counter() - t1
    finally:
        torch.set_num_threads(old)
    ref0 = {REFERENCES[k]: min(v)[0] for k, v in ref.items()}
    cal = calibrate_to_references(lm, ref0)
    for r in rows:
        pol = policies[r["policy"]]
        drift = r["ref_ms"] / ref0[(8, 8)]
        pred, pred_cal = lm.predict(pol), cal.predict(pol) * drift
        r.update(predicted_ms=pred, error_pct=100 * (pred / r["measured_ms"] - 1),
                 error_wall_pct=100 * (pred / r["measured_wall_ms"] - 1), drift=drift,
                 predicted_calibrated_ms=pred_cal, error_calibrated_pct=100 * (pred_cal / r["measured_ms"] - 1))
        say(f"#{r['policy']} fp32 {r['fp32_layers']}/{r['layers']} meas {r['measured_ms']:.3f} "
            f"(wall {r['measured_wall_ms']:.3f}) pred {pred:.3f} err {r['error_pct']:+.1f}% "
            f"calibrated {r['error_calibrated_pct']:+.1f}% drift {drift:.3f}")
    uniform = {k: {"measured_ms": min(ref[k])[0], "measured_wall_ms": min(ref[k])[1], "end_ms": ref_end[k][0],
                   "predicted_ms": lm.predict(pols[k])} for k in REFERENCES}
    return {"rows": rows, "uniform": uniform, "raw": _stats(rows, "error_pct"), "wall": _stats(rows, "error_wall_pct"),
            "calibrated": _stats(rows, "error_calibrated_pct"), "build": build, "build_s": round(t_build, 1),
            "timing_s": round(t_time, 1), "load_timing_start": load0, "load_timing_end": load1, "rounds": rounds,
            "settings": {"warmup": st.warmup, "number": st.number, "repeat": st.repeat, "metric": st.metric},
            "deployments": deps}


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


__all__ = ["whole_vs_table", "kernel_profile", "REFERENCES"]
