"""Foundation CLI: models / inspect / cost, --json, and exit code 2 with a message on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lcpaq.cli import main as cli_main
from lcpaq.policy import Policy

# execution order: each block computes its downsample (identity) branch first
EMB_LAYERS = ["conv1", "layer1.conv1", "layer1.conv2", "layer2.downsample.0", "layer2.conv1",
              "layer2.conv2", "layer3.downsample.0", "layer3.conv1", "layer3.conv2", "fc"]


def test_models_json(capsys):
    assert cli_main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"name": "mnist_resnet", "input_shape": [1, 1, 28, 28], "embedded": True}
    assert "resnet18" in {r["name"] for r in rows}


def test_inspect_table_and_json(capsys):
    assert cli_main(["inspect", "--model", "mnist_resnet", "--json"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert [ly["name"] for ly in inv["layers"]] == EMB_LAYERS
    assert inv["schema"] == "lcpaq.inventory/1" and inv["tie_groups"]
    assert cli_main(["inspect", "--model", "mnist_resnet", "--input-size", "2x1x32x32"]) == 0
    out = capsys.readouterr().out
    assert "10 quantizable layers" in out and "2x1x32x32" in out and "tie 0:" in out


def test_inspect_resnet18_totals(capsys):
    assert cli_main(["inspect", "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "21 quantizable layers, 1.814 GMACs" in out and "layer4.0.downsample.0" in out


def test_cost_json_matches_bits(tmp_path, capsys):
    p8 = Policy.uniform(EMB_LAYERS, 8, 8).save(tmp_path / "p8.json")
    p4 = Policy.uniform(EMB_LAYERS, 4, 8).save(tmp_path / "p4.json")
    res = {}
    for k, p in (("8", p8), ("4", p4)):
        assert cli_main(["cost", "--model", "mnist_resnet", "--policy", str(p), "--json"]) == 0
        res[k] = json.loads(capsys.readouterr().out)
    assert res["4"]["total_gbops"] == pytest.approx(res["8"]["total_gbops"] / 2)
    assert res["4"]["total_size_mb"] < res["8"]["total_size_mb"]
    assert set(res["8"]["bops"]) == set(EMB_LAYERS)
    assert cli_main(["cost", "--model", "mnist_resnet", "--policy", str(p8)]) == 0
    assert "total" in capsys.readouterr().out


def _doc(**layers):
    bits = {n: [4, 8] for n in EMB_LAYERS}
    bits.update(layers)
    return {"schema": "lcpaq.policy/1", "layers": {k: v for k, v in bits.items() if v is not None}}


@pytest.mark.parametrize("doc,needle", [
    (_doc(**{"layer9.conv": [4, 8]}), "unknown layer 'layer9.conv'"),
    (_doc(fc=None), "no bits for layer 'fc'"),
    (_doc(fc=[9, 8]), "layer 'fc': w_bits=9 is out of range"),
    (_doc(conv1=[4, 1]), "layer 'conv1': a_bits=1 is out of range"),
    (_doc(conv1=[4]), "expected [w_bits, a_bits]"),
    ({**_doc(), "schema": "lcpaq.policy/0"}, "expected 'lcpaq.policy/1'"),
    ({"layers": {}}, "schema is None"),
    ("{not json", "not valid JSON"),
], ids=["unknown_layer", "missing_layer", "w_bits_9", "a_bits_1", "short_pair", "old_schema",
        "no_schema", "not_json"])
def test_malformed_policy_exit_2(tmp_path, capsys, doc, needle):
    f = tmp_path / "bad.json"
    f.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    assert cli_main(["cost", "--model", "mnist_resnet", "--policy", str(f)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["inspect", "--model", "mnist_resnet", "--input-size", "28by28"], "--input-size"),
    (["cost", "--model", "mnist_resnet", "--policy", "/nonexistent/p.json"], "does not exist"),
    (["cost", "--model", "mnist_resnet"], "--policy"),
], ids=["unknown_model", "bad_input_size", "missing_policy_file", "usage_missing_option"])
def test_bad_arguments_exit_2(capsys, argv, needle):
    assert cli_main(argv) == 2
    assert needle in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    """The installed entry point (not just main()) exits 2 with the message and no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(fc=[9, 8])))
    code = ("import sys; from lcpaq.cli import entry; "
            f"sys.argv=['lcpaq','cost','--model','mnist_resnet','--policy',{str(bad)!r}]; entry()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "w_bits=9" in r.stderr and "Traceback" not in r.stderr
