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


def test_whole_model_vs_table_gives_finite_errors_per_policy(tmp_path):
    from lcpaq.profiler.backends.tvm_check import whole_vs_table
    from lcpaq.profiler.run import profile
    from lcpaq.quant import quantizable_names

    prof = tmp_path / "tvm.toml"
    prof.write_text('[device]\nname = "t"\n[backend]\nname = "tvm"\nthreads = 1\n'
                    '[candidates]\nbits = ["w8a8", "fp32"]\n[measure]\nwarmup = 1\nnumber = 5\nrepeat = 3\n'
                    '[tvm]\ntrials = 0\n')
    hw = load_profile(prof)
    model = TinyResNet(width=16).eval()
    shape = model.input_shape
    table = profile(trace(model, shape, name="tiny"), hw, tmp_path / "tiny.jsonl", isolate=False)
    names = quantizable_names(model)
    mixed = Policy({n: ((32, 32) if i % 2 else (8, 8)) for i, n in enumerate(names)})
    pols = {"mixed": mixed, "int8": Policy.uniform(names, 8, 8)}
    st = MeasureSettings(warmup=2, number=20, repeat=3, threads=1, metric="thread_cpu")
    res = whole_vs_table(model, shape, hw, table, pols, rounds=2, settings=st, model_name="tiny")
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"mixed", "int8"}
    for r in rows.values():
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0
        for col in ("error_pct", "error_wall_pct", "error_calibrated_pct"):
            assert math.isfinite(r[col])
        assert r["error_pct"] == pytest.approx(100 * (r["predicted_ms"] / r["measured_ms"] - 1))
    assert rows["mixed"]["fp32_layers"] == len(names) // 2
    # calibrated on the uniform W8A8 whole model of this run: for that same policy the prediction
    # is the reference itself, rescaled by the drift of the policy's own interleaved rounds
    assert rows["int8"]["predicted_calibrated_ms"] == pytest.approx(rows["int8"]["ref_ms"], rel=1e-6)
    assert res["raw"]["max_abs"] >= res["raw"]["median_abs"] >= 0
    # every deployment computes what the fake-quant model computes
    for k, b in res["build"].items():
        assert b["top1_agreement"] == 1.0, k
        assert b["max_abs_err"] <= 0.1 * max(b["ref_abs_max"], 1e-6), k
    assert np.isfinite(res["uniform"]["fp32"]["measured_ms"])
