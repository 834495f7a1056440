"""The search ILP as arrays (numpy), solved with HiGHS directly (highspy), LP bound first.

The formulation is the one documented in :mod:`lcpaq.search.ilp` (one binary per (layer,
candidate), ties through one binary per (group, a_bits), transition costs on the transport polytope
over classes of identical rows/columns). Built here with numpy instead of PuLP, because at 1,000
layers PuLP's model build and hand-over took ~1.5 s of a ~7 s solve.

``solve_lp_first`` is the fast exact path:

1. Solve the LP relaxation: its value ``LB`` bounds every integer policy from below.
2. Primal heuristic: fix every layer the LP already assigns integrally and solve the small MIP over
   the fractional layers (a relaxation-induced neighbourhood); its value ``UB`` is a real policy.
3. If ``(UB - LB) / UB <= MIP_GAP`` the policy is proven optimal (the same criterion as the
   solvers' own) and returned without branching (``path="lp-bound"``).
4. Otherwise reduced-cost fixing (exact: a column at 0 in the LP whose reduced cost exceeds
   ``UB - LB`` cannot be 1 in any better policy) shrinks the model, and the MIP runs on it, started
   from the heuristic's policy (``path="mip"``). Only a proven-optimal status is read.

Large problems have tiny root gaps (0.01 % at 1,000 layers with transitions), and the MIP after
fixing closes at its root node; measured in benchmarks/bench_search.py, notes/search.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from lcpaq.errors import SolverError
from lcpaq.policy import BitPair
from lcpaq.search.problem import BUDGET_COSTS, Budgets, Problem

# The LP relaxation goes to HiGHS's interior point method (with crossover) above this many
# continuous transition columns: the transport blocks make simplex degenerate. Measured at 1,000
# layers with a_bits transitions (8,991 such columns): whole solve 2.8 s vs 3.5 s CPU; without
# transitions, or at 200 layers, simplex was faster.
IPM_MIN_TRANSPORT_COLS = 5000
# Time cap of the neighbourhood sub-MIP when solve_lp_first only probes (branch=False). Measured:
# 15-35 ms on 54-layer problems without or with a_bits transitions, 0.78 s with unstructured 12x12
# transition tables, where it did not prove optimality anyway.
PROBE_NEIGHBOURHOOD_S = 0.1


@dataclass
class MipArrays:
    """A MIP ``min c·v + offset`` s.t. ``row_lo <= A v <= row_hi``, ``col_lo <= v <= col_hi``."""

    cost: list[float] = field(default_factory=list)
    col_hi: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)
    offset: float = 0.0
    x: dict[tuple[str, BitPair], int] = field(default_factory=dict)
    cands: dict[str, tuple[BitPair, ...]] = field(default_factory=dict)
    layer_cols: dict[str, list[int]] = field(default_factory=dict)

    def var(self, *, integer: bool, hi: float = 1.0) -> int:
        self.cost.append(0.0)
        self.col_hi.append(hi)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms: list[tuple[int, float]], lo: float, hi: float) -> int:
        r = len(self.row_lo)
        for c, v in terms:
            self.rows.append(r)
            self.cols.append(c)
            self.vals.append(v)
        self.row_lo.append(lo)
        self.row_hi.append(hi)
        return r

    @property
    def n_cols(self) -> int:
        return len(self.cost)

    def lp(self, *, relax: bool = False, fixed: dict[int, float] | None = None):
        """The model as a ``highspy.HighsLp`` (columnwise), optionally relaxed / with columns fixed."""
        import highspy

        lp = highspy.HighsLp()
        n, m = self.n_cols, len(self.row_lo)
        lp.num_col_, lp.num_row_ = n, m
        lp.col_cost_ = np.asarray(self.cost, dtype=np.float64)
        lo = np.zeros(n)
        hi = np.asarray(self.col_hi, dtype=np.float64)
        if fixed:
            idx = np.fromiter(fixed.keys(), dtype=np.int64, count=len(fixed))
            val = np.fromiter(fixed.values(), dtype=np.float64, count=len(fixed))
            lo[idx] = val
            hi[idx] = val
        lp.col_lower_, lp.col_upper_ = lo, hi
        lp.row_lower_ = np.asarray(self.row_lo, dtype=np.float64)
        lp.row_upper_ = np.asarray(self.row_hi, dtype=np.float64)
        lp.offset_ = self.offset
        r = np.asarray(self.rows, dtype=np.int64)
        c = np.asarray(self.cols, dtype=np.int64)
        v = np.asarray(self.vals, dtype=np.float64)
        order = np.lexsort((r, c))
        counts = np.bincount(c, minlength=n)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, m
        lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        lp.a_matrix_.index_ = r[order].astype(np.int32)
        lp.a_matrix_.value_ = v[order]
        if not relax:
            lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                               for i in self.integer]
        return lp


def build_arrays(problem: Problem, objective: str, budgets: Budgets) -> MipArrays:
    """The same model as :func:`lcpaq.search.ilp._model`, as arrays (objective scaled to O(1))."""
    from lcpaq.search.ilp import _classes, _relevant, _table, prune_candidates

    cands = prune_candidates(problem, objective, budgets)
    m = MipArrays(cands=cands)
    for ly in problem.layers:
        cols = [m.var(integer=True) for _ in cands[ly]]
        m.layer_cols[ly] = cols
        for p, c in zip(cands[ly], cols, strict=True):
            m.x[ly, p] = c
        m.row([(c, 1.0) for c in cols], 1.0, 1.0)
    for group in problem.ties:
        a_vals = sorted({p[1] for ly in group for p in cands[ly]})
        z = {a: m.var(integer=True) for a in a_vals}
        m.row([(c, 1.0) for c in z.values()], 1.0, 1.0)
        for ly in group:
            for a in a_vals:
                m.row([(m.x[ly, p], 1.0) for p in cands[ly] if p[1] == a] + [(z[a], -1.0)], 0.0, 0.0)
    trans: list[tuple[int, float]] = []
    if "latency_ms" in _relevant(problem, objective, budgets) and problem.pairwise:
        for (pl, cl), table in problem.pairwise.items():
            cp, cc = cands[pl], cands[cl]
            full = [[float(table.get((i, j), 0.0)) for j in cc] for i in cp]
            if not any(any(r) for r in full):
                continue
            # Exact linearisation of sum_ij T[i,j] x_p,i x_c,j over *classes*: candidates whose
            # rows (columns) of T are identical are merged; y[R,C] lives on the transport polytope
            # with supplies sum_{i in R} x_p,i and demands sum_{j in C} x_c,j, which has the single
            # point y = outer(supply, demand) when both are 0/1 one-hot vectors.
            rows = _classes(range(len(cp)), full)
            colsets = _classes(range(len(cc)), [[full[r[0]][j] for r in rows] for j in range(len(cc))])
            y = {(a, b): m.var(integer=False, hi=np.inf) for a in range(len(rows)) for b in range(len(colsets))}
            for a, r in enumerate(rows):
                m.row([(y[a, b], 1.0) for b in range(len(colsets))] + [(m.x[pl, cp[i]], -1.0) for i in r], 0.0, 0.0)
            for b, cset in enumerate(colsets):
                m.row([(y[a, b], 1.0) for a in range(len(rows))] + [(m.x[cl, cc[j]], -1.0) for j in cset], 0.0, 0.0)
            trans += [(y[a, b], full[r[0]][cs[0]]) for a, r in enumerate(rows) for b, cs in enumerate(colsets)
                      if full[r[0]][cs[0]]]

    def terms(cost: str) -> list[tuple[int, float]]:
        tab = _table(problem, cost)
        t = [(m.x[ly, p], float(tab[ly][p])) for ly in problem.layers for p in cands[ly]]
        return t + trans if cost == "latency_ms" else t

    # Solvers stop at an *absolute* gap too (HiGHS: 1e-6) and treat tiny coefficients as noise; Ω
    # totals of 1e-5 are normal (Hessian trace x quantization noise). Scale the objective to O(1).
    tab = _table(problem, objective)
    mag = sum(max(abs(tab[ly][p]) for p in cands[ly]) for ly in problem.layers)
    scale = 1.0 / mag if mag > 0 else 1.0
    for c, v in terms(objective):
        m.cost[c] += v * scale
    m.offset = problem.constants.get(objective, 0.0) * scale
    for bname, lim in budgets.items():
        cost = BUDGET_COSTS[bname]
        m.row(terms(cost), -np.inf, lim - problem.constants.get(cost, 0.0))
    return m


def _highs(time_limit_s: float | None, *, gap: float):
    """A quiet HiGHS instance. ``highspy.Highs()`` prints HiGHS' banner on fd 1 (from C++, once per
    process) while constructing itself, before any option can be set: its Python wrapper installs
    callbacks in ``__init__``. The bare C++ class ``highspy._Highs`` (the wrapper's base, all that is
    used here) takes ``output_flag`` first and prints nothing; where a highspy lacks it, the banner
    goes to stderr instead, so stdout stays the caller's."""
    import highspy

    core = getattr(highspy, "_Highs", None)
    if core is not None:
        h = core()
    else:  # pragma: no cover - other highspy versions
        with _stdout_to_stderr():
            h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("mip_rel_gap", gap)
    h.setOptionValue("mip_abs_gap", 1e-9)
    if time_limit_s is not None:
        h.setOptionValue("time_limit", float(time_limit_s))
    return h


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File-descriptor-level writes to stdout (C++ prints) go to stderr while the block runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class MipResult:
    status: str  # "Optimal", "Infeasible", or the solver's word for anything else
    bits: dict[str, BitPair] | None
    objective: float | None  # scaled objective (what the solver saw)
    bound: float | None
    path: str  # "lp-bound" (proved by the LP), "mip" (branch and bound)
    nodes: int = 0
    stats: dict = field(default_factory=dict)  # seconds per phase, columns fixed, gaps


