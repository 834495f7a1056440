"""Low-cost hyperparameter search over the search's own knobs, scored on the proxy subset.

A trial = one :class:`Knobs` value: build the ILP problem with its Ω variant and activation-bit
set, take the chosen point of the (budget-feasible) Pareto frontier, quantize by PTQ with its
calibration method and score on the proxy data. Strategy: successive halving (``eta``) whose
resource is the number of proxy samples; only feasible policies are ever scored.

:func:`full_score` is the expensive reference: short KD fine-tuning on the full training data and
validation accuracy, used by the benchmark's full-search baseline.

>>> # res = tune(model, inv, report, ProxyEvaluator(model, x, y), budgets=Budgets(max_size_mb=0.1))
>>> # res.best.policy.save("best_policy.json")
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lcpaq.errors import ConfigError, InfeasibleBudgetError, SolverError
from lcpaq.policy import FP32, Policy

PARETO_POINTS = ("best", "knee", "cheap")


@dataclass(frozen=True)
class Knobs:
    """The search's own hyperparameters (one trial)."""

    omega_variant: str = "trace"  # "trace" (Hessian-weighted) | "plain" (perturbation only)
    a_bits: tuple[int, ...] = (8,)  # activation-bit candidates
    calib_method: str = "minmax"  # PTQ calibration: minmax | percentile | mse
    pareto_point: str = "best"  # best = ILP optimum; knee / cheap = feasible frontier points
    kd_temp: float = 4.0  # carried to the final fine-tune (PTQ proxies cannot see it)
    kd_alpha: float = 0.7

    def label(self) -> str:
        return (f"{self.omega_variant}/a{''.join(map(str, self.a_bits))}/{self.calib_method}/"
                f"{self.pareto_point}")


DEFAULT_SPACE: Mapping[str, Sequence[Any]] = {
    "omega_variant": ("trace", "plain"),
    "a_bits": ((8,), (4, 8)),
    "calib_method": ("minmax", "percentile", "mse"),
    "pareto_point": PARETO_POINTS,
}


def candidate_configs(trials: int, *, space: Mapping[str, Sequence[Any]] = DEFAULT_SPACE,
                      seed: int = 0) -> list[Knobs]:
    """``trials`` distinct knob settings sampled (seeded) from the grid ``space``."""
    keys = list(space)
    grid = [Knobs(**dict(zip(keys, vals, strict=True))) for vals in itertools.product(*(space[k] for k in keys))]
    if trials >= len(grid):
        return grid
    return random.Random(seed).sample(grid, trials)


@dataclass(frozen=True)
class Trial:
    knobs: Knobs
    policy: Policy | None  # None = no feasible policy for these knobs
    scores: Mapping[str, float]  # proxy scores at the largest rung reached
    n: int  # proxy samples of that rung
    seconds: float
    error: str = ""


@dataclass(frozen=True)
class TuneResult:
    best: Trial
    trials: tuple[Trial, ...]
    metric: str
    wall_s: float
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def t(x: Trial) -> dict[str, Any]:
            return {"knobs": asdict(x.knobs), "label": x.knobs.label(), "scores": dict(x.scores), "n": x.n,
                    "seconds": x.seconds, "error": x.error,
                    "policy": x.policy.summary() if x.policy is not None else None}
        return {"metric": self.metric, "wall_s": self.wall_s, "best": t(self.best),
                "trials": [t(x) for x in self.trials], "meta": dict(self.meta)}


class PolicyMaker:
    """Knobs -> feasible policy (cached by the knobs that shape the policy)."""

    def __init__(self, inventory: Any, report: Any, *, budgets: Any, latency: Any = None,
                 w_bits: Sequence[int] = (2, 4, 8), keep_fp32: bool = False, pareto_points: int = 6) -> None:
        from lcpaq.search import Budgets

        self.inventory, self.report, self.latency = inventory, report, latency
        self.budgets = budgets if budgets is not None else Budgets()
        self.w_bits, self.keep_fp32, self.pareto_points = tuple(w_bits), keep_fp32, pareto_points
        self._cache: dict[tuple, Policy] = {}

    def __call__(self, k: Knobs) -> Policy:
        key = (k.omega_variant, k.a_bits, k.pareto_point)
        if key not in self._cache:
            self._cache[key] = self._make(k)
        return self._cache[key]

    def _make(self, k: Knobs) -> Policy:
        from lcpaq.search import Frontier, build_problem, pareto_frontier, search

        if k.pareto_point not in PARETO_POINTS:
            raise ConfigError(f"unknown pareto_point '{k.pareto_point}'; use one of {PARETO_POINTS}")
        cands = [(w, a) for w in self.w_bits for a in k.a_bits] + ([FP32] if self.keep_fp32 else [])
        prob = build_problem(self.inventory, self.report.omega_table(cands, variant=k.omega_variant),
                             candidates=cands, budgets=self.budgets, latency=self.latency)
        best = search(prob)
        if k.pareto_point == "best" or not prob.budgets.items():
            return best.policy
        sweep = prob.budgets.items()[0][0]
        fr = pareto_frontier(prob, sweep, points=self.pareto_points)
        ok = [p for p in fr.points if prob.feasible(p.policy)] or [best]
        if k.pareto_point == "cheap":
            return min(ok, key=lambda p: p.costs[fr.cost_name]).policy
        return Frontier(sweep, tuple(ok)).knee().policy


