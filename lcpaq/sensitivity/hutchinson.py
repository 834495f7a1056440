"""Per-layer Hessian traces by Hutchinson's estimator, all layers from one HVP per probe.

For a Rademacher probe v = (v_1, ..., v_L) over the blocks (layer weights, and optionally layer
input activations), one Hessian-vector product gives Hv; v_l . (Hv)_l = sum_k v_l^T H_lk v_k has
expectation Tr(H_ll) because E[v_l v_k^T] = 0 for k != l. Summing the per-layer estimates gives
exactly the whole-model estimate v . Hv on the same probes.

Loss: mean cross-entropy over the calibration samples, which are concatenated into one batch
(so "the Hessian" is that of the average loss over those samples). The model runs in eval mode,
so BatchNorm uses its running statistics and the Hessian is that of the deployed function.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceEstimate:
    mean: float
    stderr: float
    probes: int
    method: str = "hutchinson"  # or "fisher"

    @property
    def rel_stderr(self) -> float:
        return self.stderr / max(abs(self.mean), 1e-30)


class _Running:
    """Welford running mean/variance per key."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.n = 0
        self.mean = dict.fromkeys(keys, 0.0)
        self.m2 = dict.fromkeys(keys, 0.0)

    def add(self, values: Mapping[str, float]) -> None:
        self.n += 1
        for k, x in values.items():
            d = x - self.mean[k]
            self.mean[k] += d / self.n
            self.m2[k] += d * (x - self.mean[k])

    def stderr(self, k: str) -> float:
        if self.n < 2:
            return float("inf")
        return math.sqrt(self.m2[k] / (self.n - 1) / self.n)

    def max_rel_stderr(self) -> float:
        return max((self.stderr(k) / max(abs(self.mean[k]), 1e-30) for k in self.mean), default=0.0)


def _rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, t.shape, generator=gen, dtype=torch.int8).to(t.dtype) * 2 - 1)


def capture_inputs(model: nn.Module, names: Sequence[str]):
    """Context manager that records each named layer's input tensor (kept in the graph)."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    class _Ctx:
        def __enter__(self):
            for n in names:
                def hook(m, inp, _n=n):
                    store[_n] = inp[0]
                handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
            return store

        def __exit__(self, *exc):
            for h in handles:
                h.remove()

    return _Ctx()


def hutchinson_traces(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str],
    *,
    activations: bool = True,
    max_probes: int = 200,
    min_probes: int = 10,
    tol: float = 0.05,
    generator: torch.Generator | None = None,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, TraceEstimate], dict[str, TraceEstimate], list[dict[str, float]]]:
    """Per-layer weight (and input-activation) Hessian traces.

    Stops when every block's relative stderr (|stderr / mean|) is below ``tol`` after at least
    ``min_probes`` probes, or at ``max_probes``. Returns (weight traces, activation traces, the raw
    per-probe samples as dicts "w:<layer>"/"a:<layer>" -> value).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.eval()
    weights = [model.get_submodule(n).weight for n in layers]
    if activations:  # the first layer's input is the data itself: make it differentiable
        x = x.detach().clone().requires_grad_(True)
    with capture_inputs(model, layers if activations else []) as acts:
        loss = loss_fn(model(x), y)
    blocks: list[tuple[str, torch.Tensor]] = [(f"w:{n}", w) for n, w in zip(layers, weights, strict=True)]
    if activations:
        blocks += [(f"a:{n}", acts[n]) for n in layers]
    tensors = [t for _, t in blocks]
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    keys = [k for k, _ in blocks]
    run = _Running(keys)
    samples: list[dict[str, float]] = []
    for i in range(max_probes):
        vs = [_rademacher(t, gen) for t in tensors]
        hv = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=True)
        vals = {k: float((v * h).sum()) for k, v, h in zip(keys, vs, hv, strict=True)}
        run.add(vals)
        samples.append(vals)
        mrs = run.max_rel_stderr()
        if progress is not None:
            progress(i + 1, mrs)
        if i + 1 >= min_probes and mrs < tol:
            break
    est = {k: TraceEstimate(run.mean[k], run.stderr(k), run.n) for k in keys}
    w = {n: est[f"w:{n}"] for n in layers}
    a = {n: est[f"a:{n}"] for n in layers} if activations else {}
    return w, a, samples


def fisher_traces(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str], *,
    activations: bool = True, max_samples: int = 64,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, TraceEstimate], dict[str, TraceEstimate]]:
    """Empirical-Fisher trace estimate (mean over samples of ||grad of the per-sample loss||^2,
    scaled to the mean loss): needs first derivatives only, for ops without double backward."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.eval()
    n = min(max_samples, x.shape[0])
    keys = [f"w:{ly}" for ly in layers] + ([f"a:{ly}" for ly in layers] if activations else [])
    run = _Running(keys)
    for i in range(n):
        xi = x[i:i + 1].detach().clone().requires_grad_(activations)
        with capture_inputs(model, layers if activations else []) as acts:
            loss = loss_fn(model(xi), y[i:i + 1])
        tensors = [model.get_submodule(ly).weight for ly in layers]
        if activations:
            tensors += [acts[ly] for ly in layers]
        g = torch.autograd.grad(loss, tensors)
        # F = E[g g^T] is the Fisher of the per-sample loss; the mean loss over N samples has
        # Hessian ~ F, and its activation block (batch of N) ~ F / N^2 per sample -> scale.
        vals = {k: float(t.pow(2).sum()) for k, t in zip(keys, g, strict=True)}
        for k in keys:
            if k.startswith("a:"):
                vals[k] /= x.shape[0]
        run.add(vals)
    est = {k: TraceEstimate(run.mean[k], run.stderr(k), run.n, "fisher") for k in keys}
    return ({ly: est[f"w:{ly}"] for ly in layers},
            {ly: est[f"a:{ly}"] for ly in layers} if activations else {})


def supports_double_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str]) -> str | None:
    """None if an HVP works through ``model``; else the error text (e.g. hardsigmoid)."""
    try:
        w = [model.get_submodule(n).weight for n in layers]
        loss = nn.functional.cross_entropy(model(x[:2]), y[:2])
        g = torch.autograd.grad(loss, w, create_graph=True)
        torch.autograd.grad(g, w, grad_outputs=[torch.ones_like(t) for t in w], allow_unused=True)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def warn_fallback(reason: str) -> None:
    msg = (f"double backward is not available through this model ({reason}); "
           "falling back to a Fisher (squared-gradient) estimate of the traces")
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
