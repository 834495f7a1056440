"""Deploy: `lcpaq demo --quick` end to end (every stage real), report folder complete."""

from __future__ import annotations

import json

from lcpaq.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in s["rows"]] == ["fp32", "W8A8", "mixed"]
    for r in s["rows"]:
        assert r["predicted_ms"] > 0 and r["measured_ms"] > 0 and r["size_kb"] > 0
    mixed = s["rows"][2]
    assert mixed["predicted_ms"] <= s["budgets"]["max_latency_ms"] * (1 + 1e-6)
    assert mixed["size_kb"] <= s["budgets"]["max_size_mb"] * 1e3 * (1 + 1e-6)
    for f in ("policy.json", "latency_table.jsonl", "sensitivity.json", "pareto.png", "predicted_vs_measured.png",
              "model_qdq.onnx", "validation_mixed.json", "summary.md"):
        assert (out / f).is_file(), f
    assert "mixed" in capsys.readouterr().out
