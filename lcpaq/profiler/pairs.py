"""Block pairs: what the whole graph pays at a block boundary that two blocks timed apart do not.

A block unit is cut at its boundary tensors, so it times ORT's optimized graph *of the block
alone*: the layout conversions, Q/DQ and Transpose placement ORT chooses at the cut (NCHWc reorders
for fp32 convs, NHWC transposes for int8 ones) are not the ones it chooses when the neighbour block
is there. On mobilenet_v2 whole - sum(blocks) grew with mixing (0-29 %) and no per-edge regression
on whole-model rows predicted it on held-out policies (session 5).

Here the two blocks of each boundary are cut as *one* unit from the same mixed export, and the
boundary's joint cost ``J = pair - block_a - block_b`` is measured directly. The cut ends of the
pair are the outer ends of the two blocks, so their isolation costs cancel in ``J``: what is left is
what joining the blocks changes. ``J`` is keyed by the precision classes of the layers on the
boundary's edges (producer and consumers), the median over every designed policy that showed that
pattern (many per pattern, so single noisy timings do not matter).

* :func:`boundaries` / :func:`boundary_layers`: block pairs joined by a cross edge and their edge layers.
* :func:`pair_groupings`: layer -> group maps in which each boundary's two blocks are one group; a
  map holds disjoint boundaries, so two ``cut_groups`` calls per export cover a chain of blocks.
* :func:`pair_costs`: one :class:`~lcpaq.latency.GroupCost` per boundary from a table's pair rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lcpaq.latency import GroupCost
from lcpaq.profiler.fidelity import pattern

SEP = "+"


def boundaries(plan: Any) -> list[tuple[str, str]]:
    """(block_a, block_b), a before b, for every pair of blocks joined by a cross-block edge."""
    out: dict[tuple[str, str], None] = {}
    for p, c in plan.edges:
        a, b = plan.groups[p], plan.groups[c]
        if a != b:
            out[(a, b)] = None
    return list(out)


def boundary_name(a: str, b: str) -> str:
    return f"{a}{SEP}{b}"


def boundary_layers(plan: Any, a: str, b: str) -> tuple[str, ...]:
    """Layers at either end of the edges between blocks a and b, in model order."""
    order = {n: i for i, n in enumerate(plan.layers)}
    ls = {n for p, c in plan.edges if {plan.groups[p], plan.groups[c]} == {a, b} for n in (p, c)}
    return tuple(sorted(ls, key=order.__getitem__))


def pair_context(plan: Any, a: str, b: str) -> tuple[str, ...]:
    """Both blocks' context layers, members first, in model order (the pair unit depends on no other)."""
    order = {n: i for i, n in enumerate(plan.layers)}
    return tuple(sorted(set(plan.context[a]) | set(plan.context[b]), key=order.__getitem__))


def pair_groupings(plan: Any) -> list[dict[str, str]]:
    """layer -> group maps that merge the two blocks of a boundary into one group named 'a+b';
    each map merges disjoint boundaries only (a block in at most one pair per map)."""
    used: list[set[str]] = []
    maps: list[dict[str, str]] = []
    for a, b in boundaries(plan):
        k = next((j for j, u in enumerate(used) if a not in u and b not in u), len(used))
        if k == len(used):
            used.append(set())
            maps.append(dict(plan.groups))
        used[k].update((a, b))
        for n in plan.members[a] + plan.members[b]:
            maps[k][n] = boundary_name(a, b)
    return maps


def record_pairs(table: Any, units: Mapping[str, Any], policy: Any) -> list[Any]:
    """Record each merged group's observation in ``table.pairs`` (pair-context pattern, pair key and
    the two blocks' keys in this policy); return the pair units not yet timed."""
    plan = table.plan
    todo = []
    for g, u in units.items():
        if SEP not in g:
            continue
        a, b = g.split(SEP)
        ka = table.keys[a][plan.context_of(policy, a)]
        kb = table.keys[b][plan.context_of(policy, b)]
        table.pairs.setdefault(g, []).append([pattern(policy, pair_context(plan, a, b)), u.key, ka, kb])
        if u.key not in table.ms and all(u.key != t.key for t in todo):
            todo.append(u)
    return todo


def pair_costs(table: Any) -> list[GroupCost]:
    """One GroupCost per boundary with pair rows: ``J`` by the classes of the boundary's edge layers
    (median over the observations); a pattern never observed gets the boundary's overall median."""
    plan = table.plan
    out = []
    for g, obs in table.pairs.items():
        a, b = g.split(SEP)
        ctx, lay = pair_context(plan, a, b), boundary_layers(plan, a, b)
        idx = [ctx.index(n) for n in lay]
        by: dict[str, list[float]] = {}
        for pat, kp, ka, kb in obs:
            vals = [table.ms.get(k, float("nan")) for k in (kp, ka, kb)]
            if not all(np.isfinite(vals)):
                continue
            by.setdefault("".join(pat[i] for i in idx), []).append(vals[0] - vals[1] - vals[2])
        if not by:
            continue
        med = {p: float(np.median(v)) for p, v in by.items()}
        every = float(np.median([x for v in by.values() for x in v]))
        full = {format(k, f"0{len(lay)}b").replace("0", "f").replace("1", "i"): every for k in range(2 ** len(lay))}
        full.update(med)
        out.append(GroupCost(f"pair:{g}", lay, full))
    return out


def pairs_ms(groups: Sequence[GroupCost], policy: Any) -> float:
    return float(sum(g.cost(policy) for g in groups))


__all__ = ["boundaries", "boundary_name", "boundary_layers", "pair_context", "pair_groupings", "record_pairs",
           "pair_costs", "pairs_ms"]
