"""Deploy: `lcpaq demo --quick` end to end (every stage real), report folder complete."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lcpaq.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    from lcpaq.kernels import status

    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in s["rows"]] == ["fp32", "W8A8", "mixed"]
    for r in s["rows"]:
        assert r["predicted_ms"] > 0 and r["measured_ms"] > 0 and r["size_kb"] > 0
    mixed = s["rows"][2]
    assert mixed["predicted_ms"] <= s["budgets"]["max_latency_ms"] * (1 + 1e-6)
    assert mixed["size_kb"] <= s["budgets"]["max_size_mb"] * 1e3 * (1 + 1e-6)
    kernels = s["backend"] == "lcpaq-kernels"
    assert kernels == status().loaded
    table = "latency_segments.json" if kernels else "latency_blocks.json"
    for f in ("policy.json", table, "sensitivity.json", "pareto.png", "predicted_vs_measured.png",
              "model_qdq.onnx", "validation_mixed.json", "summary.md"):
        assert (out / f).is_file(), f
    assert "mixed" in capsys.readouterr().out
    # both tables were fitted against uniform W8A8: validate timed every row against it and rescaled
    val = json.loads((out / "validation_mixed.json").read_text())
    assert val["reference"] == "w8a8" and val["table_reference_ms"] > 0
    assert val["measured_table_ms"] == pytest.approx(val["relative"] * val["table_reference_ms"])
    for r in s["rows"]:
        assert np.isfinite(r["error_drift_free_pct"])
    # the report's table predicts a policy that uses fewer candidates than it was profiled at
    from lcpaq.models import get_model
    from lcpaq.policy import Policy as _Policy
    from lcpaq.quant import quantizable_names

    w8 = _Policy.uniform(quantizable_names(get_model("mnist_resnet")), 8, 8).save(tmp_path / "w8.json")
    table_file = out / table
    assert main(["predict", "--table", str(table_file), "--model", "mnist_resnet", "--policy", str(w8)]) == 0
    if kernels:  # segment units: every key of the embedded model timed, the model additive (the ILP sees it all)
        from lcpaq.latency import LatencyModel
        from lcpaq.policy import Policy
        from lcpaq.profiler.backends.kernels_check import SegmentTable, fit_segment_model

        assert "segment" in s["stages"]["profile"]
        t = SegmentTable.load(out / "latency_segments.json")
        lm = fit_segment_model(t, [(2, 8), (4, 8), (8, 8), (32, 32)])
        assert isinstance(lm, LatencyModel) and not lm.groups
        assert lm.predict(Policy.from_dict(json.loads((out / "policy.json").read_text()))) == \
            pytest.approx(mixed["predicted_ms"], rel=1e-6)
        # the correction is small beside the units: they carry the work
        assert mixed["raw_table_predicted_ms"] > 0.7 * mixed["predicted_ms"]


def test_block_units_cut_from_the_deployed_graph_run_on_real_inputs():
    """The ORT demo profiles blocks on export_policy's graph (what validate deploys): its dynamic batch
    dimension must become 1 in the unit feeds (a 0-size batch ran empty units), and the block
    units must hold every node of that graph."""
    import functools

    import numpy as np
    import onnx
    import onnxruntime as ort

    from lcpaq.deploy.qdq import export_policy, torch_to_onnx
    from lcpaq.models import get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.blocks import block_groups
    from lcpaq.profiler.fidelity import cut_groups, prepare_for_cutting
    from lcpaq.quant import quantizable_names

    m = get_model("mnist_resnet").eval()
    names = quantizable_names(m)
    pol = Policy({n: [(8, 8), (32, 32), (4, 8)][i % 3] for i, n in enumerate(names)})
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    exp = functools.partial(export_policy, float_onnx=torch_to_onnx(m, (1, 1, 28, 28)))
    b = exp(m, pol, (1, 1, 28, 28), [x])
    assert b == export_policy(m, pol, (1, 1, 28, 28), [x])  # the cached float graph changes nothing
    units = cut_groups(b, m, pol, block_groups(m))
    p = onnx.load_from_string(b)
    prepare_for_cutting(p)
    assert sum(len(onnx.load_from_string(u.onnx).graph.node) for u in units.values()) == len(p.graph.node)
    for u in units.values():
        assert all(v.size > 0 and v.shape[0] == 1 for v in u.feeds.values()), u.layer
        out = ort.InferenceSession(u.onnx, providers=["CPUExecutionProvider"]).run(None, dict(u.feeds))
        assert all(o.size > 0 for o in out)


def test_demo_quick_on_ort_predicts_with_the_block_model(tmp_path):
    """`lcpaq demo --quick --backend ort`: the block table covers every block context of the embedded
    model, its units are real work (not empty graphs), and the chosen policy's *full* block
    prediction (groups included, which the ILP does not see) meets the latency budget."""
    from lcpaq.profiler.blocks import BlockTable

    out = tmp_path / "report"
    assert main(["demo", "--quick", "--backend", "ort", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["backend"] == "ort" and "block" in s["stages"]["profile"]
    t = BlockTable.load(out / "latency_blocks.json")
    for b, ctx in t.plan.context.items():
        assert len(t.keys[b]) == 2 ** len(ctx), b
    assert len(t.whole) == 24 + 6  # quick: 24 designed policies + 3 rows each of uniform fp32 / int8
    w8 = next(r for r in s["rows"] if r["policy"] == "W8A8")
    # whole - sum(blocks) is a small correction, not the model: the units carry the work
    from lcpaq.policy import Policy

    blocks = sum(t.block_ms(Policy.uniform(t.plan.layers, 8, 8)).values())
    assert blocks > 0.5 * w8["measured_ms"]
    mixed = s["rows"][2]
    assert mixed["predicted_ms"] <= s["budgets"]["max_latency_ms"] * (1 + 1e-6)
    assert [r["in_sample"] for r in s["rows"]] == [True, True, False]  # uniform rows anchor the correction
