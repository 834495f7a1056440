"""Deploy: validate() on the embedded model with ORT, the CLI's --strict exit code and bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lcpaq.cli import main
from lcpaq.errors import ConfigError
from lcpaq.graph import trace
from lcpaq.models import get_model
from lcpaq.policy import Policy, parse_bits_list
from lcpaq.quant import quantizable_names

ROOT = Path(__file__).resolve().parents[1]
HW = ROOT / "hw_profiles" / "host-cpu-ort.toml"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A small real ORT table for the embedded model (w8a8 and fp32 only; quick settings)."""
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.run import profile

    hw = load_profile(HW)
    hw = dataclasses.replace(hw, settings=dataclasses.replace(hw.settings, warmup=1, number=2, repeat=3))
    m = get_model("mnist_resnet")
    inv = trace(m, (1, 1, 28, 28), name="mnist_resnet")
    out = tmp_path_factory.mktemp("tbl") / "t.jsonl"
    profile(inv, hw, out, candidates=parse_bits_list("w8a8,fp32"), isolate=False)
    return out


@pytest.fixture
def mixed_policy(tmp_path):
    names = quantizable_names(get_model("mnist_resnet"))
    pol = Policy({n: (32, 32) if i % 3 == 2 else (8, 8) for i, n in enumerate(names)})
    return pol, pol.save(tmp_path / "p.json")


def test_validate_reports_predicted_measured_and_error(table, mixed_policy, tmp_path):
    from lcpaq.deploy.validate import validate

    pol, _ = mixed_policy
    rep = validate("mnist_resnet", pol, HW, table, rounds=2, strict_threshold_pct=5.0)
    assert rep.predicted_ms > 0 and rep.measured_ms > 0 and rep.reference_ms > 0
    assert rep.reference == "fp32" and rep.whole_mode == "warm"  # a per-layer table names no reference
    assert rep.relative == pytest.approx(rep.measured_ms / rep.reference_ms, rel=0.25)
    assert np.isnan(rep.table_reference_ms) and np.isnan(rep.error_drift_free_pct)
    assert rep.error_pct == pytest.approx((rep.predicted_ms - rep.measured_ms) / rep.measured_ms * 100)
    assert rep.flagged == (abs(rep.error_pct) > 5.0)
    assert len(rep.round_medians_ms) == 2 and rep.metric == "thread_cpu"
    assert any("measured_ms" in v for k, v in rep.layers.items() if k in pol)  # per-layer breakdown
    assert rep.output_check["top1_agreement"] >= 0.9
    d = json.loads(rep.save(tmp_path / "v.json").read_text())
    assert d["schema"] == "lcpaq.validation/2" and d["predicted_ms"] == rep.predicted_ms
    png = rep.plot(tmp_path / "v.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("strict,threshold,code", [(True, 1e-6, 1), (False, 1e-6, 0), (True, 1e6, 0)],
                         ids=["strict-over", "lenient-over", "strict-within"])
def test_cli_validate_strict_exit_code(table, mixed_policy, tmp_path, strict, threshold, code):
    _, path = mixed_policy
    args = ["validate", "--model", "mnist_resnet", "--policy", str(path), "--hw", str(HW), "--table", str(table),
            "--threshold-pct", str(threshold), "--rounds", "1", "--out", str(tmp_path / "o")]
    assert main(args + (["--strict"] if strict else [])) == code
    assert (tmp_path / "o" / "validation.json").is_file()
    assert (tmp_path / "o" / "predicted_vs_measured.png").is_file()


