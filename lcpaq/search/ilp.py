"""One ILP over every budget at once (PuLP; CBC bundled, HiGHS when highspy is installed).

Variables: x[l,k] in {0,1} per (layer, candidate); sum_k x[l,k] = 1. Pairwise transition costs on
an edge (p, c) are linearised exactly with continuous y[e,i,j] >= 0 and the transport
constraints sum_j y[e,i,j] = x[p,i], sum_i y[e,i,j] = x[c,j] (so y = x_p,i * x_c,j at any integer
point; tighter than McCormick). "Optimal" = proven within a 0.01 % relative MIP gap. Ties: for each activation-bit value, the tied layers' indicator
sums are equal. A non-optimal solver status is never read as a solution.

Backends: CBC through PuLP (``_model``); HiGHS through highspy directly, the same model built with
numpy and solved LP bound first (:mod:`lcpaq.search.mip`).
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
AUTO_HIGHS_LAYERS = 100  # HiGHS (lcpaq.search.mip, LP bound first) from this many layers up
AUTO_HIGHS_LAYERS_TRANSITIONS = 40  # ... or from this many when latency transitions are budgeted
AUTO_HIGHS_FIRST_S = 0.03  # below those sizes: HiGHS in-process first, for at most this long, then CBC


def _solver(name: str, time_limit_s: float | None):
    import pulp

    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=MIP_GAP, gapAbs=1e-9)
    raise ConfigError(f"unknown ILP solver '{name}'; use one of {SOLVERS}")


def default_solver(n_layers: int | None = None, *, transitions: bool = False) -> str:
    """CBC below ``AUTO_HIGHS_LAYERS`` layers (``AUTO_HIGHS_LAYERS_TRANSITIONS`` when latency
    transition terms are budgeted), HiGHS (if highspy is installed) from there up.

    Measured (benchmarks/bench_search.py, notes/search.md, session 5, load ~1-2): without
    transitions CBC and HiGHS tie at 54 and 200 layers (0.14 s, 1.1 s) and HiGHS is 1.9x faster at
    1,000; with a_bits transitions CBC wins at 21 layers (0.11 vs 0.49 s), HiGHS at 54 (0.46 vs
    0.60 s, seeds vary), 200 (3.1 vs 5.5 s) and 1,000 layers (2.8 s; CBC hits its limit), and with
    unstructured transition tables at 21 and 54 layers. When the rule picks CBC, ``solve_ilp``
    first gives HiGHS ``AUTO_HIGHS_FIRST_S`` in this process (1-10 ms on small one-budget
    problems where CBC takes 7-24 ms; the traced ResNets are proven optimal at the LP bound).
    """
    limit = AUTO_HIGHS_LAYERS_TRANSITIONS if transitions else AUTO_HIGHS_LAYERS
    if n_layers is not None and n_layers < limit:
        return "cbc"
    return "highs" if _have_highs() else "cbc"


def _have_highs() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def _relevant(problem: Problem, objective: str, budgets: Budgets) -> list[str]:
    """Cost names that matter for this solve: the objective and every budgeted cost."""
    return [objective] + [BUDGET_COSTS[k] for k, _ in budgets.items() if BUDGET_COSTS[k] != objective]


def _table(problem: Problem, name: str) -> Mapping[str, Mapping[BitPair, float]]:
    return problem.omega if name == "omega" else problem.costs[name]


def prune_candidates(problem: Problem, objective: str = "omega",
                     budgets: Budgets | None = None) -> dict[str, tuple[BitPair, ...]]:
    """Per layer, the candidates not dominated for this solve (exact: the optimum is unchanged).

    ``q`` is dropped when another candidate ``p`` of the layer is no worse in the objective and in
    every budgeted cost, shares its a_bits if the layer is tied, and (when latency counts) costs
    no more on every transition into or out of the layer. Pinned layers keep only their pin.
    """
    budgets = problem.budgets if budgets is None else budgets
    crit = _relevant(problem, objective, budgets)
    tables = [_table(problem, c) for c in crit]
    tied = {ly for g in problem.ties for ly in g}
    use_pw = "latency_ms" in crit and bool(problem.pairwise)
    incident: dict[str, list[tuple[tuple[str, str], bool]]] = {}
    if use_pw:
        for e in problem.pairwise:
            incident.setdefault(e[0], []).append((e, True))
            incident.setdefault(e[1], []).append((e, False))
    out: dict[str, tuple[BitPair, ...]] = {}
    for ly in problem.layers:
        if ly in problem.pinned:
            out[ly] = (problem.pinned[ly],)
            continue
        cands = list(problem.candidates[ly])
        vec = {p: [t[ly][p] for t in tables] for p in cands}
        for e, is_prod in incident.get(ly, ()):
            tab = problem.pairwise[e]
            other = problem.candidates[e[1] if is_prod else e[0]]
            for p in cands:
                vec[p] += [tab.get((p, o) if is_prod else (o, p), 0.0) for o in other]

        out[ly] = tuple(q for qi, q in enumerate(cands) if not any(
            _dominates(vec[p], vec[q], pi < qi) for pi, p in enumerate(cands)
            if p != q and not (ly in tied and p[1] != q[1])))
    return out


def _dominates(vp: list[float], vq: list[float], first: bool) -> bool:
    """vp <= vq everywhere, and strictly somewhere (equal vectors: only the first listed wins)."""
    if any(a > b for a, b in zip(vp, vq, strict=True)):
        return False
    return vp != vq or first


def _classes(keys, vectors) -> list[list]:
    """Group keys whose vectors are identical (order of first appearance)."""
    groups: dict[tuple, list] = {}
    for k, v in zip(keys, vectors, strict=True):
        groups.setdefault(tuple(v), []).append(k)
    return list(groups.values())


def _model(problem: Problem, objective: str, budgets: Budgets):
    """The PuLP model minimising ``objective`` ("omega" or a cost name): the one formulation of
    :func:`lcpaq.search.mip.build_arrays` (pruned candidates, ties, class-compressed transport
    blocks for transitions, objective scaled to O(1)), handed to PuLP row by row."""
    import math

    import pulp

    from lcpaq.search.mip import build_arrays

    m = build_arrays(problem, objective, budgets)
    prob = pulp.LpProblem("lcpaq", pulp.LpMinimize)
    v = [prob.add_variable(f"v{i}", cat="Binary") if m.integer[i] else
         prob.add_variable(f"v{i}", lowBound=0, upBound=None if math.isinf(m.col_hi[i]) else m.col_hi[i])
         for i in range(m.n_cols)]
    rows: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in m.row_lo]
    for r, c, val in zip(m.rows, m.cols, m.vals, strict=True):
        rows[r].append((v[c], val))
    for i, (terms, lo, hi) in enumerate(zip(rows, m.row_lo, m.row_hi, strict=True)):
        e = pulp.LpAffineExpression(terms)
        if lo == hi:
            prob += e == lo, f"r{i}"
        elif math.isinf(lo):
            prob += e <= hi, f"r{i}"
        else:
            prob += e >= lo, f"r{i}"
    prob += pulp.LpAffineExpression([(v[i], c) for i, c in enumerate(m.cost) if c]) + m.offset
    x = {key: v[col] for key, col in m.x.items()}
    return prob, x, m.cands


def _solve(problem: Problem, objective: str, budgets: Budgets, solver: str, time_limit_s: float | None):
    if solver == "highs":
        return _solve_highs(problem, objective, budgets, time_limit_s)
    import pulp

    prob, x, cands = _model(problem, objective, budgets)
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
            chosen = [p for p in cands[ly] if (x[ly, p].value() or 0) > 0.5]
            if len(chosen) != 1:
                raise SolverError(f"solver returned no unique choice for '{ly}' (status {status})")
            bits[ly] = chosen[0]
    return status, optimal, bits, dt


def _run_highs(problem: Problem, objective: str, budgets: Budgets, time_limit_s: float | None):
    from lcpaq.search.mip import build_arrays, solve_lp_first

    return solve_lp_first(build_arrays(problem, objective, budgets), gap=MIP_GAP, time_limit_s=time_limit_s)


def _solve_highs(problem: Problem, objective: str, budgets: Budgets, time_limit_s: float | None):
    """HiGHS through highspy directly: numpy-built model, LP bound first (lcpaq.search.mip)."""
    if not _have_highs():
        raise SolverError("HiGHS is not available; `pip install highspy` or use --ilp-solver cbc")
    t0 = time.perf_counter()
    res = _run_highs(problem, objective, budgets, time_limit_s)
    return res.status, res.status == "Optimal" and res.bits is not None, res.bits, time.perf_counter() - t0


def _highs_first(problem: Problem, time_limit_s: float | None) -> SearchResult | None:
    """HiGHS's LP-first path (lcpaq.search.mip) in this process, capped at ``AUTO_HIGHS_FIRST_S``:
    the result when it proves optimality within MIP_GAP in that time, else None (also when
    highspy is missing). Small and structured problems finish in 1-70 ms this way, without
    CBC's process start and file exchange (~7-10 ms); hard ones cost the cap and go to CBC."""
    if not _have_highs():
        return None
    t0 = time.perf_counter()
    cap = AUTO_HIGHS_FIRST_S if time_limit_s is None else min(time_limit_s, AUTO_HIGHS_FIRST_S)
    res = _run_highs(problem, "omega", problem.budgets, cap)
    if res.status != "Optimal" or res.bits is None:
        return None
    return SearchResult.of(problem, res.bits, "Optimal", time.perf_counter() - t0, f"ilp/highs-{res.path}")


