"""Block pairs (lcpaq.profiler.pairs): each boundary's joint cost, measured as two blocks cut together."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcpaq.policy import Policy
from lcpaq.profiler.blocks import (
    BlockPlan,
    BlockTable,
    design_policies,
    fit_block_model,
    fit_correction,
)
from lcpaq.profiler.pairs import (
    boundaries,
    boundary_layers,
    pair_context,
    pair_costs,
    pair_groupings,
)

CANDS = [(32, 32), (4, 8), (8, 8)]


def _chain() -> BlockPlan:
    """stem | a (a1, a2) | b (b1, b2) | c (c1) | fc: a chain of five blocks."""
    layers = ("stem", "a1", "a2", "b1", "b2", "c1", "fc")
    groups = {"stem": "stem", "a1": "a", "a2": "a", "b1": "b", "b2": "b", "c1": "c", "fc": "fc"}
    members = {"stem": ("stem",), "a": ("a1", "a2"), "b": ("b1", "b2"), "c": ("c1",), "fc": ("fc",)}
    context = {"stem": ("stem", "a1", "a2"), "a": ("a1", "a2", "stem", "b1", "b2"),
               "b": ("b1", "b2", "a2", "c1"), "c": ("c1", "b2", "fc"), "fc": ("fc", "c1")}
    edges = (("stem", "a1"), ("stem", "a2"), ("a2", "b1"), ("a2", "b2"), ("b2", "c1"), ("c1", "fc"))
    return BlockPlan(layers, groups, members, context, edges, {n: 1000 for n in layers})


def test_pair_groupings_merge_every_boundary_once_in_disjoint_maps():
    plan = _chain()
    bounds = boundaries(plan)
    assert bounds == [("stem", "a"), ("a", "b"), ("b", "c"), ("c", "fc")]
    assert boundary_layers(plan, "a", "b") == ("a2", "b1", "b2")
    assert pair_context(plan, "a", "b") == ("stem", "a1", "a2", "b1", "b2", "c1")  # model order
    maps = pair_groupings(plan)
    assert len(maps) == 2  # a chain: every other boundary in one map
    merged = [g for m in maps for g in set(m.values()) if "+" in g]
    assert sorted(merged) == sorted(f"{a}+{b}" for a, b in bounds)
    for m in maps:
        assert set(m) == set(plan.layers)
        blocks_in_pairs = [b for g in set(m.values()) if "+" in g for b in g.split("+")]
        assert len(blocks_in_pairs) == len(set(blocks_in_pairs))  # disjoint boundaries


def _pair_table(plan: BlockPlan, joint: dict[str, dict[str, float]], c0: float) -> BlockTable:
    """Synthetic blocks; each pair unit = its two blocks + joint[boundary][edge-layer classes];
    whole rows = blocks + every boundary's joint cost + c0."""
    rng = np.random.default_rng(3)
    t = BlockTable(plan)
    for b, ctx in plan.context.items():
        for bits in itertools.product("fi", repeat=len(ctx)):
            key = f"{b}:{''.join(bits)}"
            t.keys.setdefault(b, {})["".join(bits)] = key
            t.ms[key] = 1.0 + 0.3 * bits.count("i") + 0.05 * rng.random()
    for pol in design_policies(plan, CANDS, np.random.default_rng(2)):
        total = sum(t.block_ms(pol).values()) + c0
        for a, b in boundaries(plan):
            g = f"{a}+{b}"
            lay = boundary_layers(plan, a, b)
            cls = "".join("f" if pol[n] == (32, 32) else "i" for n in lay)
            ka, kb = t.keys[a][plan.context_of(pol, a)], t.keys[b][plan.context_of(pol, b)]
            pat = "".join("f" if pol[n] == (32, 32) else "i" for n in pair_context(plan, a, b))
            kp = f"{g}:{pat}"
            t.ms[kp] = t.ms[ka] + t.ms[kb] + joint.get(g, {}).get(cls, 0.0)
            t.pairs.setdefault(g, []).append([pat, kp, ka, kb])
            total += joint.get(g, {}).get(cls, 0.0)
        t.whole.append({"policy": {n: list(p) for n, p in pol.items()}, "ms": total, "ref_ms": 2.0})
    return t


def test_pair_costs_recover_each_boundary_joint_cost_and_the_model_predicts_whole_rows():
    plan = _chain()
    joint = {"a+b": {"fii": 0.4, "iff": 0.25, "fff": -0.1}, "c+fc": {"fi": 0.3}}
    t = _pair_table(plan, joint, c0=0.05)
    costs = {g.name: g for g in pair_costs(t)}
    assert set(costs) == {f"pair:{a}+{b}" for a, b in boundaries(plan)}
    ab = costs["pair:a+b"]
    assert ab.layers == ("a2", "b1", "b2")
    for cls in ("fii", "iff", "fff", "iii"):
        assert ab.ms[cls] == pytest.approx(joint["a+b"].get(cls, 0.0), abs=1e-12)
    # with the pairs the isolation correction is just the constant; without them it cannot fit
    coef, rms, _ = fit_correction(t, features="const", extra=list(costs.values()))
    assert rms < 1e-12 and coef[0] == pytest.approx(0.05)
    assert fit_correction(t, features="const")[1] > 1e-3
    assert fit_block_model(t, CANDS).meta["pair_groups"] == 0  # off by default (no gain measured)
    lm = fit_block_model(t, CANDS, pairs=True)
    assert lm.meta["pair_groups"] == 4
    for row in t.whole:
        pol = Policy({n: tuple(p) for n, p in row["policy"].items()})
        assert lm.predict(pol) == pytest.approx(row["ms"], rel=1e-9)
    # round trip keeps the pair rows
    t2 = BlockTable.from_dict(t.to_dict())
    assert t2.pairs == t.pairs


torch = pytest.importorskip("torch")
from _blocknet import BlockNet  # noqa: E402


def test_profile_blocks_with_pairs_times_each_boundary_as_one_unit_on_ort():
    pytest.importorskip("onnxruntime")
    import onnx

    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.blocks import profile_blocks
    from lcpaq.profiler.fidelity import cut_groups
    from lcpaq.profiler.onnx_export import export_qdq

    torch.manual_seed(0)
    net, shape = BlockNet().eval(), BlockNet.input_shape
    st = MeasureSettings(warmup=1, number=1, repeat=3)
    table, _ = profile_blocks(net, shape, CANDS, settings=st, n_whole=4, pairs=True)
    lm = fit_block_model(table, CANDS, pairs=True)
    assert set(table.pairs) == {f"{a}+{b}" for a, b in boundaries(table.plan)}
    n_pol = len(table.keys["layer.0"])  # every designed policy adds one row per boundary
    assert all(len(v) >= n_pol for v in table.pairs.values())
    assert all(np.isfinite(table.ms[r[1]]) for v in table.pairs.values() for r in v)
    assert lm.meta["pair_groups"] == len(table.pairs)
    # a pair unit holds exactly the nodes of its two block units
    pol = Policy({n: CANDS[i % 3] for i, n in enumerate(table.plan.layers)})
    b = export_qdq(net, pol, shape, unshare=True)
    single = cut_groups(b, net, pol, table.plan.groups)
    for grouping in pair_groupings(table.plan):
        for g, u in cut_groups(b, net, pol, grouping).items():
            if "+" in g:
                a, c = g.split("+")
                n = len(onnx.load_from_string(u.onnx).graph.node)
                assert n == sum(len(onnx.load_from_string(single[k].onnx).graph.node) for k in (a, c))
    assert np.isfinite(lm.predict(pol))
