"""Per-layer Hessian traces by Hutchinson's estimator: one HVP per probe gives every layer.

For a Rademacher probe v = (v_1, ..., v_L) over the blocks (the quantizable layers' weights and,
optionally, each layer's input activation), one Hessian-vector product (double backward) gives
Hv, and v_l . (Hv)_l = sum_k v_l^T H_lk v_k has expectation Tr(H_ll), since E[v_l v_k^T] = 0 for
k != l and E[v_l v_l^T] = I. Summed over blocks it is exactly the whole-model estimate v . Hv on
the same probe, so per-layer traces cost what a whole-model trace costs (the cross terms H_lk add
variance, not bias). Loss: see :mod:`lcpaq.sensitivity.blocks` (mean cross-entropy over the
concatenated calibration batches). The model is put in eval mode, so BatchNorm uses its running
statistics and the Hessian is that of the deployed function; only the blocks require grad.

>>> import torch
>>> from lcpaq.testing.models import TinyMLP
>>> m = TinyMLP().eval()
>>> x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
>>> w, a, _ = hutchinson_traces(m, x, y, ["fc1", "fc2"], max_probes=8, seed=0)
>>> sorted(w), w["fc1"].probes
(['fc1', 'fc2'], 8)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lcpaq.errors import SensitivityError
from lcpaq.sensitivity.blocks import capture_inputs, only_grads_for, weight_of
from lcpaq.sensitivity.stats import TRACE_FLOOR, RunningStats, TraceEstimate, rademacher

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, float], None]


def hutchinson_blocks(
    loss: torch.Tensor,
    blocks: Sequence[tuple[str, torch.Tensor]],
    *,
    generator: torch.Generator,
    max_probes: int = 200,
    min_probes: int = 10,
    tol: float = 0.05,
    floor: float = TRACE_FLOOR,
    progress: Progress | None = None,
    max_seconds: float | None = None,
) -> tuple[dict[str, TraceEstimate], list[dict[str, float]]]:
    """Hutchinson trace of every block of ∇²loss from shared probes (the estimator's core).

    ``blocks``: (key, tensor) pairs that ``loss`` depends on. Stops once every block's
    stderr < ``tol`` x max(|mean|, ``floor`` x the largest |mean| of its kind, "w:" or "a:")
    (:meth:`~lcpaq.sensitivity.stats.RunningStats.max_floored_rel_stderr`) after at least
    ``min_probes`` probes, or at ``max_probes``, or once ``max_seconds`` have passed (wall
    clock, checked after each probe). ``floor=0``: the plain |stderr / mean| < tol, which a
    near-zero trace never meets.
    Returns the estimates and the raw per-probe values (key -> v_l . (Hv)_l).
    """
    if max_probes < 2:
        raise SensitivityError(f"probes={max_probes}; use at least 2 (a standard error needs two)")
    keys = [k for k, _ in blocks]
    tensors = [t for _, t in blocks]
    grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    run = RunningStats(keys)
    samples: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for i in range(max_probes):
        if not live:  # loss linear in every block: the Hessian blocks are all 0
            run.add(dict.fromkeys(keys, 0.0))
            continue
        # draw every block's probe (even dead ones) so the stream does not depend on the graph
        vs = [rademacher(t, generator) for t in tensors]
        hv = torch.autograd.grad([grads[j] for j in live], [tensors[j] for j in live],
                                 grad_outputs=[vs[j] for j in live], retain_graph=True, allow_unused=True)
        vals = dict.fromkeys(keys, 0.0)  # a block the gradient does not depend on: H_ll = 0
        for j, h in zip(live, hv, strict=True):
            if h is not None:
                vals[keys[j]] = float(torch.dot(vs[j].reshape(-1), h.reshape(-1)))
        run.add(vals)
        samples.append(vals)
        mrs = run.max_floored_rel_stderr(floor)
        if progress is not None:
            progress(i + 1, mrs)
        if i + 1 >= max(min_probes, 2) and mrs < tol:
            break
        if max_seconds is not None and i + 1 >= 2 and time.perf_counter() - t0 > max_seconds:
            break
    return {k: run.estimate(k) for k in keys}, samples


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
    floor: float = TRACE_FLOOR,
    generator: torch.Generator | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
    max_seconds: float | None = None,
) -> tuple[dict[str, TraceEstimate], dict[str, TraceEstimate], list[dict[str, float]]]:
    """Per-layer weight (and input-activation) Hessian traces of ``loss_fn(model(x), y)``.

    Returns (weight traces, activation traces, raw per-probe values keyed "w:<layer>" /
    "a:<layer>"). Stop rule (``tol``, ``floor``): see :func:`hutchinson_blocks`. The generator
    is ``generator`` if given, else ``torch.Generator().manual_seed(seed)``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.eval()
    weights = [weight_of(model, n) for n in layers]
    x = x.detach().clone().requires_grad_(activations)
    with only_grads_for(model, weights):
        with capture_inputs(model, layers if activations else []) as acts:
            loss = loss_fn(model(x), y)
        blocks = [(f"w:{n}", w) for n, w in zip(layers, weights, strict=True)]
        if activations:
            blocks += [(f"a:{n}", acts[n]) for n in layers]
        est, samples = hutchinson_blocks(loss, blocks, generator=gen, max_probes=max_probes,
                                         min_probes=min_probes, tol=tol, floor=floor, progress=progress,
                                         max_seconds=max_seconds)
    w = {n: est[f"w:{n}"] for n in layers}
    a = {n: est[f"a:{n}"] for n in layers} if activations else {}
    return w, a, samples
