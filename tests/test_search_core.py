"""Search: ILP == brute force, MCKP gap, ties, infeasibility minima, Pareto, torch-free."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from lcpaq.errors import ConfigError, InfeasibleBudgetError, SolverError
from lcpaq.policy import FP32
from lcpaq.search import (
    Budgets,
    build_problem,
    minimum_cost,
    pareto_frontier,
    search,
    solve_ilp,
    solve_mckp,
)
from lcpaq.search.problem import Problem
from lcpaq.testing.synthetic import random_problem, synthetic_latency

SMALL_CANDS = ((2, 8), (4, 4), (4, 8), (8, 8))


def brute_force(problem):
    best = None
    for combo in itertools.product(*(problem.candidates[ly] for ly in problem.layers)):
        bits = dict(zip(problem.layers, combo, strict=True))
        if problem.feasible(bits):
            o = problem.evaluate(bits)["omega"]
            if best is None or o < best[0] - 1e-12:
                best = (o, bits)
    return best


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("pairwise", [False, True, "random"], ids=["unary", "pairwise-abits", "pairwise-random"])
@pytest.mark.parametrize("ilp_solver", ["cbc", "highs"])
def test_ilp_equals_brute_force(seed, pairwise, ilp_solver):
    prob = random_problem(5, candidates=SMALL_CANDS, seed=seed, ties=1, pairwise=pairwise, budget_frac=0.4)
    if seed % 2:  # pins on odd seeds
        prob = Problem(prob.layers, prob.candidates, prob.omega, prob.costs, prob.budgets, prob.ties,
                       {"l4": (8, 8)}, prob.pairwise)
    bf = brute_force(prob)
    if bf is None:
        with pytest.raises(InfeasibleBudgetError):
            solve_ilp(prob, solver=ilp_solver)
        return
    res = solve_ilp(prob, solver=ilp_solver)
    assert res.status == "Optimal"
    assert res.objective == pytest.approx(bf[0], rel=1e-7, abs=1e-9)
    assert prob.feasible(res.policy)


@pytest.mark.parametrize("ilp_solver", ["cbc", "highs"])
def test_tiny_omega_scale_is_still_solved_exactly(ilp_solver):
    """Real Ω totals can be ~1e-5: solvers' absolute gaps must not stop them early."""
    base = random_problem(6, candidates=SMALL_CANDS, seed=4, ties=1, pairwise=True, budget_frac=0.4)
    om = {ly: {p: v * 1e-8 for p, v in row.items()} for ly, row in base.omega.items()}
    prob = Problem(base.layers, base.candidates, om, base.costs, base.budgets, base.ties, {}, base.pairwise)
    bf = brute_force(prob)
    assert bf is not None
    assert solve_ilp(prob, solver=ilp_solver).objective == pytest.approx(bf[0], rel=1e-7)


# Documented bounds on (mckp - ilp) / ilp over these 30-layer, 3-budget random instances
# (session 5, 8 seeds each: measured max 10 % without and 14 % with transition terms, where the
# exact DP subproblem replaced the linearisation; it was 13 % / 23 %; notes/search.md).
MCKP_GAP = {False: 0.15, True: 0.20}


@pytest.mark.parametrize("seed, pairwise", [(s, False) for s in range(8)] + [(s, True) for s in range(4)],
                         ids=lambda v: f"seed{v}" if isinstance(v, int) and not isinstance(v, bool) else
                         ("pairwise" if v else "unary"))
def test_mckp_within_documented_gap(seed, pairwise):
    prob = random_problem(30, seed=seed, ties=3, pairwise=pairwise, budget_frac=0.5)
    ilp, gr = solve_ilp(prob), solve_mckp(prob)
    assert prob.feasible(gr.policy)
    assert gr.objective >= ilp.objective * (1 - 1e-4) - 1e-9  # the ILP is optimal within MIP_GAP
    assert (gr.objective - ilp.objective) / ilp.objective <= MCKP_GAP[pairwise]


def test_mckp_single_budget_is_near_optimal():
    """One budget, no ties: the Lagrangian hull walk + fill is the classic MCKP greedy (gap < 3 %)."""
    prob = random_problem(60, seed=11, budget_frac=0.4, budgets=("max_size_mb",))
    ilp, gr = solve_ilp(prob), solve_mckp(prob)
    assert prob.feasible(gr.policy)
    assert (gr.objective - ilp.objective) / ilp.objective <= 0.03


