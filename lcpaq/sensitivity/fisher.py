"""Fallback for models whose ops have no double backward: a Fisher (squared-gradient) trace.

Some ops implement only a first derivative (``hardsigmoid_backward`` in mobilenet_v3, custom
``once_differentiable`` kernels), so a Hessian-vector product fails. We detect that error, name
the op and the modules that use it, warn, and estimate each block's trace as the mean over
samples i of ||∇ l_i||², the trace of the Fisher information, which needs first derivatives only.

Labels: by default ("model") each sample's label is drawn from the model's own softmax with the
seeded generator (the "true" Fisher). For cross-entropy that Fisher equals the generalised
Gauss-Newton matrix, and for a network that is piecewise linear in each layer's weights and in
each layer's input (ReLU, eval-mode BN, pooling) the diagonal blocks of the GGN equal those of
the Hessian, so the estimate is then unbiased for the same per-layer traces. ``"data"`` uses the
calibration labels (the empirical Fisher), which is biased when the model is far from a minimum.

Scaling: the loss is the mean over N samples, so the weight block of its Hessian is the mean of
per-sample Hessians, and the block of sample i's activation is (1/N) of sample i's: summed over
the N samples, the activation trace is again the per-sample mean. Both are estimated by the mean
over samples of the per-sample squared gradient norm (one sample per forward pass).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lcpaq.errors import SensitivityError
from lcpaq.sensitivity.blocks import capture_inputs, only_grads_for, weight_of
from lcpaq.sensitivity.hutchinson import LossFn, Progress
from lcpaq.sensitivity.stats import TRACE_FLOOR, RunningStats, TraceEstimate

log = logging.getLogger(__name__)

FISHER_LABELS = ("model", "data")
_NO_DOUBLE_BACKWARD = re.compile(
    r"derivative for (?P<op>[\w:.]+) is not implemented"
    r"|differentiate twice a function that was marked with @once_differentiable"
    r"|double backward|is not twice differentiable",
)


def double_backward_failure(err: BaseException) -> str | None:
    """The op name (e.g. ``hardsigmoid``) if ``err`` says an op lacks a second derivative,
    ``"?"`` if it says so without naming one, else None (a different error: re-raise it)."""
    m = _NO_DOUBLE_BACKWARD.search(str(err))
    if m is None:
        return None
    op = m.groupdict().get("op")
    if not op:
        return "?"
    return op.split("::")[-1].removesuffix("_backward")


def modules_using(model: nn.Module, op: str) -> list[str]:
    """Names (with class) of the modules whose class name is ``op`` (e.g. Hardsigmoid)."""
    key = op.replace("_", "").lower()
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if n and type(m).__name__.lower() == key]


def fallback_message(model: nn.Module, op: str, err: BaseException) -> str:
    users = modules_using(model, op) if op != "?" else []
    where = ""
    if users:
        shown = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        where = f" (used by {shown})"
    return (f"op '{op}'{where} has no double backward ({str(err).splitlines()[0]}), so Hessian-vector "
            "products are impossible through this model; falling back to a Fisher (squared-gradient) "
            "estimate of every layer's trace")


def warn_fallback(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def fisher_traces(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str],
    *,
    activations: bool = True,
    max_samples: int = 64,
    min_samples: int = 8,
    tol: float = 0.05,
    floor: float = TRACE_FLOOR,
    labels: str = "model",
    generator: torch.Generator | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, TraceEstimate], dict[str, TraceEstimate]]:
    """Fisher trace per layer weight (and input activation), one sample per backward pass.

    Stops when every block's stderr < ``tol`` x max(|mean|, ``floor`` x the largest mean of its
    kind) after ``min_samples`` samples (the rule of :func:`~lcpaq.sensitivity.hutchinson.hutchinson_blocks`),
    or after ``max_samples`` (at most the number of calibration samples).
    """
    if labels not in FISHER_LABELS:
        raise SensitivityError(f"unknown Fisher labels '{labels}'; use one of {FISHER_LABELS}")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.eval()
    weights = [weight_of(model, n) for n in layers]
    n = min(max_samples, x.shape[0])
    keys = [f"w:{ly}" for ly in layers] + ([f"a:{ly}" for ly in layers] if activations else [])
    run = RunningStats(keys)
    with only_grads_for(model, weights):
        for i in range(n):
            xi = x[i:i + 1].detach().clone().requires_grad_(activations)
            with capture_inputs(model, layers if activations else []) as acts:
                out = model(xi)
            yi = y[i:i + 1]
            if labels == "model":
                p = torch.softmax(out.detach().reshape(1, -1).double(), dim=1)[0]
                yi = torch.multinomial(p, 1, generator=gen).reshape(y[i:i + 1].shape).to(y.dtype)
            loss = loss_fn(out, yi)
            tensors = weights + ([acts[ly] for ly in layers] if activations else [])
            g = torch.autograd.grad(loss, tensors, allow_unused=True)
            run.add({k: 0.0 if t is None else float(t.pow(2).sum()) for k, t in zip(keys, g, strict=True)})
            mrs = run.max_floored_rel_stderr(floor)
            if progress is not None:
                progress(i + 1, mrs)
            if i + 1 >= max(min_samples, 2) and mrs < tol:
                break
    est = {k: run.estimate(k, "fisher") for k in keys}
    return ({ly: est[f"w:{ly}"] for ly in layers},
            {ly: est[f"a:{ly}"] for ly in layers} if activations else {})
