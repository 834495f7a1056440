"""Block units (lcpaq.profiler.blocks) and group costs in LatencyModel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcpaq.errors import ConfigError, MissingLatencyError, TableError
from lcpaq.latency import GroupCost, LatencyModel
from lcpaq.policy import Policy
from lcpaq.profiler.blocks import (
    BlockPlan,
    BlockTable,
    correction_features,
    design_policies,
    edge_features,
    fit_block_model,
    fit_correction,
)

CANDS = [(32, 32), (4, 8), (8, 8)]


def _plan() -> BlockPlan:
    """stem | block a (a1, a2) | block b (b1, b2) | fc, contexts as block_plan reads them."""
    layers = ("stem", "a1", "a2", "b1", "b2", "fc")
    groups = {"stem": "stem", "a1": "a", "a2": "a", "b1": "b", "b2": "b", "fc": "fc"}
    members = {"stem": ("stem",), "a": ("a1", "a2"), "b": ("b1", "b2"), "fc": ("fc",)}
    context = {"stem": ("stem", "a1", "a2"), "a": ("a1", "a2", "stem", "b1", "b2"),
               "b": ("b1", "b2", "a2", "fc"), "fc": ("fc", "b2")}
    edges = (("stem", "a1"), ("stem", "a2"), ("a2", "b1"), ("a2", "b2"), ("b2", "fc"))
    numel = {"stem": 4000, "a1": 4000, "a2": 4000, "b1": 2000, "b2": 2000, "fc": 10}
    return BlockPlan(layers, groups, members, context, edges, numel)


def test_design_policies_show_every_block_in_every_context():
    plan = _plan()
    pols = design_policies(plan, CANDS, np.random.default_rng(0))
    for b, ctx in plan.context.items():
        seen = {plan.context_of(p, b) for p in pols}
        assert seen == {"".join(t) for t in itertools.product("fi", repeat=len(ctx))}, b
    # blocks with disjoint contexts vary together: fewer policies than one sweep per block
    assert len(pols) < sum(2 ** len(c) for c in plan.context.values())
    assert all(set(p) == set(plan.layers) for p in pols)


def _synthetic_table(plan: BlockPlan, c0: float, per_edge_size: float) -> BlockTable:
    """Block costs that are *not* additive in the layers (an interaction term), and whole-model
    rows = sum of blocks + c0 + per_edge_size * (size of every same-class cross edge)."""
    rng = np.random.default_rng(1)
    t = BlockTable(plan)
    for b, ctx in plan.context.items():
        for bits in itertools.product("fi", repeat=len(ctx)):
            key = f"{b}:{''.join(bits)}"
            t.keys.setdefault(b, {})["".join(bits)] = key
            n_int = sum(c == "i" for c in bits[:len(plan.members[b])])
            t.ms[key] = 1.0 + 0.3 * n_int - 0.2 * (n_int == len(plan.members[b]) == 2) + 0.01 * rng.random()
    for pol in design_policies(plan, CANDS, np.random.default_rng(2)):
        s = sum(t.block_ms(pol).values())
        f = edge_features(plan, pol)
        same = f[2] + f[3]  # ff + ii sizes (x 1e-5)
        t.whole.append({"policy": {n: list(p) for n, p in pol.items()}, "ms": s + c0 + per_edge_size * same,
                        "ref_ms": 2.0})
    return t


def test_fit_correction_recovers_synthetic_isolation_costs():
    plan = _plan()
    t = _synthetic_table(plan, c0=0.05, per_edge_size=-0.5)
    coef, rms, chosen = fit_correction(t, features="size")
    assert rms < 1e-9
    assert coef[0] == pytest.approx(0.05, abs=1e-9)
    assert coef[3] == pytest.approx(-0.5, abs=1e-9) and coef[4] == pytest.approx(-0.5, abs=1e-9)
    assert coef[1] == 0.0 and coef[2] == 0.0  # counts not in the "size" variant
    assert chosen == "size"
    assert fit_correction(t, features="auto")[2] in ("size", "both")  # "const"/"count" cannot fit it


def test_block_model_predicts_exactly_and_its_additive_part_is_close():
    plan = _plan()
    t = _synthetic_table(plan, c0=0.05, per_edge_size=-0.5)
    lm = fit_block_model(t, CANDS, features="size")
    for row in t.whole:
        pol = Policy({n: tuple(p) for n, p in row["policy"].items()})
        assert lm.predict(pol) == pytest.approx(row["ms"], rel=1e-9)
        # without the groups (what an additive search sees), the error is the interaction only
        additive = LatencyModel(lm.unary, lm.pairwise, lm.constant_ms)
        assert abs(additive.predict(pol) - row["ms"]) < 0.2 * 2 + 0.05
    assert any(abs(v) > 1e-3 for g in lm.groups for v in g.ms.values())  # the interaction is kept


def test_block_table_round_trip_schema_and_missing_context(tmp_path):
    plan = _plan()
    t = _synthetic_table(plan, 0.0, 0.0)
    path = t.save(tmp_path / "blocks.json")
    back = BlockTable.load(path)
    pol = Policy.uniform(plan.layers, 8, 8)
    assert back.block_ms(pol) == t.block_ms(pol)
    assert back.plan == plan
    del back.keys["b"]["iiii"]
    with pytest.raises(MissingLatencyError, match="b@iiii"):
        back.block_ms(pol)
    with pytest.raises(TableError, match="schema"):
        BlockTable.from_dict({"schema": "other"})


def test_group_cost_in_latency_model():
    g = GroupCost("blk", ("x", "y"), {"ff": 2.0, "fi": 1.5, "if": 1.4, "ii": 1.0})
    lm = LatencyModel({"x": {(32, 32): 0.0, (8, 8): 0.0}, "y": {(32, 32): 0.0, (8, 8): 0.0}},
                      constant_ms=0.1, groups=(g,))
    assert lm.predict(Policy({"x": (32, 32), "y": (8, 8)})) == pytest.approx(1.6)
    assert lm.breakdown(Policy({"x": (8, 8), "y": (8, 8)}))["group:blk"] == 1.0
    bad = LatencyModel(lm.unary, groups=(GroupCost("blk", ("x", "y"), {"ff": 2.0}),))
    with pytest.raises(MissingLatencyError, match="blk"):
        bad.predict(Policy({"x": (8, 8), "y": (8, 8)}))


# --- on ORT: cutting blocks from the exported graph --------------------------------------------

torch = pytest.importorskip("torch")
from _blocknet import BlockNet as _BlockNet  # noqa: E402


@pytest.fixture(scope="module")
def blocknet():
    torch.manual_seed(0)
    return _BlockNet().eval()


def test_block_groups_follow_the_module_tree(blocknet):
    from lcpaq.profiler.blocks import block_groups

    g = block_groups(blocknet)
    assert g == {"stem": "stem", "layer.0.conv1": "layer.0", "layer.0.conv2": "layer.0",
                 "layer.1.conv1": "layer.1", "layer.1.conv2": "layer.1", "fc": "fc"}


def test_block_units_partition_the_graph_run_and_key_on_context(blocknet):
    pytest.importorskip("onnxruntime")
    import onnx

    from lcpaq.profiler.blocks import block_plan
    from lcpaq.profiler.fidelity import cut_groups
    from lcpaq.profiler.onnx_export import export_qdq

    shape = _BlockNet.input_shape
    plan = block_plan(blocknet, shape)
    assert set(plan.context["layer.0"]) >= {"layer.0.conv1", "layer.0.conv2", "stem", "layer.1.conv1"}
    pol = Policy({"stem": (8, 8), "layer.0.conv1": (32, 32), "layer.0.conv2": (4, 8),
                  "layer.1.conv1": (8, 8), "layer.1.conv2": (32, 32), "fc": (8, 8)})
    b = export_qdq(blocknet, pol, shape)
    units = cut_groups(b, blocknet, pol, plan.groups)
    assert set(units) == set(plan.blocks)
    n_nodes = len([n for n in onnx.load_from_string(b).graph.node if n.op_type != "Constant"])
    from lcpaq.profiler.fidelity import prepare_for_cutting

    p = onnx.load_from_string(b)
    prepare_for_cutting(p)
    assert sum(len(onnx.load_from_string(u.onnx).graph.node) for u in units.values()) == len(p.graph.node)
    assert len(p.graph.node) >= n_nodes
    import onnxruntime as ort

    for u in units.values():
        sess = ort.InferenceSession(u.onnx, providers=["CPUExecutionProvider"])
        assert all(np.isfinite(o).all() for o in sess.run(None, dict(u.feeds)) if o.dtype.kind == "f")
    # same context -> same key, even when layers outside the context change
    pol2 = Policy({**dict(pol.items()), "fc": (32, 32)})
    assert plan.context_of(pol2, "layer.0") == plan.context_of(pol, "layer.0")
    u2 = cut_groups(export_qdq(blocknet, pol2, shape), blocknet, pol2, plan.groups)
    assert u2["layer.0"].key == units["layer.0"].key
    assert u2["fc"].key != units["fc"].key


def test_prepare_for_cutting_copies_shared_weight_dq_and_constants():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from lcpaq.profiler.fidelity import prepare_for_cutting

    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.int8), "w")
    s = numpy_helper.from_array(np.ones(2, np.float32), "s")
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(1.0))),
        helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name="dq", axis=0),
        helper.make_node("Conv", ["x", "wf"], ["y1"], name="c1"),
        helper.make_node("Conv", ["y1", "wf"], ["y2"], name="c2"),
        helper.make_node("Mul", ["y2", "k"], ["y"], name="m"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w, s])
    m = helper.make_model(g)
    prepare_for_cutting(m)
    ops = [n.op_type for n in m.graph.node]
    assert "Constant" not in ops and ops.count("DequantizeLinear") == 2
    c1, c2 = (n for n in m.graph.node if n.op_type == "Conv")
    assert c1.input[1] != c2.input[1]
    assert "k" in {i.name for i in m.graph.initializer}


def test_latency_model_reads_a_block_table(blocknet, tmp_path):
    from lcpaq.graph import trace
    from lcpaq.profiler.blocks import block_plan
    from lcpaq.profiler.predict import latency_model

    inv = trace(blocknet, _BlockNet.input_shape)
    t = _synthetic_table(block_plan(blocknet, _BlockNet.input_shape), c0=0.02, per_edge_size=0.0)
    path = t.save(tmp_path / "blocks.json")
    lm = latency_model(path, inv, CANDS)
    pol = Policy.uniform([ly.name for ly in inv], 4, 8)
    assert lm.predict(pol) == pytest.approx(sum(t.block_ms(pol).values()) + 0.02, rel=1e-6)
    other = _synthetic_table(_plan(), 0.0, 0.0).save(tmp_path / "other.json")
    with pytest.raises(TableError, match="other layers"):
        latency_model(other, inv, CANDS)


def test_profile_blocks_covers_every_context_on_ort(blocknet):
    pytest.importorskip("onnxruntime")
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.blocks import profile_blocks

    st = MeasureSettings(warmup=1, number=1, repeat=3)
    table, lm = profile_blocks(blocknet, _BlockNet.input_shape, CANDS, settings=st, n_whole=6, whole="stream")
    # the whole rows' timing mode and reference travel with the table and its model (validate reads them)
    assert table.whole_mode == "stream" and BlockTable.from_dict(table.to_dict()).whole_mode == "stream"
    assert lm.meta["reference"] == {"bits": [8, 8], "ms": pytest.approx(np.median([r["ref_ms"] for r in table.whole])),
                                    "whole": "stream"}
    with pytest.raises(ConfigError, match="warm, stream"):
        profile_blocks(blocknet, _BlockNet.input_shape, CANDS, settings=st, whole="cold")
    for b, ctx in table.plan.context.items():
        assert len(table.keys[b]) == 2 ** len(ctx)
    assert all(np.isfinite(v) for v in table.ms.values())
    # 6 designed policies + 3 anchor rows each of uniform fp32 and uniform int8 (the corners)
    assert len(table.whole) == 12 and lm.meta["whole_rows"] == 12
    corners = [{tuple(p) for p in r["policy"].values()} for r in table.whole[6:]]
    assert corners == [{(32, 32)}, {(8, 8)}] * 3
    pol = Policy({n: CANDS[i % 3] for i, n in enumerate(table.plan.layers)})
    assert np.isfinite(lm.predict(pol))
    coef, _, _ = fit_correction(table, features=lm.meta["correction_features"])
    expected = sum(table.block_ms(pol).values()) + coef[0] + coef[1:] @ correction_features(table.plan, pol)
    assert lm.predict(pol) == pytest.approx(expected, rel=1e-9)


def test_unshare_initializers_gives_each_node_its_own_copy():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from lcpaq.profiler.onnx_export import unshare_initializers

    b = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y1"]), helper.make_node("Conv", ["y1", "w", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w, b])
    m = helper.make_model(g)
    assert unshare_initializers(m) == 2
    a, c = m.graph.node
    assert a.input[1:] == ["w", "b"] and set(c.input[1:]).isdisjoint({"w", "b"})
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert np.array_equal(inits[c.input[2]], inits["b"]) and len(inits) == 4
    assert unshare_initializers(m) == 0


def test_edge_correction_learns_one_boundary_cost_and_auto_picks_it():
    plan = _plan()
    t = _synthetic_table(plan, c0=0.05, per_edge_size=0.0)
    for row in t.whole:  # one boundary (a2 fp32 -> b1 int8) costs 0.3 ms more in the whole graph
        if row["policy"]["a2"] == [32, 32] and row["policy"]["b1"] != [32, 32]:
            row["ms"] += 0.3
    coef, rms, chosen = fit_correction(t, features="auto")
    assert chosen == "edge"
    j = plan.edges.index(("a2", "b1"))
    per_edge = coef[5:5 + 3 * len(plan.edges)]  # then the fp32-weight and int8-fraction terms
    others = [abs(c) for k, c in enumerate(per_edge) if k != 3 * j + 2]
    assert coef[5 + 3 * j + 2] > 0.1 > max(others)  # the "fi" indicator of that edge (ridge shrinks it)
    lm = fit_block_model(t, CANDS, features="edge")
    errs = []
    for row in t.whole:
        pol = Policy({n: tuple(p) for n, p in row["policy"].items()})
        errs.append(lm.predict(pol) - row["ms"])
    assert np.sqrt(np.mean(np.square(errs))) < 0.05  # the const-only fit is off by ~0.15 ms rms
    c_errs = [fit_block_model(t, CANDS, features="const").predict(Policy({n: tuple(p) for n, p in r["policy"].items()}))
              - r["ms"] for r in t.whole]
    assert np.sqrt(np.mean(np.square(c_errs))) > 0.1
    with pytest.raises(Exception, match="unknown correction"):
        fit_correction(t, features="nope")


def test_cold_cache_units_run_and_are_not_faster_than_warm(blocknet):
    pytest.importorskip("onnxruntime")
    from lcpaq.errors import ConfigError
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.blocks import OrtTimer, block_plan
    from lcpaq.profiler.fidelity import cut_groups
    from lcpaq.profiler.onnx_export import export_qdq

    shape = _BlockNet.input_shape
    plan = block_plan(blocknet, shape)
    pol = Policy({n: CANDS[i % 3] for i, n in enumerate(plan.layers)})
    units = cut_groups(export_qdq(blocknet, pol, shape), blocknet, pol, plan.groups)
    st = MeasureSettings(warmup=2, number=5, repeat=5)
    x = np.zeros(shape, np.float32)
    warm, cold = OrtTimer(st, x), OrtTimer(st, x, flush_bytes=8 << 20)
    calls = []
    flush = cold._flush
    cold._flush = lambda: (calls.append(1), flush())
    w = {g: warm.time(u.onnx, u.feeds, cold=True) for g, u in units.items()}  # no buffer: stays warm
    c = {g: cold.time(u.onnx, u.feeds, cold=True) for g, u in units.items()}
    assert len(calls) == len(units) * st.number * st.repeat  # one flush before every timed call
    assert all(np.isfinite(v) and v > 0 for v in [*w.values(), *c.values()])
    # the whole unit's state (weights, ORT's own buffers) comes from memory after an 8 MB read
    assert sum(c.values()) >= sum(w.values())
    assert np.isfinite(cold.unit(units["layer.0"]))
    calls.clear()
    cold.time(units["fc"].onnx, units["fc"].feeds)  # whole-model path: never flushed
    assert not calls
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="flush_bytes"):
            OrtTimer(st, x, flush_bytes=bad)
    from lcpaq.profiler.blocks import profile_blocks

    table, lm = profile_blocks(blocknet, shape, CANDS, settings=MeasureSettings(warmup=1, number=1, repeat=3),
                               n_whole=2, anchors=0, flush_bytes=2 << 20)
    assert table.ms and all(np.isfinite(v) for v in table.ms.values()) and np.isfinite(lm.predict(pol))


def _matmul_chain(depth: int) -> bytes:
    """x (1, 3, 8, 8) -> flatten -> ``depth`` chained 192x192 MatMuls: work proportional to depth."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((192, 192), 1e-3, np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 192], np.int64), "shape")
    nodes, prev = [helper.make_node("Reshape", ["x", "shape"], ["h0"])], "h0"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i + 1}"]))
        prev = f"h{i + 1}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 192])], [w, shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_whole_row_interleaves_reference_and_policy_chunks_and_reports_their_ratio(monkeypatch):
    pytest.importorskip("onnxruntime")
    import lcpaq.profiler.backends.ort as ort_backend
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.blocks import OrtTimer

    light, heavy = _matmul_chain(2), _matmul_chain(40)
    log, real = [], ort_backend.session

    def logged(onnx_bytes, threads, *, spin=True):
        sess, tag = real(onnx_bytes, threads, spin=spin), "r" if onnx_bytes == light else "p"

        class Logged:
            def run(self, *a):
                log.append(tag)
                return sess.run(*a)
        return Logged()

    monkeypatch.setattr(ort_backend, "session", logged)
    st = MeasureSettings(warmup=2, number=3, repeat=4)
    timer = OrtTimer(st, np.zeros((1, 3, 8, 8), np.float32))
    log.clear()
    pol = Policy({"a": (8, 8)})
    row = timer.whole_row(pol, heavy, light, rounds=5, calls=3, settle=1)
    assert log == ["r", "p"] * 2 + (["r"] * 4 + ["p"] * 4) * 5  # warm-up, then settle + 3 timed per chunk
    assert set(row) == {"policy", "ms", "ref_ms", "rel"} and row["policy"] == {"a": [8, 8]}
    assert row["ms"] > row["ref_ms"] > 0 and row["rel"] > 2  # 20x the MatMuls (plus fixed per-call cost)
    log.clear()
    timer.whole_row(pol, light, light, rounds=2, calls=1, settle=0)  # call by call; reference session reused
    assert log == ["r"] * (2 * 2 + 2 * 2)
    assert timer.whole_row(pol, light, light)["rel"] == pytest.approx(1.0, rel=0.5)