@pytest.mark.parametrize("solver", ["ilp", "mckp"])
def test_ties_hold_in_every_policy(solver):
    prob = random_problem(12, seed=3, ties=4, budget_frac=0.3)
    res = search(prob, solver=solver)
    for g in prob.ties:
        assert len({res.policy[ly][1] for ly in g}) == 1, g


def test_pinned_layers_are_kept():
    prob = random_problem(6, candidates=SMALL_CANDS, seed=1, budget_frac=0.7)
    prob = type(prob)(prob.layers, prob.candidates, prob.omega, prob.costs, prob.budgets, (), {"l0": (8, 8)})
    assert solve_ilp(prob).policy["l0"] == (8, 8)


def test_infeasible_budget_reports_minima():
    prob = random_problem(6, candidates=SMALL_CANDS, seed=2, budgets=("max_size_mb", "max_gbops"))
    min_size = sum(min(t.values()) for t in prob.costs["size_mb"].values())
    tight = prob.with_budgets(Budgets(max_size_mb=min_size * 0.9, max_gbops=prob.budgets.max_gbops))
    with pytest.raises(InfeasibleBudgetError) as ei:
        solve_ilp(tight)
    msg = str(ei.value)
    assert f"minimum achievable {min_size:.4g} MB" in msg
    assert "max_size_mb" in msg and "below the minimum" in msg
    assert minimum_cost(tight, "size_mb") == pytest.approx(min_size)
    with pytest.raises(InfeasibleBudgetError):
        solve_mckp(tight)


def test_transitions_change_the_choice():
    """With a big fp32<->int transition cost the ILP avoids alternating precisions."""
    names = ["a", "b", "c", "d"]
    cands = ((8, 8), FP32)
    edges = tuple(zip(names, names[1:], strict=False))
    lat = synthetic_latency(names, cands, edges=edges, transition_ms=5.0)
    omega = {n: {(8, 8): 1.0 if i % 2 else 0.01, FP32: 0.0} for i, n in enumerate(names)}
    costs = {"latency_ms": {n: dict(lat.unary[n]) for n in names}}
    budget = lat.predict(__import__("lcpaq.policy", fromlist=["Policy"]).Policy.uniform(names, 8, 8)) + 0.2
    prob = Problem(tuple(names), {n: cands for n in names}, omega, costs, Budgets(max_latency_ms=budget),
                   pairwise=lat.pairwise, constants={"latency_ms": lat.constant_ms})
    res = solve_ilp(prob)
    assert res.costs["latency_ms"] <= budget + 1e-9
    assert res.costs["latency_ms"] == pytest.approx(lat.predict(res.policy))
    classes = [res.policy[n] == FP32 for n in names]
    assert classes in ([True] * 4, [False] * 4)  # any mix pays >= 5 ms


def test_pareto_is_non_dominated_and_knee_on_front(tmp_path):
    prob = random_problem(10, seed=4, budget_frac=0.6, budgets=("max_latency_ms",))
    fr = pareto_frontier(prob, "max_latency_ms", points=6)
    assert len(fr.points) >= 3
    for p in fr.points:
        for q in fr.points:
            assert not (q.objective < p.objective and q.costs["latency_ms"] < p.costs["latency_ms"])
    lat = [p.costs["latency_ms"] for p in fr.points]
    om = [p.objective for p in fr.points]
    assert lat == sorted(lat) and om == sorted(om, reverse=True)
    assert fr.knee() in fr.points
    fr.to_csv(tmp_path / "f.csv")
    fr.plot(tmp_path / "f.png", chosen=fr.knee())
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_build_problem_from_inventory_and_errors():
    from lcpaq.inventory import Inventory, LayerInfo

    inv = Inventory("m", (1, 3, 8, 8), (
        LayerInfo("c", "conv", (1, 3, 8, 8), (1, 4, 8, 8), 3, 4, (3, 3), weight_numel=108, params=108, macs=6912),
        LayerInfo("f", "linear", (1, 256), (1, 2), 256, 2, weight_numel=512, params=512, macs=512),
    ))
    omega = {n: {(4, 8): 1.0, (8, 8): 0.1} for n in ("c", "f")}
    prob = build_problem(inv, omega, candidates=[(4, 8), (8, 8)], budgets=Budgets(max_size_mb=1.0))
    assert search(prob).policy["c"] == (8, 8)
    with pytest.raises(ConfigError, match="latency"):
        build_problem(inv, omega, candidates=[(4, 8)], budgets=Budgets(max_latency_ms=1.0))
    with pytest.raises(ConfigError, match="Ω"):
        build_problem(inv, omega, candidates=[(2, 8)])
    with pytest.raises(ConfigError, match="positive"):
        Budgets(max_gbops=-1)


