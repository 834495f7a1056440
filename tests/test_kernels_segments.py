"""Segment units of the kernels backend (lcpaq.profiler.backends.kernels_check): keys, cutting, timing, fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcpaq.errors import ConfigError, KernelError, MissingLatencyError
from lcpaq.kernels import status
from lcpaq.policy import Policy
from lcpaq.profiler.backend import MeasureSettings
from lcpaq.profiler.backends import kernels_check as kc

needs_ext = pytest.mark.skipif(not status().loaded, reason="compiled lcpaq kernels not built")
CANDS = [(2, 8), (4, 8), (8, 8), (32, 32)]


def _model():
    from lcpaq.models import get_model

    torch.manual_seed(0)
    return get_model("mnist_resnet").eval()


def _cal():
    return [np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)]


def test_key_follows_the_fusion_partner_only():
    plan = kc.SegmentPlan(["a", "b", "c"], {"a": ["b"], "b": ["a"]})
    base = Policy({"a": (4, 8), "b": (8, 8), "c": (8, 8)})
    k = plan.key(base, "b")
    assert k == "b|w8a8|u"
    assert plan.key(Policy({**dict(base.items()), "a": (32, 32)}), "b") == "b|w8a8|f"  # partner float: no fusion
    assert plan.key(Policy({**dict(base.items()), "a": (2, 8)}), "b") == k  # same class, same unit
    assert plan.key(Policy({**dict(base.items()), "c": (32, 32)}), "b") == k  # not a partner
    assert plan.key(Policy({**dict(base.items()), "a": (4, 4)}), "b") == "b|w8a8|i"  # int, but no uint8 edge
    assert plan.key(Policy({**dict(base.items()), "b": (32, 32)}), "b") == "b|fp32"  # a float layer fuses nothing
    assert plan.edges() == [("a", "b")]


def test_prev_context_keys_a_layer_by_the_class_of_the_layer_run_before_it():
    # run order s, a, b, c; a -> b fused
    plan = kc.SegmentPlan(["s", "a", "b", "c"], {"a": ["b"], "b": ["a"]}, prev_context=True)
    pol = Policy({"s": (32, 32), "a": (8, 8), "b": (4, 8), "c": (32, 32)})
    assert plan.key(pol, "s") == "s|fp32"  # nothing runs before it
    assert plan.key(pol, "a") == "a|w8a8|uf"  # partner b, then s (run before it)
    assert plan.key(pol, "b") == "b|w4a8|u"  # run after its partner: the partner is the context
    assert plan.key(pol, "c") == "c|fp32|u"  # a float layer: only the layer before it
    assert plan.key(Policy({**dict(pol.items()), "b": (32, 32)}), "c") == "c|fp32|f"
    assert plan.key(Policy({**dict(pol.items()), "s": (2, 8)}), "c") == "c|fp32|u"  # not before it
    assert kc.SegmentPlan.from_dict(plan.to_dict()).key(pol, "c") == "c|fp32|u"
    pols = kc.design_segment_policies(plan, CANDS, np.random.default_rng(0), cover=2)
    from collections import Counter

    seen = Counter(plan.key(p, n) for p in pols for n in plan.layers)
    # s: 4; a: 3 int x 2 x 2 + fp32 x 2; b: 3 int x 2 + fp32 x 2; c: 3 int x 2 + fp32 x 2
    assert len(seen) == 4 + 14 + 8 + 8 and min(seen.values()) >= 2

    # units generated with a float layer costing 0.005 more after an integer one: recovered exactly
    rng = np.random.default_rng(4)
    base = {(n, c): 0.01 + 0.01 * rng.random() + (0.03 if 32 in c else 0.0) for n in plan.layers for c in CANDS}

    def unit(q, n):
        v = base[(n, tuple(q[n]))]
        prev = {"a": "s", "b": "a", "c": "b"}.get(n)
        if 32 in tuple(q[n]) and prev and 32 not in tuple(q[prev]):
            v += 0.005
        return v

    t = kc.SegmentTable(plan)
    for q in pols:
        segs = {n: unit(q, n) for n in plan.layers}
        t.rows.append({"policy": {n: list(b) for n, b in q.items()}, "segments": segs,
                       "whole_ms": 0.02 + sum(segs.values()), "ref_ms": 1.0})
    lm = kc.fit_segment_model(t, CANDS, correction="const")
    for _ in range(20):
        q = Policy({n: CANDS[int(rng.integers(4))] for n in plan.layers})
        assert lm.predict(q) == pytest.approx(0.02 + sum(unit(q, n) for n in plan.layers), rel=1e-9)
    assert lm.pairwise[("b", "c")][((8, 8), (32, 32))] == pytest.approx(0.005)  # on the b -> c pair


def test_design_covers_every_key():
    plan = kc.SegmentPlan(["s", "a", "b", "c", "d"], {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]})
    pols = kc.design_segment_policies(plan, CANDS, np.random.default_rng(0))
    seen = {plan.key(p, n) for p in pols for n in plan.layers}
    # s: 4 candidates; each partnered layer: fp32 + 3 int x 2 partner classes (u, f)
    assert len(seen) == 4 + 4 * (1 + 3 * 2)
    assert len(pols) < 4 * 7  # far fewer than one sweep per key
    from collections import Counter

    twice = kc.design_segment_policies(plan, CANDS, np.random.default_rng(0), cover=2)
    seen2 = Counter(plan.key(p, n) for p in twice for n in plan.layers)
    assert len(seen2) == len(seen) and min(seen2.values()) >= 2


def _synthetic_table(c0=0.02, scale=1.0, noise=0.0, tau=0.0):
    """A table whose rows are generated from known unit costs: whole = c0 + scale * sum(units)
    + tau * (float/integer switches between consecutive layers)."""
    plan = kc.SegmentPlan(["s", "a", "b"], {"a": ["b"], "b": ["a"]})
    rng = np.random.default_rng(3)
    cost = {}
    for n in plan.layers:
        for c in CANDS:
            cost[(n, c, "")] = 0.01 + 0.001 * rng.random() + (0.05 if 32 in c else 0.0)
    pols = kc.design_segment_policies(plan, CANDS, np.random.default_rng(0))
    pols += [Policy({n: CANDS[int(rng.integers(4))] for n in plan.layers}) for _ in range(10)]
    fused = 0.004  # what a fused uint8 edge saves each end

    def unit(pol, n):
        v = cost[(n, tuple(pol[n]), "")]
        if 32 not in tuple(pol[n]) and any(32 not in tuple(pol[p]) for p in plan.partners[n]):
            v -= fused
        return v

    t = kc.SegmentTable(plan)
    for pol in pols:
        segs = {n: unit(pol, n) for n in plan.layers}
        whole = c0 + scale * sum(segs.values()) + tau * plan.transitions(pol)
        t.rows.append({"policy": {n: list(p) for n, p in pol.items()}, "segments": segs,
                       "whole_ms": whole * (1 + noise * rng.standard_normal()), "ref_ms": 1.0})
    return t, unit, pols


def test_fit_recovers_units_fused_edges_and_the_correction():
    t, unit, pols = _synthetic_table(c0=0.02, scale=1.1)
    lm = kc.fit_segment_model(t, CANDS, correction="auto")  # LOO must find the slope
    assert lm.meta["correction"] in ("scale", "split")
    assert lm.constant_ms == pytest.approx(0.02, abs=1e-9)
    rng = np.random.default_rng(9)
    for _ in range(20):  # policies the table never saw
        pol = Policy({n: CANDS[int(rng.integers(4))] for n in t.plan.layers})
        assert lm.predict(pol) == pytest.approx(0.02 + 1.1 * sum(unit(pol, n) for n in t.plan.layers), rel=1e-9)
    # the fused edge is a pairwise term (the ILP sees it), not hidden in a group
    assert not lm.groups and lm.pairwise[("a", "b")][((4, 8), (8, 8))] == pytest.approx(-2 * 0.004 * 1.1)
    flat, _, _ = _synthetic_table(c0=0.03, scale=1.0, noise=0.0)
    const = kc.fit_segment_model(flat, CANDS, correction="const")  # segments + a constant
    assert const.meta["correction"] == "const" and const.constant_ms == pytest.approx(0.03, abs=1e-12)
    dflt = kc.fit_segment_model(flat, CANDS)  # the default (trans) finds no switch cost here
    assert dflt.meta["correction"] == "trans" and dflt.constant_ms == pytest.approx(0.03, abs=1e-12)
    assert dflt.meta["coef"][1] == pytest.approx(0.0, abs=1e-12)
    none = kc.fit_segment_model(t, CANDS, correction="none")
    assert none.constant_ms == 0.0 and none.predict(pols[0]) == pytest.approx(sum(unit(pols[0], n) for n in "sab"))
    with pytest.raises(ConfigError, match="correction"):
        kc.fit_segment_model(t, CANDS, correction="magic")


def test_transitions_follow_the_run_order_and_fit_as_pairwise_terms():
    plan = kc.SegmentPlan(["a", "b", "c"], {}, order=["a", "c", "b"])
    assert plan.sequence() == [("a", "c"), ("c", "b")]
    f, i = (32, 32), (8, 8)
    assert plan.transitions(Policy({"a": f, "b": f, "c": i})) == 2  # a|c and c|b switch
    assert plan.transitions(Policy({"a": f, "b": i, "c": f})) == 1  # only c|b: a, b are not consecutive
    assert plan.transitions(Policy({"a": (2, 8), "b": i, "c": (4, 8)})) == 0  # integer to integer
    assert kc.SegmentPlan.from_dict(plan.to_dict()).order == plan.order
    assert kc.SegmentPlan.from_dict({"layers": ["a", "b"], "partners": {}}).order == ("a", "b")  # older tables
    with pytest.raises(KernelError, match="permutation"):
        kc.SegmentPlan(["a", "b"], {}, order=["a", "a"])

    t, unit, _ = _synthetic_table(c0=0.02, tau=0.003)
    lm = kc.fit_segment_model(t, CANDS)
    assert lm.meta["correction"] == "trans" and lm.meta["coef"] == pytest.approx([0.02, 0.003], abs=1e-12)
    const = kc.fit_segment_model(t, CANDS, correction="const")
    rng = np.random.default_rng(5)
    worst_const = 0.0
    for _ in range(20):  # unseen policies: exact with the switch term, not with a constant
        pol = Policy({n: CANDS[int(rng.integers(4))] for n in t.plan.layers})
        truth = 0.02 + sum(unit(pol, n) for n in t.plan.layers) + 0.003 * t.plan.transitions(pol)
        assert lm.predict(pol) == pytest.approx(truth, rel=1e-9)
        worst_const = max(worst_const, abs(const.predict(pol) - truth))
    assert worst_const > 0.002
    # the switch cost sits on the consecutive pairs, merged into the fused edge a-b
    assert lm.pairwise[("s", "a")][((32, 32), (8, 8))] == pytest.approx(0.003)
    assert lm.pairwise[("s", "a")].get(((4, 8), (8, 8)), 0.0) == 0.0
    assert lm.pairwise[("a", "b")][((4, 8), (8, 8))] == pytest.approx(-2 * 0.004)


def test_missing_key_is_named():
    t, _, _ = _synthetic_table()
    t.rows = [r for r in t.rows if r["policy"]["s"] != [2, 8]]
    with pytest.raises(MissingLatencyError, match=r"s\|w2a8"):
        kc.fit_segment_model(t, CANDS)


@needs_ext
def test_segments_partition_the_converted_model_and_run_it_exactly(tmp_path):
    m = _model()
    cal = _cal()
    plan = kc.segment_plan(m, cal)
    assert plan.edges() == [("layer1.conv1", "layer1.conv2"), ("layer2.conv1", "layer2.conv2"),
                            ("layer3.conv1", "layer3.conv2")]
    pol = Policy({n: CANDS[i % 4] for i, n in enumerate(plan.layers)})
    dep = kc.deploy_policy(m, pol, (1, 1, 28, 28), cal, plan.layers)
    assert sorted(dep.runner.names) == sorted(plan.layers)  # one segment per layer (in graph order)
    assert list(plan.order) == dep.runner.names != list(plan.layers)  # the downsample runs before conv1
    with torch.inference_mode():
        assert torch.equal(dep.runner(), dep.call())
    # what fusion did is what the key says
    mods = dict(dep.model.named_modules())
    for a, b in plan.edges():
        fused = 32 not in pol[a] and 32 not in pol[b]
        assert (getattr(mods[a], "requant_for", "") == b) == fused


@needs_ext
def test_segment_times_add_up_to_the_whole_converted_model():
    """The segments, timed in sequence, carry the converted model's work: their sum is within 20 %
    of the whole model's time (measured: ~91 %, the rest is the blocks' module calls), and the
    fitted model predicts a policy it never profiled within 15 % (benchmark: ~1-2 % median)."""
    from lcpaq.profiler.backends.ort import time_callable

    m = _model()
    cal = _cal()
    st = MeasureSettings(warmup=2, number=3, repeat=7)
    torch.set_num_threads(1)
    table, lm = kc.profile_segments(m, (1, 1, 28, 28), [(4, 8), (8, 8), (32, 32)], settings=st, calib=cal, extra=2)
    assert len(table.rows) >= 3 + 2 and all(r["whole_ms"] > 0 for r in table.rows)
    plan = table.plan
    pol = Policy({n: [(8, 8), (32, 32), (4, 8)][i % 3] for i, n in enumerate(plan.layers)})
    dep = kc.deploy_policy(m, pol, (1, 1, 28, 28), cal, plan.layers)
    segs = kc.time_segments(dep.runner, st)
    whole = float(np.median(time_callable(dep.call, st)[0]))
    assert 0.8 * whole < sum(segs.values()) < 1.2 * whole
    assert all(v > 0 for v in segs.values())
    assert abs(lm.predict(pol) - whole) < 0.15 * whole


@needs_ext
def test_float_convs_run_channels_last_whatever_reaches_them():
    """convert(channels_last=True): a float conv after a 1-channel input (ambiguous layout) still
    writes NHWC, so its cost does not depend on what precision upstream layers have."""
    from lcpaq.kernels import convert

    m = _model()
    pol = Policy({n: (32, 32) for n in kc.segment_plan(m, _cal()).layers})
    x = torch.randn(1, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        old = convert(kc.quantized_copy(m, pol, _cal()), channels_last=False)
        new = convert(kc.quantized_copy(m, pol, _cal()))
        y_old, y_new = old.bn1(old.conv1(x)), new.bn1(new.conv1(x))
    assert not y_old.is_contiguous(memory_format=torch.channels_last)
    assert y_new.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_new, y_old)


@needs_ext
def test_check_rows_pass_settle_to_the_interleaved_timing_and_count_faults(monkeypatch):
    """check_policies times each policy against the reference with ``settle`` untimed calls after
    each switch (the profile's whole rows do the same) and reports the thread's page faults per call."""
    seen = []

    def fake(ref, pol, settings, **kw):
        seen.append({**kw, "ref": ref})
        ref(), pol()
        return {"ms": 2.0, "ref_ms": 1.0, "rel": 2.0, "wall_ms": 2.0, "ref_wall_ms": 1.0}

    monkeypatch.setattr(kc, "time_interleaved", fake)
    m = _model()
    pols = kc.random_policies(kc.segment_plan(m, _cal()).layers, CANDS, 2)
    st = MeasureSettings(warmup=1, number=1, repeat=2)
    rows = kc.check_policies(m, (1, 1, 28, 28), pols, lambda p: 1.1, settings=st, ref_ms=0.5, rounds=2, settle=3)
    assert [kw["settle"] for kw in seen] == [3, 3] and all(kw["rounds"] == 4 for kw in seen)
    assert all(r["faults_per_call"] >= 0 for r in rows)
    assert rows[0]["error_pct"] == pytest.approx((1.1 - 2.0 * 0.5) / (2.0 * 0.5) * 100)
    seen.clear()
    kc.check_policies(m, (1, 1, 28, 28), pols[:1], lambda p: 1.0, settings=st, ref_ms=0.5)
    assert seen[0]["settle"] == 2  # the default
    layers = [n for n, _ in pols[0].items()]
    ref = kc.deploy_policy(m, Policy.uniform(layers, 8, 8), (1, 1, 28, 28), _cal(), layers)
    seen.clear()
    kc.check_policies(m, (1, 1, 28, 28), pols[:1], lambda p: 1.0, settings=st, ref_ms=0.5, reference=ref)
    assert seen[0]["ref"] is ref.call  # the given reference deployment, not a new one
