"""MCKP greedy (CO-MPQ): the multiple-choice knapsack solved by Ω-decrease per unit cost.

Scalarisation of several budgets (documented in notes/search.md): each budgeted cost is
normalised by its budget, ``ĉ_b(l, k) = cost_b(l, k) / B_b``, and combined with multipliers
``λ_b >= 0`` into the Lagrangian ``Ω(l, k) + s * Σ_b μ_b ĉ_b(l, k)``.

1. *Lagrangian pass*: for a multiplier vector, every untied layer takes its argmin; a tie group
   takes, for each shared a_bits value, every member's argmin at that value and keeps the best
   value (so ties hold by construction and this step is the exact Lagrangian subproblem).
   For each direction ``μ`` the scale ``s`` is bisected to the smallest value whose policy meets
   every budget (true costs, transitions included). The direction starts at μ = 1 and is adapted
   over a few rounds (μ_b *= utilisation_b², so slack budgets lose weight, binding ones keep it).
   With transition costs, extra passes restricted to one shared a_bits value seed the fill
   (policies without activation-precision changes pay no a_bits transitions).
   Per layer only the lower convex hull of (ĉ, Ω) is ever chosen: this is CO-MPQ's greedy on the
   hull, walked by the multiplier instead of one step at a time.
2. *Fill*: from the best feasible pass, repeatedly apply the single move (one layer, or one tie
   group changing its shared a_bits) with the largest Ω-decrease per unit of scalarised cost that
   still meets every budget; moves that lower Ω *and* cost come first.

Pairwise transition costs couple layers. When the transition edges plus the ties (a tied pair must
share a_bits) form a forest (chains, as in plain CNNs), the Lagrangian subproblem with transitions
is solved exactly by dynamic programming over that forest; below ``LINEARISED_TOO`` layers the
linearised passes (each layer pays the transitions its neighbours' last choices imply) run as well
and the better policy is kept. With cycles (skip connections) only the linearisation is used.
Transitions are counted exactly in every feasibility check, so a returned policy always meets its
budgets. Being a heuristic it can miss
the optimum: ``benchmarks/bench_search.py`` and the tests measure its gap against the ILP.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from lcpaq.errors import SolverError
from lcpaq.policy import BitPair
from lcpaq.search.problem import BUDGET_COSTS, Problem, SearchResult

_INF = float("inf")
LINEARISED_TOO = 200


class _Arrays:
    """Dense per-(layer, candidate) arrays for fast evaluation (padded with +inf)."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.layers = problem.layers
        self.idx = {ly: i for i, ly in enumerate(self.layers)}
        self.cands = [
            (problem.pinned[ly],) if ly in problem.pinned else tuple(problem.candidates[ly])
            for ly in self.layers
        ]
        n, k = len(self.layers), max(len(c) for c in self.cands)
        self.budgets = problem.budgets.items()
        self.names = [BUDGET_COSTS[b] for b, _ in self.budgets]
        self.limits = np.array([lim for _, lim in self.budgets], dtype=float)
        self.omega = np.full((n, k), _INF)
        self.cost = np.full((len(self.names), n, k), _INF)
        self.a_bits = np.full((n, k), -1)
        for i, (ly, cs) in enumerate(zip(self.layers, self.cands, strict=True)):
            for j, c in enumerate(cs):
                self.omega[i, j] = problem.omega[ly][c]
                self.a_bits[i, j] = c[1]
                for b, name in enumerate(self.names):
                    self.cost[b, i, j] = problem.costs[name][ly][c]
        self.const = np.array([problem.constants.get(nm, 0.0) for nm in self.names])
        self.scaled = self.cost / self.limits[:, None, None] if self.names else np.zeros((0, n, k))
        tied = [tuple(self.idx[ly] for ly in g) for g in problem.ties]
        self.groups = tied
        self.tied = {i for g in tied for i in g}
        self.lat = self.names.index("latency_ms") if "latency_ms" in self.names else -1
        self.edges: dict[int, list[tuple[int, int, Mapping, bool]]] = {}
        if self.lat >= 0:
            for (pl, cl), tab in problem.pairwise.items():
                if any(tab.values()):
                    a, b = self.idx[pl], self.idx[cl]
                    self.edges.setdefault(a, []).append((a, b, tab, True))
                    self.edges.setdefault(b, []).append((a, b, tab, False))
        self.edge_list = [(a, b, t) for a, lst in self.edges.items() for (x, b, t, prod) in lst if prod]
        self.eff = self.scaled  # scaled costs the Lagrangian sees (transitions linearised in)
        self.restrict: int | None = None  # only this a_bits (where a layer has it): uniform seeds
        # transition ms per edge as dense [E, k, k] (producer choice, consumer choice): totals()
        # reads them with one fancy index instead of a dict lookup per edge; the forest DP too
        e = len(self.edge_list)
        self.edge_a = np.array([a for a, _, _ in self.edge_list], dtype=np.int64)
        self.edge_b = np.array([b for _, b, _ in self.edge_list], dtype=np.int64)
        self.edge_t = np.zeros((e, k, k))
        for i, (a, b, tab) in enumerate(self.edge_list):
            for x, cx in enumerate(self.cands[a]):
                for y, cy in enumerate(self.cands[b]):
                    self.edge_t[i, x, y] = tab.get((cx, cy), 0.0)
        self.tree = self._forest() if self.edge_list else None

    def _forest(self) -> list[tuple[int, int, np.ndarray, np.ndarray]] | None:
        """Post-order (child, parent, transition ms [k_parent, k_child], tie mask) when the
        transition edges plus the ties (each tied pair must share a_bits) form a forest; then the
        Lagrangian subproblem with transitions is solved exactly by dynamic programming. None
        otherwise (cycles, e.g. skip connections): transitions are linearised instead."""
        n, k = self.omega.shape
        mats: dict[tuple[int, int], list[np.ndarray]] = {}
        for (a, b, _), t in zip(self.edge_list, self.edge_t, strict=True):
            key = (min(a, b), max(a, b))
            m = mats.setdefault(key, [np.zeros((k, k)), np.zeros((k, k), dtype=bool)])
            m[0] += t if a < b else t.T
        for g in self.groups:
            for a, b in zip(g, g[1:], strict=False):
                key = (min(a, b), max(a, b))
                m = mats.setdefault(key, [np.zeros((k, k)), np.zeros((k, k), dtype=bool)])
                m[1] |= self.a_bits[key[0]][:, None] != self.a_bits[key[1]][None, :]
        parent = list(range(n))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        adj: dict[int, list[int]] = {}
        for a, b in mats:
            ra, rb = find(a), find(b)
            if ra == rb:
                return None
            parent[ra] = rb
            adj.setdefault(a, []).append(b)
            adj.setdefault(b, []).append(a)
        order: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        seen: set[int] = set()
        for root in range(n):
            if root in seen or root not in adj:
                continue
            seen.add(root)
            stack, visit = [root], []
            while stack:  # iterative DFS: parents before children
                u = stack.pop()
                visit.append(u)
                for v in adj[u]:
                    if v not in seen:
                        seen.add(v)
                        stack.append(v)
                        t, tie = mats[(min(u, v), max(u, v))]
                        order.append((v, u, t if u < v else t.T, tie if u < v else tie.T))
        return order[::-1]  # children before parents

    def _dp(self, score: np.ndarray, w_lat: float) -> np.ndarray:
        """Exact argmin of sum(score) + w_lat * transitions over the forest (ties as hard edges)."""
        acc = score.copy()
        arg: dict[int, np.ndarray] = {}
        rows = np.arange(score.shape[1])
        for c, p, t, tie in self.tree:  # type: ignore[union-attr]
            m = np.where(tie, _INF, t * w_lat + acc[c][None, :])
            a = np.argmin(m, axis=1)
            arg[c] = a
            acc[p] = acc[p] + m[rows, a]
        sel = np.argmin(acc, axis=1)  # roots (and isolated layers) take their best
        for c, p, _, _ in reversed(self.tree):  # type: ignore[arg-type]
            sel[c] = arg[c][sel[p]]
        return sel

    def linearise(self, sel: np.ndarray) -> None:
        """Add to each layer's latency the transition cost it would pay with its neighbours fixed
        at ``sel`` (a coordinate-wise linearisation of the pairwise terms)."""
        if self.lat < 0 or not self.edges:
            return
        extra = np.zeros_like(self.omega)
        for i, lst in self.edges.items():
            for a, b, tab, prod in lst:
                for j, c in enumerate(self.cands[i]):
                    key = (c, self.cands[b][sel[b]]) if prod else (self.cands[a][sel[a]], c)
                    extra[i, j] += tab.get(key, 0.0)
        self.eff = self.scaled.copy()
        self.eff[self.lat] += extra / self.limits[self.lat]

    def totals(self, sel: np.ndarray) -> np.ndarray:
        rows = np.arange(len(sel))
        tot = self.cost[:, rows, sel].sum(axis=1) + self.const
        if self.lat >= 0 and len(self.edge_a):
            tot[self.lat] += self.edge_t[np.arange(len(self.edge_a)), sel[self.edge_a], sel[self.edge_b]].sum()
        return tot

    def fits(self, tot: np.ndarray) -> bool:
        return bool(np.all(tot <= self.limits * (1 + 1e-9) + 1e-12))

    def pair_delta(self, sel: np.ndarray, i: int, j: int) -> float:
        """Change of transition latency when layer i moves to candidate j."""
        d = 0.0
        for a, b, tab, prod in self.edges.get(i, ()):
            if prod:
                other = self.cands[b][sel[b]]
                d += tab.get((self.cands[i][j], other), 0.0) - tab.get((self.cands[i][sel[i]], other), 0.0)
            else:
                other = self.cands[a][sel[a]]
                d += tab.get((other, self.cands[i][j]), 0.0) - tab.get((other, self.cands[i][sel[i]]), 0.0)
        return d

    def lagrangian(self, lam: np.ndarray) -> np.ndarray:
        eff = self.scaled if self.tree is not None else self.eff
        score = self.omega + np.tensordot(lam, eff, axes=1) if len(lam) else self.omega.copy()
        if self.restrict is not None:
            has = (self.a_bits == self.restrict).any(axis=1, keepdims=True)
            score = np.where(~has | (self.a_bits == self.restrict), score, _INF)
        if self.tree is not None:  # exact subproblem: transitions and ties by DP on the forest
            return self._dp(score, float(lam[self.lat]) / self.limits[self.lat] if len(lam) else 0.0)
        sel = np.argmin(score, axis=1)
        for g in self.groups:
            best, best_sel = _INF, None
            for a in sorted({int(v) for v in self.a_bits[g[0]] if v >= 0}):
                masked = np.where(self.a_bits[list(g)] == a, score[list(g)], _INF)
                js = np.argmin(masked, axis=1)
                val = masked[np.arange(len(g)), js].sum()
                if val < best:
                    best, best_sel = val, js
            if best_sel is None or not np.isfinite(best):
                raise SolverError(f"tie group {[self.layers[i] for i in g]} has no common a_bits candidate")
            sel[list(g)] = best_sel
        return sel


