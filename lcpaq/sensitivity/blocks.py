"""What the estimators differentiate: calibration data, layer weights and layer inputs.

Loss convention (shared by Hutchinson and Fisher): the first ``batches`` (x, y) batches of the
loader are concatenated into one batch of N samples and the loss is the mean cross-entropy over
those N samples. In eval mode every sample is independent of the others, so this equals the
average of the per-batch mean losses when the batches have the same size (and weights each
sample equally otherwise). One forward pass over N samples is cheaper than N/B small ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lcpaq.errors import SensitivityError


def collect_batches(data: object, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from an (x, y) pair, a list of (x, y) batches, or a loader (first ``batches``)."""
    if batches < 1:
        raise SensitivityError(f"batches={batches}; use at least 1 calibration batch")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if isinstance(y, torch.Tensor) and y.shape[:1] == x.shape[:1]:
            return x, y
    if not isinstance(data, Iterable):
        raise SensitivityError(f"calibration data of type {type(data).__name__} is not iterable; "
                               "pass a DataLoader, a list of (x, y) batches or one (x, y) pair")
    xs, ys = [], []
    for i, item in enumerate(data):
        if i >= batches:
            break
        try:
            x, y = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            raise SensitivityError("each calibration batch must be an (inputs, labels) pair") from None
        xs.append(x)
        ys.append(y)
    if not xs:
        raise SensitivityError("no calibration data: the loader yielded no batch")
    return torch.cat(xs), torch.cat(ys)


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    try:
        w = model.get_submodule(name).weight
    except AttributeError:
        raise SensitivityError(f"layer '{name}' is not a module with a weight in this model; "
                               "see `lcpaq inspect` for the quantizable layer names") from None
    if not isinstance(w, torch.Tensor):
        raise SensitivityError(f"layer '{name}' has no weight tensor")
    return w


@contextmanager
def only_grads_for(model: nn.Module, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily turn off requires_grad on every parameter not in ``tensors`` (so autograd
    builds no graph for biases/BN affine terms), and on for ``tensors``; restores the flags."""
    keep = {id(t) for t in tensors}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def capture_inputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named layer's input tensor during the forward (kept in the autograd graph).

    The first quantizable layer's input is the data itself: the caller makes it a leaf with
    requires_grad so that its Hessian block exists.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for n in names:
            def hook(_m: nn.Module, inp: tuple, _n: str = n) -> tuple:
                if _n in store:
                    raise SensitivityError(f"layer '{_n}' is called more than once per forward; its "
                                           "input activation is ambiguous (pass activations=False)")
                # A private alias per layer: layers that share an input tensor (a ResNet block's
                # conv1 and downsample) get separate Hessian blocks, as each has its own quantizer.
                store[_n] = inp[0].view_as(inp[0])
                return (store[_n], *inp[1:])
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
