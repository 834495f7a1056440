"""Whole-model reference rows of a TVM table (lcpaq.profiler.backends.tvm_check): written as
ordinary table rows, read back by ``table_references``, ignored by the latency model. No TVM needed."""

from __future__ import annotations

import pytest

from lcpaq.graph import trace
from lcpaq.profiler.backend import MeasureSettings
from lcpaq.profiler.backends.tvm_check import (
    record_references,
    reference_key,
    reference_rows,
    table_references,
)
from lcpaq.profiler.predict import latency_model
from lcpaq.profiler.table import TableWriter, read_table
from lcpaq.testing.models import TinyResNet


def _timed(w8a8: float, fp32: float) -> dict[str, float]:
    return {"w8a8": w8a8, "fp32": fp32, "w8a8_wall": w8a8 * 1.01, "fp32_wall": fp32 * 1.01}


def _unit_table(tmp_path):
    """A complete fake table of TinyResNet (w8a8, fp32) through the product path."""
    from lcpaq.profiler.backends.fake import FakeBackend  # noqa: F401 - registers "fake"
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.run import profile

    (tmp_path / "hw.toml").write_text('[device]\nname = "t"\n[backend]\nname = "fake"\nthreads = 1\n'
                                      '[candidates]\nbits = ["w8a8", "fp32"]\n')
    inv = trace(TinyResNet(), TinyResNet.input_shape, name="tiny")
    return inv, profile(inv, load_profile(tmp_path / "hw.toml"), tmp_path / "t.jsonl", isolate=False)


def test_reference_rows_round_trip_and_leave_the_prediction_alone(tmp_path):
    from lcpaq.cli.profiler import checked_rows

    inv, path = _unit_table(tmp_path)
    assert table_references(path) == {}  # a table profiled without references (every older one)
    pol_pairs = [(8, 8), (32, 32)]
    before = latency_model(path, inv, pol_pairs)
    rows = reference_rows(_timed(8.0, 20.0), _timed(9.0, 21.0), model_name="tiny", versions={"tvm": "x"},
                          settings=MeasureSettings(warmup=1, number=3, repeat=5))
    record_references(path, rows)
    t = read_table(path)
    assert table_references(t) == {"w8a8": pytest.approx(8.5), "fp32": pytest.approx(20.5)}
    row = t.get(reference_key("w8a8"))
    assert (row["start_ms"], row["end_ms"], row["p10_ms"], row["p90_ms"]) == (8.0, 9.0, 8.0, 9.0)
    assert row["timing"]["number"] == 3 and row["model"] == "tiny"
    checked_rows(t)  # the CLI's row checks (predict, validate, tables show) accept them
    after = latency_model(path, inv, pol_pairs)
    assert after.unary == before.unary and after.pairwise == before.pairwise
    # ... but the model names the reference, so validate times against it and rescales (table time)
    assert "reference" not in before.meta
    assert after.meta["reference"] == {"bits": [8, 8], "ms": pytest.approx(8.5), "whole": "warm"}
    # a later measurement supersedes the earlier (rows are append-only); an error row is no reference
    record_references(path, reference_rows(_timed(7.0, 18.0), _timed(7.0, 18.0), model_name="tiny", versions={}))
    assert table_references(path)["w8a8"] == pytest.approx(7.0)
    with TableWriter(path, read_table(path).header) as tw:
        tw.append({**read_table(path).get(reference_key("fp32")), "error": "crashed"})
    assert table_references(path) == {"w8a8": pytest.approx(7.0)}
    # the header is untouched: the table still resumes with its own setup
    assert read_table(path).header == t.header