def _unbudgeted_solver() -> str:
    """Minimising one cost with no budget row is easy (the LP is integral on chains and trees):
    HiGHS in-process proves it at the LP bound in milliseconds; CBC when highspy is missing."""
    return "highs" if _have_highs() else "cbc"


def minimum_policy(problem: Problem, cost: str, *, solver: str | None = None) -> tuple[float, dict[str, BitPair]]:
    """The smallest achievable value of one cost (ties and pins respected, no budgets), exactly
    (an ILP minimising that cost, transitions included), and a policy that achieves it."""
    status, ok, bits, _ = _solve(problem, cost, Budgets(), solver or _unbudgeted_solver(), None)
    if not ok or bits is None:
        raise SolverError(f"could not minimise {cost}: solver status {status}")
    return problem.evaluate(bits)[cost], bits


def minimum_cost(problem: Problem, cost: str, *, solver: str | None = None) -> float:
    """Smallest achievable value of one cost under ties/pins only (no budgets).

    >>> # minimum_cost(problem, "latency_ms")  # e.g. 2.61
    """
    return minimum_policy(problem, cost, solver=solver)[0]


_ADD = {"size_mb": "lower weight bits (e.g. w2a8)", "gbops": "lower weight/activation bits (e.g. w2a4)",
        "latency_ms": "pairs with a faster kernel on this device (e.g. int8 instead of fp32/int4-dequant)"}