def test_search_core_is_torch_free():
    code = "import sys, lcpaq.search, lcpaq.costs, lcpaq.latency; " \
           "bad = [m for m in ('torch', 'onnxruntime', 'tvm') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def brute_min(problem, cost):
    vals = []
    for combo in itertools.product(*(problem.candidates[ly] for ly in problem.layers)):
        bits = dict(zip(problem.layers, combo, strict=True))
        free = problem.with_budgets(Budgets())
        if free.feasible(bits):  # ties and pins only
            vals.append(problem.evaluate(bits)[cost])
    return min(vals)


@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"seed{s}")
def test_infeasible_minima_equal_brute_force_with_ties_pins_transitions(seed):
    prob = random_problem(5, candidates=SMALL_CANDS, seed=seed, ties=2, pairwise="random")
    prob = Problem(prob.layers, prob.candidates, prob.omega, prob.costs, prob.budgets, prob.ties,
                   {"l0": (8, 8)}, prob.pairwise)
    mins = {c: brute_min(prob, c) for c in ("size_mb", "gbops", "latency_ms")}
    tight = prob.with_budgets(Budgets(max_size_mb=mins["size_mb"] * 1.5, max_gbops=mins["gbops"] * 0.99,
                                      max_latency_ms=mins["latency_ms"] * 0.5))
    with pytest.raises(InfeasibleBudgetError) as ei:
        search(tight)
    err = ei.value
    assert err.too_tight == ["max_gbops", "max_latency_ms"]
    for k, c in (("max_size_mb", "size_mb"), ("max_gbops", "gbops"), ("max_latency_ms", "latency_ms")):
        assert err.minima[k] == pytest.approx(mins[c], rel=1e-9)
    assert "unpin" in str(err) and "raise max_gbops, max_latency_ms" in str(err)


def test_budgets_reachable_alone_but_not_together():
    prob = random_problem(6, candidates=SMALL_CANDS, seed=5, budgets=("max_size_mb", "max_latency_ms"))
    lo_size, lo_lat = minimum_cost(prob, "size_mb"), minimum_cost(prob, "latency_ms")
    # size at its minimum forces w2a8 everywhere, latency (~max(w, a)) at its minimum forces w4a4
    tight = prob.with_budgets(Budgets(max_size_mb=lo_size * 1.0001, max_latency_ms=lo_lat * 1.0001))
    with pytest.raises(InfeasibleBudgetError, match="not together"):
        solve_ilp(tight)


@pytest.mark.parametrize("status", ["Not Solved", "Undefined"])
def test_non_optimal_status_is_never_a_solution(monkeypatch, status):
    import lcpaq.search.ilp as ilp

    prob = random_problem(6, candidates=SMALL_CANDS, seed=1)  # feasible: budgets above every minimum
    real = ilp._solve
    monkeypatch.setattr(ilp, "_solve", lambda *a, **k: (status, False, None, 0.01)
                        if a[1] == "omega" else real(*a, **k))
    with pytest.raises(SolverError, match=status):
        solve_ilp(prob, solver="cbc")  # explicit: auto would first let HiGHS solve it in-process


@pytest.mark.parametrize("ilp_solver", ["cbc", "highs"])
def test_time_limited_solve_is_not_read_as_optimal(ilp_solver):
    prob = random_problem(120, seed=3, ties=6, pairwise=True, budget_frac=0.5)
    try:
        res = solve_ilp(prob, solver=ilp_solver, time_limit_s=0.02)
    except SolverError as e:
        assert "not proven optimal" in str(e)
    else:  # solved within the limit: then it must be a proven optimum
        assert res.status == "Optimal" and prob.feasible(res.policy)


def test_pruning_keeps_the_optimum_and_drops_dominated():
    from lcpaq.search.ilp import prune_candidates

    prob = random_problem(8, seed=2, ties=2, budgets=("max_size_mb",))
    kept = prune_candidates(prob)
    # only size counts: for an untied layer, a candidate with the same w_bits and a lower a_bits has
    # equal size and higher Ω, so it is dominated
    assert all((4, 4) not in kept[ly] and (8, 6) not in kept[ly] for ly in ("l6", "l7"))
    tied = {ly for g in prob.ties for ly in g}
    assert all({p[1] for p in kept[ly]} == {4, 6, 8} for ly in tied)  # ties keep every a_bits