def _search_scale(ar: _Arrays, mu: np.ndarray) -> tuple[np.ndarray | None, float]:
    """Smallest scale s (bisection, log-space) whose Lagrangian policy meets every budget."""
    hi = 1.0
    for _ in range(60):
        sel = ar.lagrangian(hi * mu)
        if ar.fits(ar.totals(sel)):
            break
        hi *= 4.0
    else:
        return None, _INF
    best = sel
    if not ar.fits(ar.totals(ar.lagrangian(0 * mu))):
        lo = hi / 4.0 if hi > 1.0 else 0.0
        for _ in range(25):
            mid = (lo + hi) / 2
            s = ar.lagrangian(mid * mu)
            if ar.fits(ar.totals(s)):
                hi, best = mid, s
            else:
                lo = mid
    else:
        best = ar.lagrangian(0 * mu)
        hi = 0.0
    return best, hi


def _fill(ar: _Arrays, sel: np.ndarray, lam: np.ndarray, max_moves: int = 100_000) -> np.ndarray:
    """Greedy upgrades (best ΔΩ per unit of scalarised cost) that keep every budget."""
    sel = sel.copy()
    tot = ar.totals(sel)
    n = len(sel)
    rows = np.arange(n)
    w = lam / max(lam.sum(), 1e-300) if len(lam) else lam
    scal = np.tensordot(w, ar.scaled, axes=1) if len(lam) else np.zeros_like(ar.omega)
    same_a = ar.a_bits == ar.a_bits[rows, sel][:, None]
    for _ in range(max_moves):
        d_om = ar.omega - ar.omega[rows, sel][:, None]  # < 0 = improvement
        d_cost = ar.cost - ar.cost[:, rows, sel][:, :, None]
        allowed = (d_om < -1e-15) & np.isfinite(ar.omega)
        if ar.tied:
            tmask = np.zeros(n, dtype=bool)
            tmask[list(ar.tied)] = True
            allowed &= ~tmask[:, None] | same_a
        fits = np.all(tot[:, None, None] + d_cost <= ar.limits[:, None, None] * (1 + 1e-9) + 1e-12, axis=0)
        ok = allowed & fits
        if not ok.any():
            break
        d_sc = scal - scal[rows, sel][:, None]
        ratio = np.where(d_sc <= 1e-15, -d_om * 1e12, -d_om / np.maximum(d_sc, 1e-300))
        ratio = np.where(ok, ratio, -_INF)
        moved = False
        for flat in np.argsort(-ratio, axis=None)[:64]:  # transitions may veto the best unary move
            i, j = divmod(int(flat), ratio.shape[1])
            if not np.isfinite(ratio[i, j]):
                break
            new = tot + d_cost[:, i, j]
            if ar.lat >= 0 and i in ar.edges:
                new[ar.lat] += ar.pair_delta(sel, i, j)
            if ar.fits(new):
                sel[i], tot, moved = j, new, True
                same_a[i] = ar.a_bits[i] == ar.a_bits[i, j]
                break
        if not moved:
            break
    return _group_moves(ar, sel, lam)


