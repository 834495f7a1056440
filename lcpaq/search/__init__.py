"""Torch-free mixed-precision search: one ILP over size, BOPs and measured latency; MCKP greedy;
Pareto frontier; infeasibility advice.

>>> # res = search(build_problem(inv, omega, candidates=[(4, 8), (8, 8)],
>>> #                            budgets=Budgets(max_latency_ms=2.0)))
"""

from __future__ import annotations

from lcpaq.errors import ConfigError
from lcpaq.search.ilp import (
    SOLVERS,
    default_solver,
    infeasibility_error,
    minimum_cost,
    minimum_policy,
    solve_ilp,
)
from lcpaq.search.mckp import solve_mckp
from lcpaq.search.pareto import Frontier, pareto_frontier
from lcpaq.search.problem import BUDGET_COSTS, Budgets, Problem, SearchResult, build_problem


def search(problem: Problem, *, solver: str = "ilp", ilp_solver: str | None = None,
           time_limit_s: float | None = 60.0) -> SearchResult:
    """Best policy under every budget of ``problem``.

    ``solver``: "ilp" (exact; backend ``ilp_solver`` = "cbc" | "highs" | None for auto), "cbc" or
    "highs" (the ILP with that backend), or "mckp" (greedy, fast, no optimality guarantee).
    Raises InfeasibleBudgetError (per-budget minima and advice) or SolverError (no proven optimum).

    >>> from lcpaq.testing.synthetic import random_problem
    >>> prob = random_problem(6, candidates=((4, 8), (8, 8)), ties=1)
    >>> res = search(prob)
    >>> res.status, prob.feasible(res.policy), res.costs["size_mb"] <= prob.budgets.max_size_mb
    ('Optimal', True, True)
    """
    if solver in SOLVERS:
        solver, ilp_solver = "ilp", solver
    if solver == "ilp":
        return solve_ilp(problem, solver=ilp_solver, time_limit_s=time_limit_s)
    if solver == "mckp":
        return solve_mckp(problem)
    raise ConfigError(f"unknown solver '{solver}'; use 'ilp', 'cbc', 'highs' or 'mckp'")


__all__ = [
    "BUDGET_COSTS", "SOLVERS", "Budgets", "Frontier", "Problem", "SearchResult", "build_problem",
    "default_solver", "infeasibility_error", "minimum_cost", "minimum_policy", "pareto_frontier", "search",
    "solve_ilp", "solve_mckp",
]
