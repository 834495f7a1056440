"""Torch-free latency cost model: what the profiler's tables give the search and the validator.

Predicted latency of a policy = constant_ms + sum of unary[layer][pair]
                               + sum over edges (p, c) of pairwise[(p, c)][(pair_p, pair_c)]
                               + sum over groups of group.ms[classes of the group's layers].
Unary costs are per-unit times (conv + fused BN/activation/add/pool as the runtime runs them);
pairwise costs are *transition* costs between adjacent quantizable layers (convert ops, Q/DQ,
layout changes when precisions differ). Missing pairwise entries mean 0. Groups are joint costs
of several layers measured as one unit (a residual block, keyed by the precision class of each
layer it depends on): what a sum of per-layer and per-edge terms cannot express.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lcpaq.errors import MissingLatencyError
from lcpaq.policy import BitPair, Policy, format_bits


def class_letter(pair: BitPair) -> str:
    """'f' when the layer runs the fp32 kernel (either side at 32 bits), else 'i' (the int kernel)."""
    return "f" if 32 in tuple(pair) else "i"


@dataclass(frozen=True)
class GroupCost:
    """Joint cost of a group of layers: ``ms[context]``, context = one :func:`class_letter` per
    entry of ``layers`` (the group's own layers and the outside layers it depends on)."""

    name: str
    layers: tuple[str, ...]
    ms: Mapping[str, float]

    def cost(self, policy: Policy) -> float:
        ctx = "".join(class_letter(policy[n]) for n in self.layers)
        try:
            return float(self.ms[ctx])
        except KeyError:
            raise MissingLatencyError(
                f"no latency for group '{self.name}' in context {ctx!r} (classes of {', '.join(self.layers)}); "
                "profile the group in that context (lcpaq.profiler.blocks.profile_blocks)"
            ) from None


@dataclass(frozen=True)
class LatencyModel:
    unary: Mapping[str, Mapping[BitPair, float]]
    pairwise: Mapping[tuple[str, str], Mapping[tuple[BitPair, BitPair], float]] = field(
        default_factory=dict
    )
    constant_ms: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    groups: tuple[GroupCost, ...] = ()

    def layer_ms(self, name: str, pair: BitPair) -> float:
        try:
            return float(self.unary[name][tuple(pair)])  # type: ignore[index]
        except KeyError:
            raise MissingLatencyError(
                f"no latency for layer '{name}' at {format_bits(pair)}; profile it with "
                f"`lcpaq profile --bits {format_bits(pair)} ...`"
            ) from None

    def breakdown(self, policy: Policy) -> dict[str, float]:
        """Per-layer ms (unary), one entry per edge with a non-zero transition cost, one per group."""
        out = {name: self.layer_ms(name, policy[name]) for name in self.unary}
        for (p, c), table in self.pairwise.items():
            t = float(table.get((policy[p], policy[c]), 0.0))
            if t:
                out[f"{p}->{c}"] = t
        for g in self.groups:
            out[f"group:{g.name}"] = g.cost(policy)
        return out

    def predict(self, policy: Policy) -> float:
        """Predicted end-to-end latency (ms) of ``policy``."""
        return self.constant_ms + sum(self.breakdown(policy).values())
