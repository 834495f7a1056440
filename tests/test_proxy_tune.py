"""Proxy evaluator on the embedded model and the successive-halving tune (feasible policies only)."""

from __future__ import annotations

import pytest
import torch

from lcpaq.costs import policy_costs
from lcpaq.data import get_dataset
from lcpaq.errors import InfeasibleBudgetError
from lcpaq.graph import trace
from lcpaq.models import get_model
from lcpaq.policy import Policy
from lcpaq.proxy import Knobs, PolicyMaker, ProxyEvaluator, candidate_configs, proxy_subset, tune
from lcpaq.search import Budgets, build_problem
from lcpaq.sensitivity import estimate_sensitivity
from lcpaq.testing.models import TinyResNet


@pytest.fixture(scope="module")
def mnist_eval():
    m = get_model("mnist_resnet")
    sub = proxy_subset(get_dataset("mnist5k", "train"), fraction=0.02)
    return m, ProxyEvaluator(m, *sub.tensors(), calib_samples=64)


@pytest.mark.parametrize("metric", ["margin", "kl", "acc"])
def test_proxy_scores_rank_8bit_above_2bit(mnist_eval, metric):
    m, ev = mnist_eval
    names = [n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    hi = ev.evaluate(Policy.uniform(names, 8, 8))
    lo = ev.evaluate(Policy.uniform(names, 2, 8))
    assert hi.get(metric) > lo.get(metric)
    assert hi.n == len(ev.y) and ev.evaluate(Policy.uniform(names, 8, 8), n=20).n == 20


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    m = TinyResNet().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = torch.arange(64) % 4
    inv = trace(m, TinyResNet.input_shape)
    rep = estimate_sensitivity(m, (x[:16], y[:16]), candidates=[(w, a) for w in (2, 4, 8) for a in (4, 8)],
                               probes=4)
    return m, inv, rep, ProxyEvaluator(m, x, y, calib_samples=32)


def test_evaluator_model_cache_is_bounded_and_matches_cold_scores(tiny_setup):
    """A cached quantized model (reused across halving rungs) scores exactly like a cold one."""
    m, inv, _, _ = tiny_setup
    ev = ProxyEvaluator(m, tiny_setup[3].x, tiny_setup[3].y, calib_samples=32, calibration="fp32", cache_models=2)
    pols = [Policy.uniform(inv.names, w, 8) for w in (2, 4, 8)]
    warm_small = ev.evaluate(pols[1], calib_method="percentile", n=16)
    warm = ev.evaluate(pols[1], calib_method="percentile")
    for p in pols:
        ev.evaluate(p)
    assert len(ev._models) == 2  # LRU bound
    ev.clear_cache()
    assert not ev._models
    cold = ev.evaluate(pols[1], calib_method="percentile")
    assert (warm.margin, warm.kl, warm.acc) == (cold.margin, cold.kl, cold.acc)
    assert warm_small.n == 16 and cold.n == len(ev.y)
    # per-policy models share the fp32 weights but never alter the evaluator's fp32 model
    from lcpaq.quant import QUANT_TYPES

    assert not any(isinstance(x, QUANT_TYPES) or x._forward_hooks for x in ev.model.modules())
    assert ev.evaluate(pols[1], calib_method="percentile").margin == cold.margin


def test_tune_scores_only_feasible_policies_and_halves(tiny_setup):
    m, inv, rep, ev = tiny_setup
    w4 = policy_costs(inv, Policy.uniform(inv.names, 4, 8))
    budgets = Budgets(max_size_mb=w4.total_size_mb * 1.0001)
    configs = candidate_configs(8, seed=0)
    res = tune(m, inv, rep, ev, budgets=budgets, configs=configs, eta=2, min_samples=16)
    assert len(res.trials) == len(configs)
    for t in res.trials:
        assert t.policy is not None
        prob = build_problem(inv, rep.omega_table([(w, a) for w in (2, 4, 8) for a in t.knobs.a_bits]),
                             candidates=[(w, a) for w in (2, 4, 8) for a in t.knobs.a_bits], budgets=budgets)
        assert prob.feasible(t.policy)
    full = [t for t in res.trials if t.n == len(ev.y)]
    assert 1 <= len(full) < len(configs)  # successive halving dropped some settings early
    assert res.best.scores["margin"] == max(t.scores["margin"] for t in full)
    assert res.meta["rungs"][-1] == len(ev.y) and res.meta["rungs"][0] >= 16


def test_tune_shares_a_given_policy_maker(tiny_setup):
    """A baseline that precomputed the candidate set hands its PolicyMaker to tune(): the same
    policy objects are scored, and no policy is solved twice."""
    m, inv, rep, ev = tiny_setup
    w4 = policy_costs(inv, Policy.uniform(inv.names, 4, 8))
    budgets = Budgets(max_size_mb=w4.total_size_mb * 1.0001)
    configs = candidate_configs(4, seed=1)
    make = PolicyMaker(inv, rep, budgets=budgets)
    pre = {k: make(k) for k in configs}
    n_cached = len(make._cache)
    res = tune(m, inv, rep, ev, budgets=budgets, configs=configs, maker=make, min_samples=16)
    assert len(make._cache) == n_cached
    assert all(t.policy is pre[t.knobs] for t in res.trials)


def test_tune_raises_when_no_setting_fits(tiny_setup):
    m, inv, rep, ev = tiny_setup
    with pytest.raises(InfeasibleBudgetError):
        tune(m, inv, rep, ev, budgets=Budgets(max_size_mb=1e-6), configs=[Knobs()])


def test_policy_maker_caches_and_obeys_pareto_point(tiny_setup):
    _, inv, rep, _ = tiny_setup
    w4 = policy_costs(inv, Policy.uniform(inv.names, 4, 8))
    make = PolicyMaker(inv, rep, budgets=Budgets(max_size_mb=w4.total_size_mb * 1.0001))
    best, cheap = make(Knobs(pareto_point="best")), make(Knobs(pareto_point="cheap"))
    assert make(Knobs(pareto_point="best", calib_method="mse")) is best
    assert policy_costs(inv, cheap).total_size_mb <= policy_costs(inv, best).total_size_mb + 1e-12


def test_cli_tune_and_finetune_bad_input_exit_2(tmp_path):
    from lcpaq.cli import main

    assert main(["tune", "--model", "mnist_resnet", "--data", "digits", "--sensitivity",
                 str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.json")]) == 2
    assert main(["finetune", "--model", "mnist_resnet", "--data", "digits", "--policy",
                 str(tmp_path / "missing.json"), "--out", str(tmp_path / "q.pt")]) == 2
