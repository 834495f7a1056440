"""Proxy data: a deterministic, class-balanced subset of the training data.

>>> # sub = proxy_subset(get_dataset("mnist5k", "train"), fraction=0.04)
>>> # sub.share, sub.per_class
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from lcpaq.errors import ConfigError


@dataclass(frozen=True)
class ProxySubset:
    dataset: Subset  # the proxy samples
    indices: tuple[int, ...]  # into the full dataset, sorted
    full_size: int
    per_class: Mapping[int, int]

    @property
    def share(self) -> float:
        """Fraction of the full data the proxy keeps (0.04 = 4 %)."""
        return len(self.indices) / max(self.full_size, 1)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All proxy samples stacked as (x, y)."""
        xs, ys = zip(*(self.dataset[i] for i in range(len(self.dataset))), strict=True)
        return torch.stack(list(xs)), torch.as_tensor([int(y) for y in ys])


def proxy_subset(dataset: Dataset, *, fraction: float | None = None, count: int | None = None,
                 seed: int = 0) -> ProxySubset:
    """Pick ``fraction`` of ``dataset`` (or ``count`` samples), the same number from every class.

    Classes are filled round-robin so the total is exact; a class with too few samples gives all
    it has. The choice depends only on the labels and ``seed``.

    >>> # proxy_subset(get_dataset("digits", "train"), count=100).per_class
    """
    from lcpaq.data import targets

    y = np.asarray(targets(dataset))
    n = len(y)
    if (fraction is None) == (count is None):
        raise ConfigError("proxy_subset: give exactly one of fraction= or count=")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"proxy fraction {fraction} must be in (0, 1]; e.g. 0.04 for 4 %")
        count = max(1, int(round(fraction * n)))
    assert count is not None
    if not 0 < count <= n:
        raise ConfigError(f"proxy count {count} must be in 1..{n} (the training set size)")
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    pools = {int(c): rng.permutation(np.flatnonzero(y == c)) for c in classes}
    take = dict.fromkeys(pools, 0)
    left = count
    while left:  # round-robin: balanced to within one sample per class
        progressed = False
        for c in pools:
            if left and take[c] < len(pools[c]):
                take[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    idx = np.sort(np.concatenate([pools[c][: take[c]] for c in pools]))
    return ProxySubset(Subset(dataset, idx.tolist()), tuple(int(i) for i in idx), n, take)
