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

from lcpaq.errors import InfeasibleBudgetError
from lcpaq.policy import BitPair, Policy
from lcpaq.search.problem import BUDGET_COSTS, Problem, SearchResult


def _scalar_cost(problem: Problem, ly: str, p: BitPair) -> float:
    items = problem.budgets.items()
    if not items:
        return problem.costs["gbops"][ly][p]
    return sum(problem.costs[BUDGET_COSTS[k]][ly][p] / lim for k, lim in items)


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


def solve_mckp(problem: Problem) -> SearchResult:
    """Greedy MCKP under every budget; InfeasibleBudgetError if even the cheapest start fails."""
    t0 = time.perf_counter()
    hulls: dict[str, list[tuple[float, float, BitPair]]] = {}
    for ly in problem.layers:
        cands = [problem.pinned[ly]] if ly in problem.pinned else list(problem.candidates[ly])
        hulls[ly] = _hull([(_scalar_cost(problem, ly, p), problem.omega[ly][p], p) for p in cands])
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
    dt = time.perf_counter() - t0
    ev = problem.evaluate(bits)
    return SearchResult(
        policy=Policy(bits, meta={"solver": "mckp", "objective": ev["omega"]}), status="Heuristic",
        objective=ev["omega"], costs={k: v for k, v in ev.items() if k != "omega"},
        budgets=dict(problem.budgets.items()), solve_time_s=dt, solver="mckp",
    )


def _repair_ties(problem: Problem, bits: dict[str, BitPair]) -> dict[str, BitPair]:
    out = dict(bits)
    for group in problem.ties:
        a = min(out[ly][1] for ly in group)
        for ly in group:
            if out[ly][1] == a:
                continue
            cur = _scalar_cost(problem, ly, out[ly])
            opts = [p for p in problem.candidates[ly] if p[1] == a]
            cheap = [p for p in opts if _scalar_cost(problem, ly, p) <= cur + 1e-12] or opts
            if cheap:
                out[ly] = min(cheap, key=lambda p: problem.omega[ly][p])
    return out
