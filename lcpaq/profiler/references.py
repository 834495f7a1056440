"""Whole-model reference rows for any latency table: the uniform W8A8 and fp32 models of the table's
model, deployed as ``lcpaq validate`` deploys them and timed against each other
(:func:`lcpaq.profiler.backends.ort.time_interleaved`) just before and just after the units are
profiled (``lcpaq profile --references``). They are ordinary ``__whole__|w8a8`` / ``__whole__|fp32``
rows (:mod:`lcpaq.profiler.backends.tvm_check` writes and reads them); a table that holds them
names its reference to the latency model (``meta["reference"]``), and validate then times the
deployed policy against the uniform W8A8 model and reports the error in the table's time, with the
machine's drift since profiling divided out.

>>> # deps = reference_deployments(get_model("mnist_resnet"), (1, 1, 28, 28), load_profile("hw_profiles/host-cpu-ort.toml"))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def reference_deployments(model: Any, input_shape: Sequence[int], hw: Any, *,
                          calib: np.ndarray | None = None) -> dict[str, Any]:
    """{"w8a8", "fp32"}: the uniform models deployed on ``hw``'s backend (TVM: built and tuned from
    the profile's database by :func:`lcpaq.profiler.backends.tvm_check.reference_builds`)."""
    from lcpaq.profiler.backends.tvm_check import REFERENCES, reference_builds

    shape = (1, *tuple(input_shape)[1:])
    x = calib if calib is not None else np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    if hw.backend == "tvm":
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


def profile_and_references(profile: Callable[[], Any], deps: dict[str, Any], hw: Any, table: str | Path, *,
                           model_name: str) -> dict[str, Any]:
    """Time the references, run ``profile()`` (which fills ``table``), time them again, append the
    rows. The profile's settings time them (validate measures with the same)."""
    from lcpaq.profiler.backends.tvm_check import record_references, reference_rows, time_references
    from lcpaq.profiler.table import read_table

    start = time_references(deps, hw.settings)
    profile()
    end = time_references(deps, hw.settings)
    rows = reference_rows(start, end, model_name=model_name, versions=read_table(table).header.get("versions", {}),
                          settings=hw.settings, kernel=f"{hw.backend}:whole-model")
    record_references(table, rows)
    return {"start": start, "end": end}


__all__ = ["reference_deployments", "profile_and_references"]
