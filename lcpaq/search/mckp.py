"""MCKP greedy (CO-MPQ): the multiple-choice knapsack solved by best Ω-decrease per unit cost.

Several budgets are scalarised into one cost, c(l, k) = sum_b cost_b(l, k) / budget_b (each budget
normalised so that "1.0" = the whole budget; an unbudgeted cost does not count). Per layer only the
lower convex hull of (c, Ω) is walked. Start at every layer's cheapest hull point, then repeatedly
take the hull step with the largest ΔΩ/Δc whose *true* costs (every budget checked separately,
transitions included) still fit. Ties are repaired after the walk: each tied group takes the lowest
activation bits among its members, each member its best candidate at that a_bits that costs no
more. Pins are fixed throughout. Being greedy it can miss the optimum: the tests bound its gap
against the ILP on random instances (see notes/search.md).
"""

from __future__ import annotations

import heapq
import time

from lcpaq.policy import BitPair, Policy
from lcpaq.search.problem import BUDGET_COSTS, Problem, SearchResult


def _scalar_cost(problem: Problem, ly: str, p: BitPair, weights: dict[str, float] | None = None) -> float:
    items = problem.budgets.items()
    if not items:
        return problem.costs["gbops"][ly][p]
    w = weights or {}
    return sum(w.get(k, 1.0) * problem.costs[BUDGET_COSTS[k]][ly][p] / lim for k, lim in items)


def _hull(points: list[tuple[float, float, BitPair]]) -> list[tuple[float, float, BitPair]]:
    """Lower-left convex hull of (cost, Ω) sorted by cost, Ω strictly decreasing."""
    pts = sorted(points, key=lambda t: (t[0], t[1]))
    front: list[tuple[float, float, BitPair]] = []
    for c, o, p in pts:  # keep Pareto points (cost up, Ω down)
        if not front or o < front[-1][1] - 1e-15:
            front.append((c, o, p))
    hull: list[tuple[float, float, BitPair]] = []
    for pt in front:  # convexity: slopes must become less steep
        while len(hull) >= 2:
            (c1, o1, _), (c2, o2, _) = hull[-2], hull[-1]
            if (o1 - o2) * (pt[0] - c2) <= (o2 - pt[1]) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def solve_mckp(problem: Problem, *, rounds: int = 4) -> SearchResult:
    """Greedy MCKP under every budget; InfeasibleBudgetError if even the cheapest start fails.

    With several budgets the scalarisation weights are adapted over ``rounds`` greedy passes
    (a budget's weight is multiplied by its utilisation, so binding budgets count more), then a
    1-swap local search polishes the best pass.
    """
    t0 = time.perf_counter()
    weights = {k: 1.0 for k, _ in problem.budgets.items()}
    best: dict[str, BitPair] | None = None
    for _ in range(max(1, rounds if len(weights) > 1 else 1)):
        bits = _greedy(problem, weights)
        if best is None or problem.evaluate(bits)["omega"] < problem.evaluate(best)["omega"]:
            best = bits
        ev = problem.evaluate(bits)
        weights = {k: w * max(ev[BUDGET_COSTS[k]] / lim, 1e-3) ** 2 for (k, lim), w in
                   zip(problem.budgets.items(), weights.values(), strict=True)}
    assert best is not None
    bits = _local_search(problem, best)
    dt = time.perf_counter() - t0
    ev = problem.evaluate(bits)
    return SearchResult(
        policy=Policy(bits, meta={"solver": "mckp", "objective": ev["omega"]}), status="Heuristic",
        objective=ev["omega"], costs={k: v for k, v in ev.items() if k != "omega"},
        budgets=dict(problem.budgets.items()), solve_time_s=dt, solver="mckp",
    )


def _local_search(problem: Problem, bits: dict[str, BitPair], passes: int = 2) -> dict[str, BitPair]:
    """Single-layer moves that lower Ω and stay feasible (ties repaired), best first."""
    for _ in range(passes):
        improved = False
        for ly in problem.layers:
            if ly in problem.pinned:
                continue
            cur = problem.evaluate(bits)["omega"]
            for p in sorted(problem.candidates[ly], key=lambda q: problem.omega[ly][q]):
                if problem.omega[ly][p] >= problem.omega[ly][bits[ly]]:
                    break
                trial = _repair_ties(problem, {**bits, ly: p})
                if problem.feasible(trial) and problem.evaluate(trial)["omega"] < cur - 1e-15:
                    bits, improved = trial, True
                    break
        if not improved:
            break
    return bits


def _greedy(problem: Problem, weights: dict[str, float]) -> dict[str, BitPair]:
    hulls: dict[str, list[tuple[float, float, BitPair]]] = {}
    for ly in problem.layers:
        cands = [problem.pinned[ly]] if ly in problem.pinned else list(problem.candidates[ly])
        hulls[ly] = _hull([(_scalar_cost(problem, ly, p, weights), problem.omega[ly][p], p) for p in cands])
    pos = {ly: 0 for ly in problem.layers}
    bits = {ly: hulls[ly][0][2] for ly in problem.layers}
    bits = _repair_ties(problem, bits)
    if not problem.feasible(bits):
        from lcpaq.search.ilp import infeasibility_error

        raise infeasibility_error(problem)
    heap: list[tuple[float, str]] = []

    def push(ly: str) -> None:
        h, i = hulls[ly], pos[ly]
        if i + 1 < len(h):
            dc, do = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
            heapq.heappush(heap, (-(do / max(dc, 1e-18)), ly))

    for ly in problem.layers:
        push(ly)
    while heap:
        _, ly = heapq.heappop(heap)
        nxt = hulls[ly][pos[ly] + 1][2]
        trial = _repair_ties(problem, {**bits, ly: nxt})
        if problem.feasible(trial):
            bits = trial
            pos[ly] += 1
            push(ly)
    return bits


def _repair_ties(problem: Problem, bits: dict[str, BitPair]) -> dict[str, BitPair]:
    """Give every tied group one a_bits: try each value, members take their lowest-Ω candidate at
    it that costs no more than their current choice (else the cheapest); keep the feasible trial
    with the lowest Ω (or the cheapest if none is feasible)."""
    out = dict(bits)
    for group in problem.ties:
        if len({out[ly][1] for ly in group}) == 1:
            continue
        a_vals = sorted({p[1] for ly in group for p in problem.candidates[ly]}
                        & {out[ly][1] for ly in group})
        trials = []
        for a in a_vals:
            t = dict(out)
            for ly in group:
                opts = [p for p in problem.candidates[ly] if p[1] == a]
                if ly in problem.pinned or not opts:
                    continue
                cur = _scalar_cost(problem, ly, out[ly])
                ok = [p for p in opts if _scalar_cost(problem, ly, p) <= cur + 1e-12]
                t[ly] = (min(ok, key=lambda p: problem.omega[ly][p]) if ok
                         else min(opts, key=lambda p: _scalar_cost(problem, ly, p)))
            trials.append(t)
        feas = [t for t in trials if problem.feasible(t)]
        out = (min(feas, key=lambda t: problem.evaluate(t)["omega"]) if feas
               else min(trials, key=lambda t: sum(_scalar_cost(problem, ly, t[ly]) for ly in group)))
    return out
