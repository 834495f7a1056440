"""`lcpaq search` end to end on the embedded model with a plain Ω table (no sensitivity run)."""

from __future__ import annotations

import json

import pytest

from lcpaq.cli import main
from lcpaq.policy import Policy


@pytest.fixture(scope="module")
def omega_file(tmp_path_factory):
    from lcpaq.graph import trace_named

    _, inv = trace_named("mnist_resnet")
    om = {n: {"w2a8": 1.0 * (i + 1), "w4a8": 0.2 * (i + 1), "w8a8": 0.01} for i, n in enumerate(inv.names)}
    path = tmp_path_factory.mktemp("sens") / "omega.json"
    path.write_text(json.dumps(om))
    return path, inv


def test_search_writes_a_policy_within_budget(omega_file, tmp_path, capsys):
    path, inv = omega_file
    out = tmp_path / "policy.json"
    rc = main(["search", "--model", "mnist_resnet", "--sensitivity", str(path), "--max-size-mb", "0.05",
               "--pin", "first,last", "--out", str(out), "--pareto", str(tmp_path / "front.png"), "--pareto-points", "4", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    pol = Policy.load(out, layer_names=inv.names)
    assert pol[inv.names[0]] == (8, 8) and pol[inv.names[-1]] == (8, 8)
    assert rep["costs"]["size_mb"] <= 0.05 and rep["status"] == "Optimal"
    for g in inv.tie_groups:
        assert len({pol[n][1] for n in g}) == 1
    assert (tmp_path / "front.png").stat().st_size > 1000 and (tmp_path / "front.csv").exists()
    assert rep["pareto"]["points"] >= 2


def test_search_table_output_and_mckp(omega_file, tmp_path, capsys):
    path, _ = omega_file
    rc = main(["search", "--model", "mnist_resnet", "--sensitivity", str(path), "--max-gbops", "0.3",
               "--max-size-mb", "0.05", "--solver", "mckp", "--out", str(tmp_path / "p.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer3.conv2" in text and "gbops" in text and "%" in text


@pytest.mark.parametrize("args, needle", [
    (["--max-size-mb", "0.001"], "minimum achievable"),
    (["--max-latency-ms", "1"], "--table"),
    (["--pin", "nosuchlayer", "--max-size-mb", "1"], "nosuchlayer"),
], ids=["infeasible", "latency-without-table", "bad-pin"])
def test_search_errors_exit_2(omega_file, tmp_path, capsys, args, needle):
    path, _ = omega_file
    rc = main(["search", "--model", "mnist_resnet", "--sensitivity", str(path), "--out", str(tmp_path / "p.json"),
               *args])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