def _group_moves(ar: _Arrays, sel: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Tie groups may switch their shared a_bits as a whole if that lowers Ω within budget."""
    if not ar.groups:
        return sel
    improved = True
    while improved:
        improved = False
        om = ar.omega[np.arange(len(sel)), sel].sum()
        for g in ar.groups:
            gl = list(g)
            for a in {int(v) for v in ar.a_bits[g[0]] if v >= 0}:
                for scale in (0.0, 1.0):  # best-Ω members first, then the Lagrangian trade-off
                    score = ar.omega[gl] + (np.tensordot(scale * lam, ar.scaled[:, gl], axes=1) if len(lam) else 0)
                    masked = np.where(ar.a_bits[gl] == a, score, _INF)
                    trial = sel.copy()
                    trial[gl] = np.argmin(masked, axis=1)
                    t_om = ar.omega[np.arange(len(sel)), trial].sum()
                    if t_om < om - 1e-15 and ar.fits(ar.totals(trial)):
                        sel, om, improved = trial, t_om, True
    return sel


def _fallback_start(problem: Problem, ar: _Arrays) -> np.ndarray | None:
    from lcpaq.search.ilp import minimum_policy

    for b, _ in problem.budgets.items():
        _, bits = minimum_policy(problem, BUDGET_COSTS[b])
        sel = np.array([ar.cands[i].index(bits[ly]) for i, ly in enumerate(ar.layers)])
        if ar.fits(ar.totals(sel)):
            return sel
    return None


def _om(ar: _Arrays, sel: np.ndarray) -> float:
    return float(ar.omega[np.arange(len(sel)), sel].sum())


def _better(ar: _Arrays, a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    return b if _om(ar, b) < _om(ar, a) else a


def _passes(ar: _Arrays, rounds: int) -> np.ndarray | None:
    """Lagrangian passes (direction adapted over ``rounds``), each filled; with transitions also
    passes restricted to one shared a_bits. The best feasible policy, or None."""
    ar.eff = ar.scaled
    mu = np.ones(len(ar.names))
    best: np.ndarray | None = None
    for _ in range(max(1, rounds if len(mu) > 1 or ar.edges else 1)):
        sel, s = _search_scale(ar, mu)
        for _ in range(3 if ar.edges and ar.tree is None else 0):  # re-linearise transitions
            if sel is None:
                break
            ar.linearise(sel)
            s2, sc2 = _search_scale(ar, mu)
            if s2 is None or _om(ar, s2) >= _om(ar, sel):
                break
            sel, s = s2, sc2
        if sel is None:
            break
        best = _better(ar, best, _fill(ar, sel, s * mu))
        util = ar.totals(sel) / ar.limits
        mu = mu * np.maximum(util, 1e-3) ** 2
        mu = mu / mu.max()
    if ar.edges:  # transitions: also seed from policies with one shared a_bits (no a-transitions)
        ar.eff = ar.scaled
        for a in sorted({int(v) for v in ar.a_bits.ravel() if v >= 0}):
            ar.restrict = a
            sel, s = _search_scale(ar, mu)
            ar.restrict = None
            if sel is not None:
                best = _better(ar, best, _fill(ar, sel, s * mu))
    return best


def solve_mckp(problem: Problem, *, rounds: int = 4) -> SearchResult:
    """Greedy MCKP under every budget (see the module docstring for the scalarisation).

    >>> # res = solve_mckp(problem); res.policy, res.costs
    """
    t0 = time.perf_counter()
    ar = _Arrays(problem)
    best: np.ndarray | None = None
    tree = ar.tree
    # With a forest of transitions the Lagrangian subproblem is solved exactly (DP); below
    # LINEARISED_TOO layers the linearised passes run as well and the better policy is kept:
    # neither wins on every instance (notes/search.md).
    modes = (tree, None) if tree is not None and len(ar.layers) < LINEARISED_TOO else (tree,)
    for ar.tree in modes:
        best = _better(ar, best, _passes(ar, rounds))
    ar.tree = tree
    mu = np.ones(len(ar.names))
    if best is None:  # the Lagrangian never met every budget (transitions, several budgets):
        best = _fallback_start(problem, ar)  # start from an exact per-budget minimum that fits
        if best is not None:
            best = _fill(ar, best, mu)
    if best is None:
        from lcpaq.search.ilp import solve_ilp

        solve_ilp(problem)  # raises InfeasibleBudgetError with per-budget minima if truly infeasible
        raise SolverError("the MCKP greedy found no policy meeting every budget together, but one "
                          "exists: use --solver ilp")
    bits: dict[str, BitPair] = {ly: ar.cands[i][best[i]] for i, ly in enumerate(ar.layers)}
    return SearchResult.of(problem, bits, "Heuristic", time.perf_counter() - t0, "mckp")