def test_validate_times_against_the_tables_reference_and_divides_the_drift_out(table):
    """A table that names its reference (block / segment tables: uniform W8A8, its time then, its
    timing mode): validate times the policy against that model, in that mode, and reports the
    measurement in the table's time (ratio x the reference's time then)."""
    from lcpaq.deploy.validate import validate
    from lcpaq.profiler.fidelity import calibrate_to_references
    from lcpaq.profiler.predict import latency_model

    m = get_model("mnist_resnet")
    names = quantizable_names(m)
    lm = latency_model(table, trace(m, (1, 1, 28, 28), name="mnist_resnet"), [(8, 8), (32, 32)])
    then = 0.05
    lm_ref = dataclasses.replace(lm, meta={**lm.meta, "reference": {"bits": [8, 8], "ms": then, "whole": "stream"}})
    w8 = Policy.uniform(names, 8, 8)
    rep = validate("mnist_resnet", w8, HW, lm_ref, rounds=2)
    assert rep.reference == "w8a8" and rep.whole_mode == "stream" and rep.table_reference_ms == then
    # the policy is the reference model itself: their interleaved ratio is ~1 (fp32 would not be)
    assert rep.relative == pytest.approx(1.0, abs=0.1)
    assert rep.measured_table_ms == pytest.approx(rep.relative * then)
    assert rep.error_drift_free_pct == pytest.approx((rep.predicted_ms / rep.measured_table_ms - 1) * 100)
    assert any("table was made" in n for n in rep.notes)
    warm = validate("mnist_resnet", w8, HW, lm_ref, rounds=1, whole="warm")
    assert warm.whole_mode == "warm" and any("two latency definitions" in n for n in warm.notes)
    with pytest.raises(ConfigError, match="stream"):
        validate("mnist_resnet", w8, HW, lm_ref, rounds=1, whole="cold")
    # calibrated to references measured now: nothing left to rescale, so no table reference
    cal = calibrate_to_references(lm_ref, {(32, 32): 0.1, (8, 8): 0.08})
    assert "reference" not in cal.meta


def test_cli_profile_references_make_validate_compare_in_the_tables_time(tmp_path, mixed_policy):
    """`lcpaq profile --references` brackets the units with the uniform W8A8 / fp32 whole models;
    the table then names W8A8 as its reference and validate times against it."""
    from lcpaq.deploy.validate import validate
    from lcpaq.profiler.predict import latency_model
    from lcpaq.profiler.references import table_references
    from lcpaq.profiler.table import read_table

    out = tmp_path / "t.jsonl"
    assert main(["profile", "--hw", str(HW), "--model", "mnist_resnet", "--bits", "w8a8,fp32", "--out", str(out),
                 "--references"]) == 0
    refs = table_references(out)
    assert set(refs) == {"w8a8", "fp32"} and 0 < refs["w8a8"] < 10 * refs["fp32"]
    assert read_table(out).get("__whole__|w8a8")["kernel"] == "ort:whole-model"
    m = get_model("mnist_resnet")
    lm = latency_model(out, trace(m, (1, 1, 28, 28), name="mnist_resnet"), [(8, 8), (32, 32)])
    assert lm.meta["reference"]["ms"] == pytest.approx(refs["w8a8"])
    rep = validate("mnist_resnet", mixed_policy[0], HW, lm, rounds=1, per_layer=False)
    assert rep.reference == "w8a8" and rep.table_reference_ms == pytest.approx(refs["w8a8"])
    assert np.isfinite(rep.error_drift_free_pct)


def test_cli_validate_bad_whole_mode_exit_2(table, mixed_policy, tmp_path, capsys):
    _, path = mixed_policy
    rc = main(["validate", "--model", "mnist_resnet", "--policy", str(path), "--hw", str(HW), "--table", str(table),
               "--whole", "cold", "--out", str(tmp_path / "o")])
    assert rc == 2 and "warm, stream" in capsys.readouterr().err


def test_cli_validate_missing_table_entries_exit_2(table, tmp_path, capsys):
    names = quantizable_names(get_model("mnist_resnet"))
    p = Policy.uniform(names, 4, 8).save(tmp_path / "w4.json")  # the table has only w8a8 and fp32
    rc = main(["validate", "--model", "mnist_resnet", "--policy", str(p), "--hw", str(HW), "--table", str(table)])
    assert rc == 2
    assert "w4a8" in capsys.readouterr().err


def test_cli_bad_hw_profile_exit_2(table, mixed_policy, tmp_path, capsys):
    _, path = mixed_policy
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nname = "x"\n[backend]\nname = "nosuch"\n[candidates]\nbits = ["w8a8"]\n')
    rc = main(["validate", "--model", "mnist_resnet", "--policy", str(path), "--hw", str(bad), "--table", str(table)])
    assert rc == 2
    assert "nosuch" in capsys.readouterr().err


def test_cli_export_onnx_runs(tmp_path, mixed_policy):
    _, path = mixed_policy
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "mnist_resnet", "--policy", str(path), "--format", "onnx",
                 "--out", str(out), "--json"]) == 0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {n.op_type for n in __import__("onnx").load(out).graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert sess.get_inputs()[0].name == "x"


def test_cli_export_bad_format_exit_2(tmp_path, mixed_policy):
    _, path = mixed_policy
    assert main(["export", "--model", "mnist_resnet", "--policy", str(path), "--format", "tflite",
                 "--out", str(tmp_path / "m")]) == 2
