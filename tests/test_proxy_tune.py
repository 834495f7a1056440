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


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_act_qparams_matches_act_quantizer(method):
    """The evaluator's one-shot range rule gives ActQuantizer's (scale, zero point), bit for bit."""
    from lcpaq.proxy.ranges import act_qparams
    from lcpaq.quant import ActQuantizer

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5000, generator=g).relu(), torch.randn(3, 70000, generator=g) * 3 + 1,
          torch.cat([torch.randn(4000, generator=g), torch.tensor([40.0])])]
    for x in xs:
        for bits in (2, 4, 8):
            for sym in (False, True):
                q = ActQuantizer(bits, symmetric=sym, method=method)
                q.observe = True
                q(x)
                q.compute_qparams()
                sc, zp = act_qparams(x, bits, method=method, symmetric=sym)
                assert (float(q.scale), int(q.zero_point)) == (float(torch.tensor(sc)), zp)


def test_fp32_calibrated_models_equal_apply_policy(tiny_setup):
    """The shared frozen layers compute what apply_policy's fake-quant layers compute with the same
    activation ranges: identical logits on a mixed policy with fp32, w2 and a4 layers."""
    from lcpaq.proxy.evaluate import _structural_clone
    from lcpaq.quant import QUANT_TYPES, apply_policy

    m, inv, _, base = tiny_setup
    ev = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32")
    bits = [(2, 8), (4, 4), (8, 8), (32, 32), (4, 8)]
    pol = Policy({n: bits[i % len(bits)] for i, n in enumerate(inv.names)})
    for method in ("minmax", "mse"):
        ref = apply_policy(_structural_clone(ev.model), pol, method=method)
        for name, mod in ref.named_modules():
            if isinstance(mod, QUANT_TYPES) and mod.act_quant is not None:
                sc, zp = ev._fp32_qparams(name, mod.act_quant.bits, method, False)
                mod.act_quant.scale.data.fill_(sc)
                mod.act_quant.zero_point.fill_(zp)
                mod.act_quant.calibrated.fill_(True)
        with torch.no_grad():
            assert torch.equal(ev.quantized(pol, calib_method=method)(ev.x), ref.eval()(ev.x))
    assert len(ev._layers) == 2 * sum(1 for _, b in pol.items() if b != (32, 32))


def test_refit_weights_cut_the_layer_output_error(tiny_setup):
    """weights="refit" picks per-channel clipping by the layer's (diagonal) output error: summed over
    the layers, the real output error falls, strongly at 2 bits; needs fp32 calibration."""
    from lcpaq.errors import ConfigError
    from lcpaq.proxy.ranges import refit_weight
    from lcpaq.quant.quantizers import fake_quant_weight

    m, inv, _, base = tiny_setup
    ev = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32", weights="refit")
    ev._fp32_qparams(inv.names[0], 8, "minmax", False)
    tot: dict[int, list[float]] = {}  # bits -> summed relative output error [maxabs, refit]
    for name in inv.names:
        layer, x = ev._float_layers[name], ev._inputs[name]
        f = torch.nn.functional.conv2d if isinstance(layer, torch.nn.Conv2d) else torch.nn.functional.linear
        kw = {"stride": layer.stride, "padding": layer.padding} if isinstance(layer, torch.nn.Conv2d) else {}
        with torch.no_grad():
            ref = f(x, layer.weight, **kw)
            err = {b: [float((f(x, q, **kw) - ref).pow(2).mean() / ref.pow(2).mean()) for q in
                       (fake_quant_weight(layer.weight, b), refit_weight(layer, x, b))] for b in (2, 4)}
        for b in (2, 4):
            tot[b] = [tot.get(b, [0.0, 0.0])[i] + err[b][i] for i in (0, 1)]
    assert tot[2][1] < 0.8 * tot[2][0] and tot[4][1] < tot[4][0]
    lo = Policy.uniform(inv.names, 2, 8)
    assert ev.evaluate(lo).kl > ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32").evaluate(lo).kl
    with pytest.raises(ConfigError, match="refit"):
        ProxyEvaluator(m, base.x, base.y, weights="refit")


def test_cli_tune_writes_a_feasible_policy_and_rejects_bad_proxy_options(tmp_path):
    """`lcpaq tune` end to end on the embedded model: the written policy fits the size budget;
    an unknown --proxy-weights (or refit without fp32 ranges) exits 2."""
    from lcpaq.cli import main
    from lcpaq.data import get_loader

    m = get_model("mnist_resnet")
    x, y = next(iter(get_loader("mnist5k", "train", batch_size=32)))
    sens = estimate_sensitivity(m, (x, y), candidates=[(w, a) for w in (2, 4, 8) for a in (4, 8)], probes=2)
    sens.save(tmp_path / "sens.json")
    inv = trace(m, (1, 1, 28, 28))
    budget = policy_costs(inv, Policy.uniform(inv.names, 4, 8)).total_size_mb * 1.0001
    base = ["tune", "--model", "mnist_resnet", "--data", "mnist5k", "--sensitivity", str(tmp_path / "sens.json"),
            "--max-size-mb", str(budget), "--trials", "3", "--proxy-fraction", "0.01", "--json"]
    assert main(base + ["--out", str(tmp_path / "p.json")]) == 0
    pol = Policy.load(tmp_path / "p.json", layer_names=inv.names)
    assert policy_costs(inv, pol).total_size_mb <= budget
    assert main(base + ["--proxy-weights", "bogus", "--out", str(tmp_path / "q.json")]) == 2
    assert main(base + ["--proxy-weights", "refit", "--proxy-calibration", "sequential",
                        "--out", str(tmp_path / "q.json")]) == 2
    assert not (tmp_path / "q.json").exists()


