"""Running statistics and probes for the stochastic trace estimators.

>>> run = RunningStats(["a"])
>>> for x in (1.0, 3.0):
...     run.add({"a": x})
>>> run.estimate("a").mean, run.estimate("a").probes
(2.0, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the search loads reports without torch
    import torch


@dataclass(frozen=True)
class TraceEstimate:
    """Mean, standard error of the mean and sample count of one block's trace estimate."""

    mean: float
    stderr: float
    probes: int
    method: str = "hutchinson"  # or "fisher"

    @property
    def rel_stderr(self) -> float:
        """|stderr / mean| (inf when the mean is 0): the convergence criterion."""
        return abs(self.stderr) / abs(self.mean) if self.mean != 0 else math.inf


class RunningStats:
    """Welford running mean/variance per key (numerically stable, O(1) memory per key)."""

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
            return math.inf
        return math.sqrt(max(self.m2[k], 0.0) / (self.n - 1) / self.n)

    def rel_stderr(self, k: str) -> float:
        m = abs(self.mean[k])
        return self.stderr(k) / m if m > 0 else math.inf

    def max_rel_stderr(self) -> float:
        """Largest |stderr / mean| over the keys: every key must be below tol to stop."""
        return max((self.rel_stderr(k) for k in self.mean), default=0.0)

    def estimate(self, k: str, method: str = "hutchinson") -> TraceEstimate:
        return TraceEstimate(self.mean[k], self.stderr(k), self.n, method)


def rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A ±1 tensor shaped like ``t``, drawn from ``gen`` (reproducible for a given seed)."""
    import torch

    return torch.randint(0, 2, t.shape, generator=gen, dtype=torch.int8).to(t.dtype).mul_(2).sub_(1)
