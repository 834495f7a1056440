"""`lcpaq sensitivity` on the embedded model and mnist5k with few probes; bad input exits 2."""

from __future__ import annotations

import json

from lcpaq.cli import main
from lcpaq.models import EMBEDDED
from lcpaq.sensitivity import SensitivityReport


def test_cli_sensitivity_embedded_smoke(tmp_path, capsys):
    out = tmp_path / "sens.json"
    rc = main(["sensitivity", "--model", EMBEDDED, "--data", "mnist5k", "--probes", "3", "--tol", "0.5",
               "--batch-size", "8", "--batches", "1", "--bits", "w4a8,w8a8,fp32", "--seed", "1",
               "--out", str(out)])
    assert rc == 0
    rep = SensitivityReport.load(out)
    assert rep.model == EMBEDDED and rep.data == "mnist5k" and rep.seed == 1 and rep.probes == 3
    assert rep.method == "hutchinson" and rep.meta["samples"] == 8
    assert [f"{w}" for w, _ in rep.candidates] == ["4", "8", "32"]
    assert "conv1" in rep.layers and "fc" in rep.layers
    printed = capsys.readouterr().out
    assert "Tr(H_w)" in printed and "wrote" in printed
    d = json.loads(out.read_text())
    assert set(d["layers"]["fc"]["omega"]) == {"w4a8", "w8a8", "fp32"}


def test_cli_bad_input_exits_2(tmp_path, capsys):
    rc = main(["sensitivity", "--model", EMBEDDED, "--data", "nosuchdata", "--out", str(tmp_path / "s.json")])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    rc = main(["sensitivity", "--model", EMBEDDED, "--data", "mnist5k", "--bits", "w9a8",
               "--out", str(tmp_path / "s.json")])
    assert rc == 2
