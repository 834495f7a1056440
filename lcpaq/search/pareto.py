"""Pareto frontier: sweep a budget, keep the non-dominated (Ω, cost) policies, pick the knee."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from lcpaq.errors import InfeasibleBudgetError, SolverError
from lcpaq.policy import format_bits
from lcpaq.search.problem import BUDGET_COSTS, COST_UNITS, Problem, SearchResult


@dataclass(frozen=True)
class Frontier:
    sweep: str  # the budget swept, e.g. "max_latency_ms"
    points: tuple[SearchResult, ...]  # non-dominated, sorted by swept cost

    @property
    def cost_name(self) -> str:
        return BUDGET_COSTS[self.sweep]

    def knee(self) -> SearchResult:
        """The point farthest below the chord between the frontier's ends (normalised axes)."""
        pts = self.points
        if len(pts) <= 2:
            return pts[0]
        c = [p.costs[self.cost_name] for p in pts]
        o = [p.objective for p in pts]
        cr, orng = (max(c) - min(c)) or 1.0, (max(o) - min(o)) or 1.0
        xs = [(v - min(c)) / cr for v in c]
        ys = [(v - min(o)) / orng for v in o]
        (x0, y0), (x1, y1) = (xs[0], ys[0]), (xs[-1], ys[-1])

        def dist(i: int) -> float:  # signed distance below the chord
            return ((y1 - y0) * xs[i] - (x1 - x0) * ys[i] + x1 * y0 - y1 * x0)

        return pts[max(range(len(pts)), key=dist)]

    def best_within(self, problem: Problem) -> SearchResult:
        """Lowest-Ω frontier point meeting every budget of ``problem``."""
        ok = [p for p in self.points if problem.feasible(p.policy)]
        if not ok:
            raise InfeasibleBudgetError("no frontier point meets every budget; widen the sweep")
        return min(ok, key=lambda p: p.objective)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for p in self.points for k in p.costs})
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["omega", *keys, "policy"])
            for p in self.points:
                w.writerow([p.objective, *[p.costs[k] for k in keys], p.policy.summary()])
        return path

    def plot(self, path: str | Path, *, chosen: SearchResult | None = None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        c = [p.costs[self.cost_name] for p in self.points]
        o = [p.objective for p in self.points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(c, o, "o-", label="Pareto frontier (ILP)")
        k = self.knee()
        ax.plot([k.costs[self.cost_name]], [k.objective], "s", ms=10, mfc="none", label="knee")
        if chosen is not None:
            ax.plot([chosen.costs[self.cost_name]], [chosen.objective], "r*", ms=14, label="chosen")
            if self.sweep in chosen.budgets:
                ax.axvline(chosen.budgets[self.sweep], color="r", ls="--", lw=1, label="budget")
        ax.set_xlabel(f"{self.cost_name} [{COST_UNITS[self.cost_name]}]")
        ax.set_ylabel("total sensitivity Ω")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def pareto_frontier(problem: Problem, sweep: str, *, points: int = 12, solver: str | None = None,
                    lo: float | None = None, hi: float | None = None) -> Frontier:
    """Solve the ILP at ``points`` values of budget ``sweep`` between its min and max achievable
    (other budgets kept) and return the non-dominated policies."""
    from lcpaq.search.ilp import minimum_cost, solve_ilp

    cost = BUDGET_COSTS[sweep]
    free = problem.with_budgets(replace(problem.budgets, **{sweep: None}))
    lo = minimum_cost(free, cost) if lo is None else lo
    if hi is None:  # the cost of the unconstrained-Ω optimum = where the frontier flattens
        hi = solve_ilp(free, solver=solver).costs[cost]
    results: list[SearchResult] = []
    for i in range(points):
        lim = lo + (hi - lo) * i / max(points - 1, 1)
        try:
            results.append(solve_ilp(free.with_budgets(replace(free.budgets, **{sweep: lim * (1 + 1e-9)})),
                                     solver=solver))
        except (InfeasibleBudgetError, SolverError):
            continue
    nd = [r for r in results if not any(
        (s.objective <= r.objective and s.costs[cost] <= r.costs[cost])
        and (s.objective < r.objective or s.costs[cost] < r.costs[cost]) for s in results)]
    uniq: dict[tuple, SearchResult] = {}
    for r in nd:
        uniq.setdefault(tuple(sorted((k, format_bits(v)) for k, v in r.policy.items())), r)
    return Frontier(sweep, tuple(sorted(uniq.values(), key=lambda r: r.costs[cost])))