def infeasibility_error(problem: Problem, *, solver: str | None = None) -> InfeasibleBudgetError:
    """Explain why no policy meets every budget: per budget, the exact minimum achievable value
    (and the policy reaching it), which budget(s) to relax and which candidates to add.

    The returned error carries ``.minima`` ({budget: minimum}) and ``.too_tight`` (budgets below
    their minimum) for programs.
    """
    lines, too_tight, minima = [], [], {}
    for k, lim in problem.budgets.items():
        cost = BUDGET_COSTS[k]
        m, bits = minimum_policy(problem, cost, solver=solver)
        minima[k] = m
        unit = COST_UNITS[cost]
        flag = "  <- below the minimum" if lim < m * (1 - 1e-9) else ""
        if flag:
            too_tight.append(k)
        lines.append(f"  {k}: budget {lim:.4g} {unit}, minimum achievable {m:.4g} {unit} "
                     f"({Policy(bits).summary()}){flag}")
    if too_tight:
        adds = "; ".join(f"{k}: {_ADD[BUDGET_COSTS[k]]}" for k in too_tight)
        advice = f"raise {', '.join(too_tight)} to at least the minimum, or add candidates with {adds}"
        if problem.pinned:
            advice += f"; or unpin some of {', '.join(sorted(problem.pinned))}"
    else:
        advice = ("each budget is reachable alone but not together: relax one of "
                  f"{', '.join(k for k, _ in problem.budgets.items())}")
    err = InfeasibleBudgetError("no policy meets every budget:\n" + "\n".join(lines) + "\n" + advice)
    err.minima = minima  # type: ignore[attr-defined]
    err.too_tight = too_tight  # type: ignore[attr-defined]
    return err


def solve_ilp(problem: Problem, *, solver: str | None = None, time_limit_s: float | None = 60.0) -> SearchResult:
    """Minimise total Ω under every budget; raise InfeasibleBudgetError with advice if none fits.

    A status other than proven optimal (within ``MIP_GAP``) raises SolverError: a time-limited
    incumbent is never returned as a solution.

    >>> # res = solve_ilp(problem, solver="cbc", time_limit_s=10); res.policy, res.costs
    """
    trans = "max_latency_ms" in dict(problem.budgets.items()) and any(
        any(t.values()) for t in problem.pairwise.values())
    auto = solver is None
    solver = solver or default_solver(len(problem.layers), transitions=trans)
    if auto and solver == "cbc":
        first = _highs_first(problem, time_limit_s)
        if first is not None:
            return first
    status, ok, bits, dt = _solve(problem, "omega", problem.budgets, solver, time_limit_s)
    if not ok:
        if status in ("Infeasible", "Undefined"):  # CBC may say Undefined for an infeasible MIP
            err = infeasibility_error(problem, solver=solver)
            # CBC stopped by its time limit before any feasible point can also say "Infeasible":
            # only a budget below its exact minimum, or an infeasibility proven in time, is one
            timed_out = time_limit_s is not None and dt >= 0.8 * time_limit_s
            if err.too_tight or (status == "Infeasible" and not timed_out):  # type: ignore[attr-defined]
                raise err
        raise SolverError(
            f"ILP solver '{solver}' ended with status '{status}' (not proven optimal) after {dt:.1f}s; "
            "raise --time-limit or try --solver mckp"
        )
    assert bits is not None
    return SearchResult.of(problem, bits, status, dt, f"ilp/{solver}")
