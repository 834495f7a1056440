"""Whole-model QDQ export and units cut from the mixed graph (lcpaq.profiler.onnx_export/fidelity)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from lcpaq.policy import Policy  # noqa: E402
from lcpaq.profiler.fidelity import (  # noqa: E402
    ContextTable,
    calibrate_to_references,
    cut_units,
    fit_latency_model,
    node_owners,
    random_class_policy,
)
from lcpaq.profiler.onnx_export import (  # noqa: E402
    WEIGHT_QMAX_8BIT,
    export_qdq,
    quantizable_names,
)
from lcpaq.testing.models import TinyResNet  # noqa: E402

SHAPE = TinyResNet.input_shape


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding matters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def _run(b: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(b, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _rel_err(model, b, x) -> float:
    ref = model(torch.from_numpy(x)).detach().numpy()
    return float(np.abs(_run(b, x) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("w_bits", [2, 4, 6, 8], ids=lambda b: f"w{b}a8")
def test_export_weights_on_the_bit_grid(model, x, w_bits):
    names = quantizable_names(model)
    b = export_qdq(model, Policy.uniform(names, w_bits, 8), SHAPE, calib=[x])
    proto = onnx.load_from_string(b)
    qmax = WEIGHT_QMAX_8BIT if w_bits == 8 else 2 ** (w_bits - 1) - 1
    int8_weights = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8
                    and len(i.dims) >= 2]
    assert len(int8_weights) == len(names)
    for w in int8_weights:
        assert np.abs(w.astype(int)).max() <= qmax
    assert np.abs(np.concatenate([w.ravel() for w in int8_weights]).astype(int)).max() == qmax


def test_export_error_shrinks_with_bits_and_fp32_is_exact(model, x):
    names = quantizable_names(model)
    errs = {w: _rel_err(model, export_qdq(model, Policy.uniform(names, w, 8), SHAPE, calib=[x]), x)
            for w in (2, 8)}
    assert errs[8] < errs[2]
    assert errs[8] < 0.1
    fp = export_qdq(model, Policy.uniform(names, 32, 32), SHAPE)
    assert _rel_err(model, fp, x) < 1e-4


def test_low_activation_bits_use_fewer_levels(model, x):
    names = quantizable_names(model)
    e8 = _rel_err(model, export_qdq(model, Policy.uniform(names, 8, 8), SHAPE, calib=[x]), x)
    e4 = _rel_err(model, export_qdq(model, Policy.uniform(names, 8, 4), SHAPE, calib=[x]), x)
    assert e4 > e8


@pytest.mark.parametrize("kind", ["int8", "fp32", "mixed"])
def test_cut_units_partition_the_graph_and_run(model, x, kind):
    names = quantizable_names(model)
    pol = {"int8": Policy.uniform(names, 4, 8), "fp32": Policy.uniform(names, 32, 32),
           "mixed": Policy({n: (32, 32) if i % 2 else (8, 8) for i, n in enumerate(names)})}[kind]
    b = export_qdq(model, pol, SHAPE, calib=[x])
    units = cut_units(b, model, pol)
    assert set(units) == set(names)
    n_nodes = sum(len(onnx.load_from_string(u.onnx).graph.node) for u in units.values())
    assert n_nodes == len(onnx.load_from_string(b).graph.node)  # every node in exactly one unit
    for u in units.values():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        outs = ort.InferenceSession(u.onnx, so, providers=["CPUExecutionProvider"]).run(None, dict(u.feeds))
        assert outs
    if kind == "mixed":  # a boundary shows up in the dtypes: fp32 units see uint8 neighbours
        assert any("u8" in u.in_dtypes for n, u in units.items() if pol[n] == (32, 32) and n != names[0])
    # the residual Add and the pooling are inside units, never alone
    ops = [op for u in units.values() for op in u.ops]
    assert "Add" in ops and "GlobalAveragePool" in ops


def test_keys_are_model_independent_of_weight_bits(model, x):
    names = quantizable_names(model)
    k4 = {n: u.key for n, u in cut_units(export_qdq(model, Policy.uniform(names, 4, 8), SHAPE), model,
                                          Policy.uniform(names, 4, 8)).items()}
    k8 = {n: u.key for n, u in cut_units(export_qdq(model, Policy.uniform(names, 8, 8), SHAPE), model,
                                          Policy.uniform(names, 8, 8)).items()}
    kf = {n: u.key for n, u in cut_units(export_qdq(model, Policy.uniform(names, 32, 32), SHAPE), model,
                                          Policy.uniform(names, 32, 32)).items()}
    assert k4 == k8  # same int8 kernel and graph: one table entry serves w2..w8
    assert all(kf[n] != k8[n] for n in names)


def test_additive_model_matches_exact_units_and_calibrates(model, x):
    """With a deterministic 'measurement' (node count), the fitted model reproduces the exact
    per-policy unit sums on uniform policies and is calibrated onto given references."""
    names = quantizable_names(model)
    cands = [(32, 32), (8, 8), (4, 8)]
    ct = ContextTable()

    def fake_ms(u):
        return float(len(onnx.load_from_string(u.onnx).graph.node))

    rng = np.random.default_rng(0)
    pols = [Policy.uniform(names, 32, 32), Policy.uniform(names, 8, 8)]
    pols += [random_class_policy(names, rng, cands) for _ in range(6)]
    units_of = {}
    for p in pols:
        units_of[p] = cut_units(export_qdq(model, p, SHAPE, calib=[x]), model, p)
        ct.add(units_of[p], p, fake_ms)
    lm = fit_latency_model(ct, cands)
    for p in pols[:2]:
        assert lm.predict(p) == pytest.approx(ct.predict_exact(units_of[p]))
    assert any(v for tab in lm.pairwise.values() for v in tab.values())  # transitions are seen
    refs = {(32, 32): 5.0, (8, 8): 3.0}
    cal = calibrate_to_references(lm, refs)
    for pair, ms in refs.items():
        assert cal.predict(Policy.uniform(names, *pair)) == pytest.approx(ms)


def test_every_node_has_an_owner(model, x):
    names = quantizable_names(model)
    pol = Policy({n: (32, 32) if i % 2 else (8, 8) for i, n in enumerate(names)})
    proto = onnx.load_from_string(export_qdq(model, pol, SHAPE, calib=[x]))
    anchors = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    owners = node_owners(proto, anchors)
    assert all(n.name in owners for n in proto.graph.node)


def test_context_table_round_trip_and_schema_check(tmp_path):
    from lcpaq.errors import TableError

    ct = ContextTable({"int8:abc": 1.5}, {"conv": [("int8", ("fp32",), 1.5)]}, {"conv": ("fc",)})
    ct.save(tmp_path / "ct.json")
    assert ContextTable.load(tmp_path / "ct.json") == ct
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(TableError, match="lcpaq.context_table/1"):
        ContextTable.load(tmp_path / "bad.json")


def test_profile_context_predicts_uniform_references_on_ort(model):
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.fidelity import profile_context

    cands = [(32, 32), (4, 8), (8, 8)]
    ct, lm = profile_context(model, SHAPE, cands, train=2, settings=MeasureSettings(warmup=1, number=3, repeat=3))
    names = quantizable_names(model)
    assert set(lm.unary) == set(names)
    # tiny units minus the empty-graph overhead may be ~0 on a loaded VM: finite, positive in sum
    assert all(np.isfinite(v) for v in ct.ms.values()) and sum(ct.ms.values()) > 0
    pol = random_class_policy(names, np.random.default_rng(5), cands)
    assert lm.predict(pol) > 0
    # 4-bit and 8-bit weights share ORT's int8 kernel: one unary cost per class
    assert all(lm.unary[n][(4, 8)] == lm.unary[n][(8, 8)] for n in names)


def test_fit_whole_model_recovers_layer_and_edge_costs():
    from lcpaq.profiler.fidelity import fit_whole_model, whole_training_policies

    names = ["a", "b", "c", "d"]
    edges = [("a", "b"), ("b", "c"), ("b", "d"), ("c", "d")]
    cands = [(32, 32), (4, 8), (8, 8)]
    c0, gain, cost = 10.0, {"a": -2.0, "b": -3.0, "c": -1.0, "d": -0.5}, dict(zip(edges, [0.5, 0.7, 0.0, 0.2], strict=True))

    def truth(pol):
        i8 = {n: pol[n] != (32, 32) for n in names}
        return c0 + sum(gain[n] for n in names if i8[n]) + sum(v for (p, q), v in cost.items() if i8[p] != i8[q])

    pols = whole_training_policies(names, cands, np.random.default_rng(0), 3)
    assert len(pols) == 2 + 2 * len(names) + 3
    lm = fit_whole_model(pols, [truth(p) / 2.0 for p in pols], edges, cands, ref_ms=2.0)  # times relative to a 2 ms ref
    rng = np.random.default_rng(7)
    for _ in range(5):
        pol = random_class_policy(names, rng, cands)
        assert lm.predict(pol) == pytest.approx(truth(pol), abs=1e-3)
    assert lm.unary["b"][(4, 8)] - lm.unary["b"][(32, 32)] == pytest.approx(-3.0, abs=1e-3)
    assert lm.pairwise[("a", "b")][((32, 32), (8, 8))] == pytest.approx(0.5, abs=1e-3)
    assert all(v >= 0 for tab in lm.pairwise.values() for v in tab.values())  # convert ops never save time


def test_profile_whole_on_ort_predicts_its_training_references(model):
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.fidelity import profile_whole

    cands = [(32, 32), (8, 8)]
    lm, rows = profile_whole(model, SHAPE, cands, n_random=1, settings=MeasureSettings(warmup=1, number=3, repeat=3))
    names = quantizable_names(model)
    assert len(rows) == 3 + 2 * len(names) and all(r["ms"] > 0 and r["ref_ms"] > 0 for r in rows)
    assert set(lm.unary) == set(names) and lm.pairwise
    fp32 = Policy.uniform(names, 32, 32)
    assert lm.predict(fp32) == pytest.approx(rows[0]["ms"], rel=0.5)  # fit through noisy data, same order