def test_evaluator_keeps_its_own_weights(tiny_setup):
    """Scores do not move when the caller later changes its model's weights in place."""
    import copy

    m0, inv, _, base = tiny_setup
    m = copy.deepcopy(m0)
    ev = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32", cache_models=0)
    pol = Policy.uniform(inv.names, 4, 8)
    before = ev.evaluate(pol)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-3.0)
    after = ev.evaluate(pol)
    assert (before.margin, before.kl, before.acc) == (after.margin, after.kl, after.acc)
    assert not any(p.requires_grad for p in ev.model.parameters())


def _bn_randomized(seed: int = 0) -> torch.nn.Module:
    """TinyResNet with trained-looking BatchNorm statistics (default ones fold to ~identity)."""
    torch.manual_seed(seed)
    m = TinyResNet().eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            mod.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return m


def test_bn_folded_into_frozen_convs_keeps_the_function(tiny_setup):
    """With the inventory, each BN whose conv feeds only it is folded into that conv's frozen twins
    (and skipped): no BatchNorm runs per policy, and logits and scores match the unfolded
    evaluator's to float rounding, also for a folded conv kept at fp32 in the policy."""
    _, _, _, base = tiny_setup
    m = _bn_randomized()
    inv = trace(m, TinyResNet.input_shape)
    folded = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32", inventory=inv)
    plain = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32")
    assert folded._bn_pairs == {"stem": "bn0", "conv1": "bn1", "conv2": "bn2"} and not plain._bn_pairs
    for pol in (Policy.uniform(inv.names, 4, 8), Policy({"stem": (2, 8), "conv1": (32, 32), "conv2": (8, 4),
                                                         "proj": (4, 8), "fc": (8, 8)})):
        for method in ("minmax", "percentile"):
            qf, qp = folded.quantized(pol, calib_method=method), plain.quantized(pol, calib_method=method)
            assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in qf.modules())
            with torch.no_grad():
                a, b = qf(base.x), qp(base.x)
            assert (a - b).abs().max() <= 1e-3 * b.abs().max()
            sf, sp = folded.evaluate(pol, calib_method=method), plain.evaluate(pol, calib_method=method)
            assert sf.margin == pytest.approx(sp.margin, abs=1e-3) and sf.kl == pytest.approx(sp.kl, abs=1e-4)
            assert abs(sf.acc - sp.acc) <= 100.0 / len(base.y)


class _ReusedConvOutput(torch.nn.Module):
    """conv -> BN, but the conv's raw output is also added back: folding BN would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = torch.relu(self.bn(y) + y)
        return self.fc(z.mean((2, 3)))


def test_bn_not_folded_when_the_conv_output_is_used_elsewhere(tiny_setup):
    _, _, _, base = tiny_setup
    torch.manual_seed(0)
    m = _ReusedConvOutput().eval()
    m.bn.running_var.fill_(4.0)
    inv = trace(m, TinyResNet.input_shape)
    ev = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32", inventory=inv)
    assert not ev._bn_pairs
    pol = Policy.uniform(inv.names, 8, 8)
    with torch.no_grad():
        assert torch.equal(ev.quantized(pol)(base.x), ProxyEvaluator(m, base.x, base.y, calib_samples=32,
                                                                      calibration="fp32").quantized(pol)(base.x))


def test_evaluate_many_matches_evaluate(tiny_setup):
    """evaluate_many scores each distinct pair once, in the caller's order, as evaluate does."""
    m, inv, _, base = tiny_setup
    ev = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32",
                        inventory=trace(m, TinyResNet.input_shape))
    items = [(Policy.uniform(inv.names, w, a), cm) for w, a, cm in
             [(4, 8, "mse"), (2, 8, "minmax"), (8, 4, "percentile"), (4, 8, "mse")]]
    many = ev.evaluate_many(items, n=40)
    ev.clear_cache(layers=True)
    one = [ev.evaluate(p, calib_method=cm, n=40) for p, cm in items]
    assert [(s.margin, s.kl, s.acc, s.n) for s in many] == [(s.margin, s.kl, s.acc, s.n) for s in one]
    assert many[0] is many[3] and many[0].margin != many[1].margin
    assert ev.evaluate_many([]) == []


def test_proxy_scores_match_evaluate_and_skip_infeasible(tiny_setup):
    from lcpaq.proxy import proxy_scores

    m, inv, rep, base = tiny_setup
    ev = ProxyEvaluator(m, base.x, base.y, calib_samples=32, calibration="fp32")
    w4 = policy_costs(inv, Policy.uniform(inv.names, 4, 8))
    configs = candidate_configs(4, seed=1)
    make = PolicyMaker(inv, rep, budgets=Budgets(max_size_mb=w4.total_size_mb * 1.0001))
    out = proxy_scores(ev, make, configs)
    assert set(out) == set(configs)
    for k, sc in out.items():
        assert sc["margin"] == ev.evaluate(make(k), calib_method=k.calib_method).margin
    assert proxy_scores(ev, PolicyMaker(inv, rep, budgets=Budgets(max_size_mb=1e-6)), configs) == {}
