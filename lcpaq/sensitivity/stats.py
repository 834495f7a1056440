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


# The stop rule's floor, as a fraction of the largest |trace| of the same kind (weights or inputs):
# a block whose trace is smaller is estimated to tol x that floor, not to tol of its own ~0 trace.
# Why a quarter: with probes shared by every block, a block's estimate carries the cross terms
# v_l.H_lk v_k of all the others, so its noise is set by the large blocks, not by its own trace
# (embedded model, 200 probes: SE of the ~0 activation traces 0.007-0.03 vs 0.13 for the largest;
# largest stop statistic after 200 probes 9.6 without a floor, 1.35 at 0.05, 1.24 at 0.1, 0.66
# at 0.25; notes/qa.md, session 7).
TRACE_FLOOR = 0.25


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
        """Largest |stderr / mean| over the keys (inf while a mean is 0)."""
        return max((self.rel_stderr(k) for k in self.mean), default=0.0)

    def max_floored_rel_stderr(self, floor: float = TRACE_FLOOR) -> float:
        """Largest stderr / max(|mean|, floor x the largest |mean| of its group): the stop rule.

        A group is the keys sharing the prefix before ":" ("w:" weights, "a:" activations: traces
        of other units). |stderr / mean| alone never converges for a block whose trace is near 0
        (the embedded model's activation traces: 9.6 after 200 probes), and an error that small
        beside the group's largest trace cannot change which layers Ω ranks first."""
        big: dict[str, float] = {}
        for k, m in self.mean.items():
            g = k.split(":", 1)[0] if ":" in k else ""
            big[g] = max(big.get(g, 0.0), abs(m))
        out = 0.0
        for k, m in self.mean.items():
            g = k.split(":", 1)[0] if ":" in k else ""
            scale = max(abs(m), floor * big[g])
            se = self.stderr(k)
            out = max(out, se / scale if scale > 0 else (0.0 if se == 0 else math.inf))
        return out

    def estimate(self, k: str, method: str = "hutchinson") -> TraceEstimate:
        return TraceEstimate(self.mean[k], self.stderr(k), self.n, method)


def rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A ±1 tensor shaped like ``t``, drawn from ``gen`` (reproducible for a given seed)."""
    import torch

    return torch.randint(0, 2, t.shape, generator=gen, dtype=torch.int8).to(t.dtype).mul_(2).sub_(1)
