"""Synthetic, deterministic search problems and latency models (torch-free) for tests/benchmarks."""

from __future__ import annotations

import random

from lcpaq.latency import LatencyModel
from lcpaq.policy import FP32, BitPair
from lcpaq.search.problem import Budgets, Problem

CANDIDATES_12: tuple[BitPair, ...] = tuple(
    (w, a) for a in (4, 6, 8) for w in (2, 3, 4, 8)
)


def random_problem(n_layers: int, *, candidates: tuple[BitPair, ...] = CANDIDATES_12, seed: int = 0,
                   ties: int = 0, pairwise: bool | str = False, budget_frac: float = 0.5,
                   budgets: tuple[str, ...] = ("max_size_mb", "max_gbops", "max_latency_ms")) -> Problem:
    """A random but realistic problem: costs grow with bits, Ω shrinks ~4^-bits, optional ties
    (consecutive layers) and transition costs on consecutive layers: ``pairwise=True`` (or
    ``"abits"``) charges one cost per edge when a_bits differ; ``"random"`` draws an unstructured
    cost for every pair of candidates (no classes to merge: the ILP's worst case)."""
    rng = random.Random(seed)
    layers = tuple(f"l{i}" for i in range(n_layers))
    omega, size, gbops, lat = {}, {}, {}, {}
    for ly in layers:
        params, macs, sens = rng.uniform(1e3, 1e5), rng.uniform(1e5, 1e7), rng.uniform(0.1, 10)
        base = rng.uniform(0.05, 0.5)
        omega[ly] = {p: (0.0 if p == FP32 else sens * (4.0 ** -p[0] + 0.5 * 4.0 ** -p[1])) for p in candidates}
        size[ly] = {p: params * p[0] / 8 / 1e6 for p in candidates}
        gbops[ly] = {p: macs * p[0] * p[1] / 1e9 for p in candidates}
        lat[ly] = {p: base * (0.4 + 0.6 * max(p) / 8) * (1 + 0.05 * rng.random()) for p in candidates}
    pw = {}
    if pairwise:
        for a, b in zip(layers, layers[1:], strict=False):
            cost = rng.uniform(0.01, 0.1)
            if pairwise == "random":
                pw[(a, b)] = {(i, j): rng.uniform(0.0, 0.1) for i in candidates for j in candidates}
            else:
                pw[(a, b)] = {(i, j): cost for i in candidates for j in candidates if i[1] != j[1]}
    tie_groups = tuple(tuple(layers[i:i + 2]) for i in range(0, min(2 * ties, n_layers - 1), 2))
    prob = Problem(layers, {ly: candidates for ly in layers}, omega,
                   {"size_mb": size, "gbops": gbops, "latency_ms": lat}, Budgets(), tie_groups, {}, pw)
    lo = {k: sum(min(t[ly].values()) for ly in layers) for k, t in prob.costs.items()}
    hi = {k: sum(max(t[ly].values()) for ly in layers) for k, t in prob.costs.items()}
    lims = {k: lo[c] + budget_frac * (hi[c] - lo[c])
         for k, c in (("max_size_mb", "size_mb"), ("max_gbops", "gbops"), ("max_latency_ms", "latency_ms"))
         if k in budgets}
    return prob.with_budgets(Budgets(**lims))


def synthetic_latency(names: list[str] | tuple[str, ...], candidates: tuple[BitPair, ...], *, seed: int = 0,
                      edges: tuple[tuple[str, str], ...] = (), transition_ms: float = 0.0) -> LatencyModel:
    """A LatencyModel whose unary cost falls with bits and whose edges pay ``transition_ms``
    whenever the two layers differ in precision class (fp32 vs integer)."""
    rng = random.Random(seed)
    unary = {}
    for n in names:
        base = rng.uniform(0.1, 1.0)
        unary[n] = {p: base * (1.0 if p == FP32 else 0.45 + 0.05 * max(p[0], p[1]) / 8) for p in candidates}
    pair = {}
    if transition_ms:
        for e in edges:
            pair[e] = {(i, j): transition_ms for i in candidates for j in candidates if (i == FP32) != (j == FP32)}
    return LatencyModel(unary, pair, constant_ms=0.05)
