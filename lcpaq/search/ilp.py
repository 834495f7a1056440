"""One ILP over every budget at once (PuLP; CBC bundled, HiGHS when highspy is installed).

Variables: x[l,k] in {0,1} per (layer, candidate); sum_k x[l,k] = 1. Pairwise transition costs on
an edge (p, c) are linearised exactly with continuous y[e,i,j] >= 0 and the transport
constraints sum_j y[e,i,j] = x[p,i], sum_i y[e,i,j] = x[c,j] (so y = x_p,i * x_c,j at any integer
point; tighter than McCormick). "Optimal" = proven within a 0.01 % relative MIP gap. Ties: for each activation-bit value, the tied layers' indicator
sums are equal. A non-optimal solver status is never read as a solution.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from lcpaq.errors import ConfigError, InfeasibleBudgetError, SolverError
from lcpaq.policy import BitPair, Policy
from lcpaq.search.problem import BUDGET_COSTS, COST_UNITS, Budgets, Problem, SearchResult

SOLVERS = ("cbc", "highs")
# "Optimal" means proven within this relative MIP gap (both solvers' convention; HiGHS's default).
MIP_GAP = 1e-4


def _solver(name: str, time_limit_s: float | None):
    import pulp

    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=MIP_GAP)
    if name == "highs":
        s = pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=MIP_GAP)
        if not s.available():
            raise SolverError("HiGHS is not available; `pip install highspy` or use --ilp-solver cbc")
        return s
    raise ConfigError(f"unknown ILP solver '{name}'; use one of {SOLVERS}")


def default_solver() -> str:
    try:
        import pulp

        return "highs" if pulp.HiGHS(msg=False).available() else "cbc"
    except Exception:  # noqa: BLE001
        return "cbc"


def _model(problem: Problem, objective: str, budgets: Budgets):
    """Build the PuLP model minimising ``objective`` ("omega" or a cost name)."""
    import pulp

    prob = pulp.LpProblem("lcpaq", pulp.LpMinimize)
    x: dict[tuple[str, BitPair], pulp.LpVariable] = {}
    for i, ly in enumerate(problem.layers):
        for k, p in enumerate(problem.candidates[ly]):
            x[ly, p] = prob.add_variable(f"x_{i}_{k}", cat="Binary")
        prob += pulp.lpSum(x[ly, p] for p in problem.candidates[ly]) == 1, f"one_{i}"
    for ly, p in problem.pinned.items():
        prob += x[ly, p] == 1
    for gi, group in enumerate(problem.ties):
        a_vals = sorted({p[1] for ly in group for p in problem.candidates[ly]})
        first = group[0]
        for ly in group[1:]:
            for a in a_vals:
                prob += (
                    pulp.lpSum(x[first, p] for p in problem.candidates[first] if p[1] == a)
                    == pulp.lpSum(x[ly, p] for p in problem.candidates[ly] if p[1] == a)
                ), f"tie_{gi}_{ly}_{a}"
    # transition variables, only where a non-zero pairwise cost exists and latency matters
    trans = None
    need_lat = objective == "latency_ms" or any(BUDGET_COSTS[k] == "latency_ms" for k, _ in budgets.items())
    if need_lat and problem.pairwise:
        terms = []
        for ei, ((pl, cl), table) in enumerate(problem.pairwise.items()):
            if not any(table.values()):
                continue
            cp, cc = problem.candidates[pl], problem.candidates[cl]
            y = {(i, j): prob.add_variable(f"y_{ei}_{a}_{b}", lowBound=0)
                 for a, i in enumerate(cp) for b, j in enumerate(cc)}
            for i in cp:
                prob += pulp.lpSum(y[i, j] for j in cc) == x[pl, i]
            for j in cc:
                prob += pulp.lpSum(y[i, j] for i in cp) == x[cl, j]
            terms += [table[i, j] * y[i, j] for (i, j) in y if table.get((i, j), 0.0)]
        trans = pulp.lpSum(terms)

    def expr(cost: str):
        if cost == "omega":
            tab: Mapping = problem.omega
        else:
            tab = problem.costs[cost]
        e = pulp.lpSum(tab[ly][p] * x[ly, p] for ly in problem.layers for p in problem.candidates[ly])
        if cost == "latency_ms" and trans is not None:
            e = e + trans
        return e + problem.constants.get(cost, 0.0)

    prob += expr(objective)
    for k, lim in budgets.items():
        prob += expr(BUDGET_COSTS[k]) <= lim, k
    return prob, x


def _solve(problem: Problem, objective: str, budgets: Budgets, solver: str, time_limit_s: float | None):
    import pulp

    prob, x = _model(problem, objective, budgets)
    t0 = time.perf_counter()
    prob.solve(_solver(solver, time_limit_s))
    dt = time.perf_counter() - t0
    status = pulp.LpStatus[prob.status]
    sol = getattr(prob, "sol_status", None)
    optimal = prob.status == pulp.LpStatusOptimal and sol in (None, pulp.LpSolutionOptimal)
    bits = None
    if optimal:
        bits = {}
        for ly in problem.layers:
            chosen = [p for p in problem.candidates[ly] if (x[ly, p].value() or 0) > 0.5]
            if len(chosen) != 1:
                raise SolverError(f"solver returned no unique choice for '{ly}' (status {status})")
            bits[ly] = chosen[0]
    return status, optimal, bits, dt


def minimum_cost(problem: Problem, cost: str, *, solver: str = "cbc") -> float:
    """Smallest achievable value of one cost under ties/pins only (no budgets)."""
    status, ok, bits, _ = _solve(problem, cost, Budgets(), solver, None)
    if not ok or bits is None:
        raise SolverError(f"could not minimise {cost}: solver status {status}")
    return problem.evaluate(bits)[cost]


def infeasibility_error(problem: Problem, *, solver: str = "cbc") -> InfeasibleBudgetError:
    """Explain why no policy meets every budget: per budget, the minimum achievable value."""
    lines, too_tight = [], []
    for k, lim in problem.budgets.items():
        cost = BUDGET_COSTS[k]
        m = minimum_cost(problem, cost, solver=solver)
        unit = COST_UNITS[cost]
        flag = "  <- below the minimum" if lim < m * (1 - 1e-9) else ""
        if flag:
            too_tight.append(k)
        lines.append(f"  {k}: budget {lim:.4g} {unit}, minimum achievable {m:.4g} {unit}{flag}")
    allp = {p for ly in problem.layers for p in problem.candidates[ly]}
    if too_tight:
        advice = (f"raise {', '.join(too_tight)} to at least the minimum, or add lower-bit candidates "
                  f"(lowest now: w{min(p[0] for p in allp)}, a{min(p[1] for p in allp)})")
    else:
        advice = "each budget is reachable alone but not together: relax one of them"
    return InfeasibleBudgetError("no policy meets every budget:\n" + "\n".join(lines) + "\n" + advice)


def solve_ilp(problem: Problem, *, solver: str | None = None, time_limit_s: float | None = 60.0) -> SearchResult:
    """Minimise total Ω under every budget; raise InfeasibleBudgetError with advice if none fits."""
    solver = solver or default_solver()
    status, ok, bits, dt = _solve(problem, "omega", problem.budgets, solver, time_limit_s)
    if not ok:
        if status == "Infeasible":
            raise infeasibility_error(problem, solver=solver)
        raise SolverError(
            f"ILP solver '{solver}' ended with status '{status}' (not proven optimal) after {dt:.1f}s; "
            "raise --time-limit or try --solver mckp"
        )
    assert bits is not None
    ev = problem.evaluate(bits)
    return SearchResult(
        policy=Policy(bits, meta={"solver": f"ilp/{solver}", "objective": ev["omega"]}),
        status=status, objective=ev["omega"], costs={k: v for k, v in ev.items() if k != "omega"},
        budgets=dict(problem.budgets.items()), solve_time_s=dt, solver=f"ilp/{solver}",
    )