def _mip(m: MipArrays, *, limit: float | None, gap: float, fixed: dict[int, float], start: list[float] | None):
    """A HiGHS MIP over ``m`` with ``fixed`` columns, started from ``start``, run to the end."""
    import highspy

    h = _highs(limit, gap=gap)
    h.passModel(m.lp(fixed=fixed))
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = start
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    return h


def _bits(m: MipArrays, values) -> dict[str, BitPair]:
    out = {}
    for ly, cols in m.layer_cols.items():
        chosen = [p for p, c in zip(m.cands[ly], cols, strict=True) if values[c] > 0.5]
        if len(chosen) != 1:
            raise SolverError(f"solver returned no unique choice for '{ly}'")
        out[ly] = chosen[0]
    return out


def solve_lp_first(m: MipArrays, *, gap: float, time_limit_s: float | None, branch: bool = True) -> MipResult:
    """LP bound, relaxation-induced neighbourhood, then (only if needed) the full MIP from it.

    ``branch=False`` stops after the neighbourhood: status "Optimal" when the LP bound proved it,
    else "Not proven" (the caller then solves the MIP some other way)."""
    import highspy

    t_end = None if time_limit_s is None else time.monotonic() + time_limit_s
    left = (lambda: None) if t_end is None else (lambda: max(t_end - time.monotonic(), 0.01))
    stats: dict = {}
    t0 = time.perf_counter()
    h = _highs(left(), gap=gap)
    if m.integer.count(False) > IPM_MIN_TRANSPORT_COLS:
        h.setOptionValue("solver", "ipm")  # crossover (on by default) still gives a basic dual solution
    h.passModel(m.lp(relax=True))
    h.run()
    stats["lp_s"] = time.perf_counter() - t0
    st = h.getModelStatus()
    if st == highspy.HighsModelStatus.kInfeasible:
        return MipResult("Infeasible", None, None, None, "lp-bound")
    if st != highspy.HighsModelStatus.kOptimal:
        return MipResult(h.modelStatusToString(st), None, None, None, "lp-bound")
    lb = h.getInfo().objective_function_value
    xv = np.asarray(h.getSolution().col_value)

    rc = np.asarray(h.getSolution().col_dual)
    # Primal heuristic: a relaxation-induced neighbourhood. Layers the LP assigns integrally keep
    # that choice, a sub-MIP picks the fractional ones. (Growing it by the layers with the smallest
    # reduced cost of an alternative closed the 1,000-layer gap without branching but cost more
    # than fixing + MIP: notes/search.md.)
    fixed: dict[int, float] = {}
    for cols in m.layer_cols.values():
        vals = xv[cols]
        if np.all(np.minimum(vals, 1 - vals) < 1e-9):
            fixed.update({c: float(round(v)) for c, v in zip(cols, vals, strict=True)})
    limit = left()
    if not branch:  # a probe must stay cheap: its caller solves the MIP anyway if it fails
        limit = PROBE_NEIGHBOURHOOD_S if limit is None else min(limit, PROBE_NEIGHBOURHOOD_S)
    hs = _mip(m, limit=limit, gap=gap, fixed=fixed, start=None)
    start: list[float] | None = None
    ub = np.inf
    if hs.getModelStatus() == highspy.HighsModelStatus.kOptimal:
        start = list(hs.getSolution().col_value)
        ub = hs.getInfo().objective_function_value
        stats["root_gap"] = (ub - lb) / max(abs(ub), 1e-12)
    stats["neighbourhood_s"] = time.perf_counter() - t0 - stats["lp_s"]
    if start is not None and ub - lb <= gap * max(abs(ub), 1e-12) + 1e-9:
        return MipResult("Optimal", _bits(m, start), ub, lb, "lp-bound", 0, stats)
    if not branch:
        return MipResult("Not proven", None, None if start is None else ub, lb, "lp-bound", 0, stats)

    # reduced-cost fixing (exact): with LP duals, a column at 0 whose reduced cost exceeds UB - LB
    # cannot be 1 in any policy better than the incumbent
    drop: dict[int, float] = {}
    if np.isfinite(ub):
        slack = (ub - lb) + 1e-9
        for cols in m.layer_cols.values():
            for c in cols:
                if xv[c] < 1e-9 and rc[c] > slack:
                    drop[c] = 0.0
    stats["fixed_cols"] = len(drop)
    stats["x_cols"] = len(m.x)
    hm = _mip(m, limit=left(), gap=gap, fixed=drop, start=start)
    st = hm.getModelStatus()
    info = hm.getInfo()
    nodes = int(info.mip_node_count)
    stats["mip_s"] = time.perf_counter() - t0 - stats["lp_s"] - stats["neighbourhood_s"]
    if st == highspy.HighsModelStatus.kOptimal:
        final = list(hm.getSolution().col_value)
        return MipResult("Optimal", _bits(m, final), info.objective_function_value, info.mip_dual_bound, "mip", nodes, stats)
    if st == highspy.HighsModelStatus.kInfeasible:
        return MipResult("Infeasible", None, None, None, "mip", nodes, stats)
    return MipResult(hm.modelStatusToString(st), None, None, None, "mip", nodes, stats)
