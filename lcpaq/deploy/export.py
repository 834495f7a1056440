"""``export_model(...)``: a model under a policy to ONNX QDQ or to lcpaq's integer kernels, checked.

>>> # export_model("mnist_resnet", Policy.load("p.json"), "onnx", "model.onnx")
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.errors import ConfigError
from lcpaq.policy import Policy

FORMATS = ("onnx", "kernels")


def quantize_for_deploy(model: Any, policy: Policy, calib: list[np.ndarray]) -> Any:
    """A calibrated fake-quant copy of an fp32 ``model`` at ``policy``."""
    import torch

    from lcpaq.quant import apply_policy

    return apply_policy(copy.deepcopy(model), policy, calib_loader=[torch.from_numpy(c) for c in calib],
                        calib_batches=len(calib)).eval()


def export_model(model: str | Any, policy: Policy, fmt: str, out: str | Path, *, weights: Any = None,
                 input_shape: tuple[int, ...] | None = None,
                 calib_check: tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None] | None = None,
                 ) -> dict[str, Any]:
    """Write ``model`` at ``policy`` as ``fmt`` ('onnx' QDQ or 'kernels') to ``out``; check outputs.

    Returns {"path", "bytes", "format", "check": {max_abs_err, top1_agreement, ...}}.
    """
    import torch

    from lcpaq.deploy.runtime import check_outputs, deploy
    from lcpaq.models import default_input_shape, get_model

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; use one of {FORMATS}")
    if isinstance(model, str):
        input_shape = input_shape or default_input_shape(model)
        model = get_model(model, weights=weights)
    if input_shape is None:
        raise ConfigError("export_model: pass input_shape for an unregistered model")
    shape = (1, *tuple(input_shape)[1:])
    if calib_check is None:
        rng = np.random.default_rng(0)
        calib_check = ([rng.standard_normal((8, *shape[1:])).astype(np.float32)], None, None)
    calib, xs, ys = calib_check
    fq = quantize_for_deploy(model, policy, calib)
    xs = xs if xs is not None else calib[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if fmt == "onnx":
        dep = deploy(fq, "ort", shape, calib_inputs=calib)
        assert dep.artifact is not None
        tmp.write_bytes(dep.artifact)
    else:
        dep = deploy(fq, "lcpaq-kernels", shape)
        from lcpaq.kernels import convert

        km = convert(copy.deepcopy(fq))
        torch.save({"schema": "lcpaq.kernels_model/1", "policy": policy.to_dict(), "model": km}, tmp)
    os.replace(tmp, out)
    check = check_outputs(dep, fq, xs, ys)
    return {"path": str(out), "bytes": out.stat().st_size, "format": fmt, "check": check,
            "notes": list(dep.notes)}
