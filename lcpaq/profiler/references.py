"""Whole-model reference rows for any latency table: the uniform W8A8 and fp32 models of the table's
model, deployed as ``lcpaq validate`` deploys them and timed against each other
(:func:`lcpaq.profiler.backends.ort.time_interleaved`) just before and just after the units are
profiled (``lcpaq profile --references``). They are ordinary ``__whole__|w8a8`` / ``__whole__|fp32``
rows (a later one supersedes an earlier; tables without them stay readable); a table that holds them
names its reference to the latency model (``meta["reference"]``), and validate then times the
deployed policy against the uniform W8A8 model and reports the error in the table's time, with the
machine's drift since profiling divided out.

>>> # deps = reference_deployments(get_model("mnist_resnet"), (1, 1, 28, 28), load_profile("hw_profiles/host-cpu-ort.toml"))
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.profiler.backend import MeasureSettings

REFERENCES = {"fp32": (32, 32), "w8a8": (8, 8)}
WHOLE_KEY = "__whole__"  # reference rows: "__whole__|w8a8", "__whole__|fp32"
DEFAULT_SETTINGS = MeasureSettings(warmup=3, number=3, repeat=5, threads=1, metric="thread_cpu")


def reference_key(name: str) -> str:
    return f"{WHOLE_KEY}|{name}"


def table_references(table: Any) -> dict[str, float]:
    """{"w8a8": ms, "fp32": ms} from a table's whole-model reference rows ({} for a table without)."""
    from lcpaq.profiler.table import LatencyTable, read_table

    t = table if isinstance(table, LatencyTable) else read_table(table)
    out = {}
    for name in REFERENCES:
        row = t.get(reference_key(name))
        if row and not row.get("error") and row.get("median_ms"):
            out[name] = float(row["median_ms"])
    return out


def time_references(deps: Mapping[Any, Any], settings: MeasureSettings = DEFAULT_SETTINGS,
                    **interleave: Any) -> dict[str, float]:
    """The uniform fp32 build timed against the W8A8 one (``time_interleaved``, 1 thread):
    {"w8a8", "fp32", "w8a8_wall", "fp32_wall" (ms), "rel_fp32" (fp32 / W8A8, median per round)}."""
    import torch

    from lcpaq.profiler.backends.ort import time_interleaved

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time_interleaved(deps["w8a8"].call, deps["fp32"].call, settings, **interleave)
    finally:
        torch.set_num_threads(old)
    return {"w8a8": t["ref_ms"], "fp32": t["ms"], "w8a8_wall": t["ref_wall_ms"], "fp32_wall": t["wall_ms"],
            "rel_fp32": t["rel"], "load": os.getloadavg()[0]}


def reference_rows(start: Mapping[str, float], end: Mapping[str, float], *, model_name: str,
                   versions: Mapping[str, str], settings: MeasureSettings = DEFAULT_SETTINGS,
                   kernel: str = "tvm:whole-model") -> list[dict[str, Any]]:
    """Table rows for the whole-model references timed at the start and the end of a profile (module
    doc): ``median_ms`` = their mean, ``p10_ms`` / ``p90_ms`` = the lower / higher of the two."""
    rows = []
    for name, pair in REFERENCES.items():
        a, b = float(start[name]), float(end[name])
        rows.append({
            "key": reference_key(name), "workload": f"{WHOLE_KEY}:{model_name}", "layer_example": None,
            "w_bits": pair[0], "a_bits": pair[1], "unit_class": "fp32" if pair == (32, 32) else "int8",
            "in_class": "fp32", "median_ms": (a + b) / 2, "p10_ms": min(a, b), "p90_ms": max(a, b), "n": 2,
            "wall_median_ms": (float(start[f"{name}_wall"]) + float(end[f"{name}_wall"])) / 2,
            "kernel": kernel, "error": None, "runtime": dict(versions),
            "model": model_name, "start_ms": a, "end_ms": b,
            "timing": {"method": "time_interleaved(w8a8, fp32)", "warmup": settings.warmup,
                       "number": settings.number, "repeat": settings.repeat, "metric": settings.metric},
        })
    return rows


def record_references(table: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append reference rows to an existing table (its own header: never a setup change)."""
    from lcpaq.profiler.table import TableWriter, read_table

    with TableWriter(table, read_table(table).header) as tw:
        for r in rows:
            tw.append(r)


def reference_deployments(model: Any, input_shape: Sequence[int], hw: Any, *,
                          calib: np.ndarray | None = None) -> dict[str, Any]:
    """{"w8a8", "fp32"}: the uniform models deployed on ``hw``'s backend (TVM: built and tuned from
    the profile's database by :func:`lcpaq.profiler.backends.tvm_check.reference_builds`)."""
    shape = (1, *tuple(input_shape)[1:])
    x = calib if calib is not None else np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    if hw.backend == "tvm":
        from lcpaq.profiler.backends.tvm_check import reference_builds

        return reference_builds(model, shape, hw, calib=x)[0]
    import torch

    from lcpaq.deploy.runtime import deploy
    from lcpaq.policy import Policy
    from lcpaq.quant import apply_policy, quantizable_names

    names = quantizable_names(model)
    out = {}
    for k, pair in REFERENCES.items():
        fq = apply_policy(copy.deepcopy(model).eval(), Policy.uniform(names, *pair),
                          calib_loader=[torch.from_numpy(x)], calib_batches=1).eval()
        out[k] = deploy(fq, hw.backend, shape, threads=hw.threads, calib_inputs=[x], hw=hw)
    return out


def profile_and_references(profile: Callable[[], Any], deps: Mapping[str, Any], hw: Any, table: str | Path, *,
                           model_name: str, settings: MeasureSettings | None = None,
                           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the references, run ``profile()`` (which fills ``table``), time them again, append the
    rows. ``settings``: default the profile's (validate measures with the same)."""
    from lcpaq.profiler.table import read_table

    say = log or (lambda _s: None)
    st = settings or hw.settings
    start = time_references(deps, st)
    say(f"references before profiling: W8A8 {start['w8a8']:.3f} ms, fp32 {start['fp32']:.3f} ms, "
        f"load {start['load']:.2f}")
    t0 = time.perf_counter()
    profile()
    t_profile = time.perf_counter() - t0
    end = time_references(deps, st)
    say(f"profiled {table} in {t_profile:.1f} s; references after: W8A8 {end['w8a8']:.3f} ms, "
        f"fp32 {end['fp32']:.3f} ms, load {end['load']:.2f}")
    rows = reference_rows(start, end, model_name=model_name, versions=read_table(table).header.get("versions", {}),
                          settings=st, kernel=f"{hw.backend}:whole-model")
    record_references(table, rows)
    return {"start": start, "end": end, "profile_s": round(t_profile, 1), "table": str(table)}


__all__ = ["REFERENCES", "WHOLE_KEY", "DEFAULT_SETTINGS", "reference_key", "table_references", "time_references",
           "reference_rows", "record_references", "reference_deployments", "profile_and_references"]