def test_lp_first_paths_are_exact_and_both_taken():
    """HiGHS path (lcpaq.search.mip): proof by the LP bound without branching, or the MIP after
    reduced-cost fixing; both must equal brute force, and both paths occur on these instances."""
    from lcpaq.search.ilp import MIP_GAP
    from lcpaq.search.mip import build_arrays, solve_lp_first

    paths = set()
    for seed in range(10):
        for budgets, frac in ((("max_size_mb",), 0.45), (("max_size_mb", "max_gbops", "max_latency_ms"), 0.45),
                              (("max_latency_ms",), 1.5)):  # a budget that does not bind: the LP is integral
            prob = random_problem(6, candidates=SMALL_CANDS, seed=seed, ties=1, pairwise=seed % 2 == 0,
                                  budget_frac=frac, budgets=budgets)
            bf = brute_force(prob)
            res = solve_lp_first(build_arrays(prob, "omega", prob.budgets), gap=MIP_GAP, time_limit_s=30)
            if bf is None:
                assert res.status == "Infeasible" and res.bits is None
                continue
            assert res.status == "Optimal"
            assert prob.evaluate(res.bits)["omega"] == pytest.approx(bf[0], rel=1e-7, abs=1e-12)
            assert prob.feasible(res.bits)
            assert res.bound <= res.objective + 1e-12
            paths.add(res.path)
    assert paths == {"lp-bound", "mip"}


def test_highs_and_cbc_agree_on_a_larger_transition_problem():
    from lcpaq.search.ilp import MIP_GAP

    prob = random_problem(40, seed=11, ties=2, pairwise="abits", budget_frac=0.5)
    a, b = solve_ilp(prob, solver="highs"), solve_ilp(prob, solver="cbc")
    assert prob.feasible(a.policy) and prob.feasible(b.policy)
    assert a.objective == pytest.approx(b.objective, rel=2 * MIP_GAP)


def test_auto_tries_highs_in_process_before_cbc():
    """Below AUTO_HIGHS_LAYERS the auto solver gives HiGHS (in this process) a short time first and
    calls CBC only when that does not prove optimality; both answers equal brute force / agree."""
    from lcpaq.search.ilp import MIP_GAP

    for seed in range(6):
        frac = 1.5 if seed % 2 else 0.45
        prob = random_problem(6, candidates=SMALL_CANDS, seed=seed, ties=1, budget_frac=frac,
                              budgets=("max_latency_ms",))
        bf = brute_force(prob)
        res = solve_ilp(prob)
        assert res.status == "Optimal" and prob.feasible(res.policy) and res.solver.startswith("ilp/highs-")
        assert res.objective == pytest.approx(bf[0], rel=1e-7, abs=1e-12)
    hard = random_problem(30, seed=7, ties=1, pairwise=True, budget_frac=0.5)  # HiGHS needs far more than the cap
    res = solve_ilp(hard)
    assert res.solver == "ilp/cbc"
    assert res.objective == pytest.approx(solve_ilp(hard, solver="highs").objective, rel=2 * MIP_GAP)


def test_mckp_lagrangian_subproblem_is_exact_on_a_chain():
    """With chain transitions and ties the Lagrangian subproblem is solved by DP: its value equals
    brute force over every tie-respecting assignment, for several multipliers."""
    import numpy as np

    from lcpaq.search.mckp import _Arrays

    prob = random_problem(6, candidates=SMALL_CANDS, seed=3, ties=2, pairwise="random", budget_frac=0.5)
    ar = _Arrays(prob)
    assert ar.tree is not None
    rows = np.arange(len(ar.layers))
    for lam in ([0.0, 0.0, 0.0], [0.01, 0.02, 0.5], [0.3, 0.0, 2.0]):
        lam = np.asarray(lam)
        score = ar.omega + np.tensordot(lam, ar.scaled, axes=1)
        w = lam[ar.lat] / ar.limits[ar.lat]

        def value(sel, score=score, w=w):
            trans = ar.totals(sel)[ar.lat] - ar.cost[ar.lat, rows, sel].sum() - ar.const[ar.lat]
            return score[rows, sel].sum() + w * trans

        best = min(value(np.asarray(c)) for c in itertools.product(*(range(len(c)) for c in ar.cands))
                   if all(len({ar.a_bits[i, c[i]] for i in g}) == 1 for g in ar.groups))
        sel = ar.lagrangian(lam)
        assert all(len({ar.a_bits[i, sel[i]] for i in g}) == 1 for g in ar.groups)
        assert value(sel) == pytest.approx(best, rel=1e-12, abs=1e-12)