def tune(model: Any, inventory: Any, report: Any, evaluator: Any, *, budgets: Any = None, latency: Any = None,
         configs: Sequence[Knobs] | None = None, trials: int = 12, metric: str = "margin", eta: int = 2,
         space: Mapping[str, Sequence[Any]] = DEFAULT_SPACE,
         min_samples: int = 40, seed: int = 0, w_bits: Sequence[int] = (2, 4, 8),
         progress: Callable[[Trial], None] | None = None, maker: PolicyMaker | None = None) -> TuneResult:
    """Successive halving over knob settings, each scored by ``evaluator`` (a ProxyEvaluator).

    Rung r scores the survivors on n_r proxy samples (n_last = all, n_{r-1} = n_r / eta, at least
    ``min_samples``) and keeps the best 1/eta. Knobs whose budgets admit no policy are dropped.
    ``maker`` (a PolicyMaker for the same inventory, report and budgets) shares its cache of
    policies with the caller, e.g. with a full-search baseline over the same candidate set.

    >>> # tune(m, inv, rep, ev, budgets=Budgets(max_size_mb=0.1), trials=12).best.knobs
    """
    from lcpaq.proxy.evaluate import PROXY_METRICS

    if metric not in PROXY_METRICS:
        raise ConfigError(f"unknown proxy metric '{metric}'; use one of {PROXY_METRICS}")
    if eta < 2:
        raise ConfigError(f"eta={eta}: successive halving needs eta >= 2")
    t0 = time.perf_counter()
    make = maker or PolicyMaker(inventory, report, budgets=budgets, latency=latency, w_bits=w_bits)
    configs = list(configs) if configs is not None else candidate_configs(trials, space=space, seed=seed)
    done: dict[Knobs, Trial] = {}
    alive: list[tuple[Knobs, Policy]] = []
    for k in configs:
        try:
            alive.append((k, make(k)))
        except (InfeasibleBudgetError, SolverError) as e:
            done[k] = Trial(k, None, {}, 0, 0.0, error=str(e).splitlines()[0])
    n_all = len(evaluator.y)
    rungs = max(1, math.ceil(math.log(max(len(alive), 1), eta)) + 1)
    rungs = min(rungs, int(math.log(max(n_all / max(min_samples, 1), 1), eta)) + 1)  # smallest >= min_samples
    sizes = [n_all // eta ** (rungs - 1 - r) for r in range(rungs)]
    cache: dict[tuple, Any] = {}  # (policy, calib method, n) -> ProxyScore
    for r, n in enumerate(sizes):
        scored = []
        # the rung's new (policy, calibration) pairs in one call: knobs that lead to the same
        # policy share the measurement, and an evaluator with evaluate_many scores them together
        todo = list(dict.fromkeys((pol, k.calib_method) for k, pol in alive if (pol, k.calib_method, n) not in cache))
        many = getattr(evaluator, "evaluate_many", None)
        got = many(todo, n=n) if many is not None else [evaluator.evaluate(p, calib_method=c, n=n) for p, c in todo]
        cache.update({(pol, cm, n): s for (pol, cm), s in zip(todo, got, strict=True)})
        for k, pol in alive:
            s = cache[(pol, k.calib_method, n)]
            tr = Trial(k, pol, {m: s.get(m) for m in PROXY_METRICS}, n, s.seconds)
            done[k] = tr
            scored.append(tr)
            if progress is not None:
                progress(tr)
        scored.sort(key=lambda t: t.scores[metric], reverse=True)
        if r < len(sizes) - 1:
            keep = max(1, math.ceil(len(scored) / eta))
            alive = [(t.knobs, t.policy) for t in scored[:keep]]  # type: ignore[misc]
    feasible = [t for t in done.values() if t.policy is not None]
    if not feasible:
        raise InfeasibleBudgetError("no knob setting gives a policy within the budgets; raise a budget "
                                    "or allow lower bit-widths")
    best = max((t for t in feasible if t.n == sizes[-1]), key=lambda t: t.scores[metric])
    return TuneResult(best, tuple(done[k] for k in configs), metric, time.perf_counter() - t0,
                      meta={"rungs": sizes, "proxy_samples": n_all, "evaluations": len(cache)})


def proxy_scores(evaluator: Any, make: PolicyMaker, configs: Iterable[Knobs]) -> dict[Knobs, dict[str, float]]:
    """Every config scored on all proxy samples (for rank correlation against the full baseline)."""
    from lcpaq.proxy.evaluate import PROXY_METRICS

    pols = {}
    for k in configs:
        try:
            pols[k] = (make(k), k.calib_method)
        except (InfeasibleBudgetError, SolverError):
            continue
    todo = list(dict.fromkeys(pols.values()))
    many = getattr(evaluator, "evaluate_many", None)
    got = dict(zip(todo, many(todo) if many is not None else [evaluator.evaluate(p, calib_method=c) for p, c in todo],
                   strict=True))
    return {k: {m: got[pc].get(m) for m in PROXY_METRICS} for k, pc in pols.items()}


def full_score(model: Any, policy: Policy, knobs: Knobs, train_loader: Any, val_loader: Any, *,
               epochs: int = 1, lr: float = 1e-3, max_steps_per_epoch: int | None = None) -> float:
    """Full-search reference score: KD fine-tune a copy on the full data, validation accuracy (%)."""
    from lcpaq.finetune import finetune

    res = finetune(copy.deepcopy(model), policy, train_loader, val_loader, epochs=epochs, kd_temp=knobs.kd_temp,
                   kd_alpha=knobs.kd_alpha, lr=lr, calib_method=knobs.calib_method,
                   max_steps_per_epoch=max_steps_per_epoch)
    return res.qat_acc
