"""TVM predict-vs-measure path (lcpaq.profiler.backends.tvm_check): a tiny residual model, an
untuned TVM table of it, two mixed policies built whole by TVM and timed against the table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests._tvm_util import require_tvm

require_tvm()

from lcpaq.graph import trace  # noqa: E402
from lcpaq.policy import Policy  # noqa: E402
from lcpaq.profiler.backend import MeasureSettings  # noqa: E402
from lcpaq.profiler.hwprofile import load_profile  # noqa: E402
from lcpaq.testing.models import TinyResNet  # noqa: E402

pytestmark = pytest.mark.tvm


def _tiny_setup(tmp_path):
    prof = tmp_path / "tvm.toml"
    prof.write_text('[device]\nname = "t"\n[backend]\nname = "tvm"\nthreads = 1\n'
                    '[candidates]\nbits = ["w8a8", "fp32"]\n[measure]\nwarmup = 1\nnumber = 5\nrepeat = 3\n'
                    '[tvm]\ntrials = 0\n')
    model = TinyResNet(width=16).eval()
    return load_profile(prof), model, model.input_shape


def test_whole_model_vs_table_gives_finite_errors_per_policy(tmp_path):
    """A table without whole-model references: rows timed against the W8A8 build (rel), scored in
    this run's reference time ("run" primary); a table with them (profiled bracketed by the
    references): scored in the table's time too ("table" primary), both on the same builds."""
    from lcpaq.cli.profiler import checked_rows
    from lcpaq.profiler.backends.tvm_check import (
        REFERENCES,
        build_whole,
        profile_with_references,
        reference_key,
        table_references,
        whole_vs_table,
    )
    from lcpaq.profiler.run import profile
    from lcpaq.profiler.table import read_table
    from lcpaq.quant import quantizable_names

    hw, model, shape = _tiny_setup(tmp_path)
    table = profile(trace(model, shape, name="tiny"), hw, tmp_path / "tiny.jsonl", isolate=False)
    assert table_references(table) == {}
    names = quantizable_names(model)
    mixed = Policy({n: ((32, 32) if i % 2 else (8, 8)) for i, n in enumerate(names)})
    pols = {"mixed": mixed, "int8": Policy.uniform(names, 8, 8)}
    st = MeasureSettings(warmup=2, number=20, repeat=3, threads=1, metric="thread_cpu")
    res = whole_vs_table(model, shape, hw, table, pols, settings=st, model_name="tiny")
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"mixed", "int8"} and res["primary"] == "run" and "table" not in res
    for r in rows.values():
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0 and r["rel"] > 0
        for col in ("error_pct", "error_run_pct", "error_wall_pct", "error_calibrated_pct"):
            assert math.isfinite(r[col])
        assert r["error_pct"] == pytest.approx(100 * (r["predicted_ms"] / r["measured_ms"] - 1))
        # measured in the run's reference time: rel x the median W8A8 chunk time of the run
        assert r["measured_run_ms"] == pytest.approx(r["rel"] * res["references"]["run_w8a8_ms"])
    assert rows["mixed"]["fp32_layers"] == len(names) // 2
    # calibrated on this run's W8A8 time: for that same policy the prediction is the reference itself
    assert rows["int8"]["predicted_calibrated_ms"] == pytest.approx(res["references"]["run_w8a8_ms"], rel=1e-6)
    # the int8 policy is a second build of the reference: their ratio is ~1, the mixed one's is not
    assert rows["int8"]["rel"] == pytest.approx(1.0, abs=0.25)
    assert rows["mixed"]["rel"] > rows["int8"]["rel"]
    assert res["raw"]["max_abs"] >= res["raw"]["median_abs"] >= 0
    # every deployment computes what the fake-quant model computes
    for k, b in res["build"].items():
        assert b["top1_agreement"] == 1.0, k
        assert b["max_abs_err"] <= 0.1 * max(b["ref_abs_max"], 1e-6), k
    assert np.isfinite(res["uniform"]["fp32"]["measured_ms"])

    # a table profiled with whole-model references: two rows read like any other (the CLI's checks
    # pass, the latency model ignores them); the prediction is then scored in the table's time
    deps, _ = build_whole(model, shape, hw, {k: Policy.uniform(names, *p) for k, p in REFERENCES.items()})
    out = tmp_path / "tiny_ref.jsonl"
    info = profile_with_references(trace(model, shape, name="tiny"), model, shape, hw, out, deps=deps,
                                   model_name="tiny", settings=st)
    t = read_table(out)
    refs = table_references(t)
    assert set(refs) == {"w8a8", "fp32"} and refs["fp32"] > refs["w8a8"] > 0
    row = t.get(reference_key("w8a8"))
    assert row["median_ms"] == pytest.approx((info["start"]["w8a8"] + info["end"]["w8a8"]) / 2)
    assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and (row["w_bits"], row["a_bits"]) == (8, 8)
    assert len(checked_rows(t)) == len(read_table(table)) + 2
    res2 = whole_vs_table(model, shape, hw, out, pols, settings=st, model_name="tiny", deps=deps)
    assert res2["primary"] == "table" and res2["table"]["max_abs"] >= res2["table"]["median_abs"]
    for r in res2["rows"]:
        assert r["measured_table_ms"] == pytest.approx(r["rel"] * refs["w8a8"])
        assert r["error_table_pct"] == pytest.approx(100 * (r["predicted_ms"] / r["measured_table_ms"] - 1))
    assert res2["uniform"]["fp32"]["in_table_time_ms"] > 0
