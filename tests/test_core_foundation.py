"""Foundation: policy JSON, inventory (resnet18/mobilenet_v2/ties), quantizers, costs, CLI, lean import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lcpaq.cli import main as cli_main
from lcpaq.costs import policy_costs
from lcpaq.errors import PolicyError
from lcpaq.graph import trace
from lcpaq.policy import Policy, parse_bits, parse_bits_list
from lcpaq.quant import apply_policy, fake_quant_weight, quantizable_names, quantize_weight
from lcpaq.testing.models import TinyConcatNet, TinyResNet


def test_policy_round_trip(tmp_path):
    p = Policy({"a": (4, 8), "b": (32, 32), "c": (2, 6)}, meta={"why": "test"})
    back = Policy.load(p.save(tmp_path / "p.json"), layer_names=["a", "b", "c"])
    assert back == p and back.meta["why"] == "test"
    assert json.loads((tmp_path / "p.json").read_text())["schema"] == "lcpaq.policy/1"
    assert parse_bits_list("w4a8, fp32,w4a8") == ((4, 8), (32, 32))


@pytest.mark.parametrize("doc,needle", [
    ({"schema": "lcpaq.policy/1", "layers": {"a": [9, 8]}}, "w_bits=9"),
    ({"schema": "lcpaq.policy/1", "layers": {"a": [4, 1]}}, "a_bits=1"),
    ({"schema": "lcpaq.policy/1", "layers": {"a": [4]}}, "expected [w_bits, a_bits]"),
    ({"schema": "lcpaq.policy/1", "layers": {"a": ["4", 8]}}, "not an integer"),
    ({"schema": "lcpaq.policy/2", "layers": {"a": [4, 8]}}, "schema"),
    ({"schema": "lcpaq.policy/1", "layers": {}}, "non-empty"),
], ids=["w9", "a1", "short", "string", "schema", "empty"])
def test_malformed_policy_named(tmp_path, doc, needle):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Policy.load(f)


def test_policy_validate_names_layer():
    p = Policy({"a": (4, 8), "zz": (8, 8)})
    with pytest.raises(PolicyError, match="unknown layer 'zz'"):
        p.validate(["a"])
    with pytest.raises(PolicyError, match="no bits for layer 'b'"):
        Policy({"a": (4, 8)}).validate(["a", "b"])
    with pytest.raises(PolicyError):
        parse_bits("w4b8")


def test_resnet18_inventory():
    import torchvision

    inv = trace(torchvision.models.resnet18(), (1, 3, 224, 224), name="resnet18")
    assert len(inv) == 21
    assert round(inv.total_macs / 1e9, 2) == 1.81
    assert inv["fc"].macs == 512 * 1000
    assert inv["layer1.0.conv1"].macs == 56 * 56 * 64 * 64 * 9
    ties = {frozenset(g) for g in inv.tie_groups}
    assert frozenset({"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.0.conv1"}) in ties
    assert ("layer1.0.conv1", "layer1.0.conv2") in inv.edges


def test_mobilenet_v2_inventory():
    import torchvision

    inv = trace(torchvision.models.mobilenet_v2(), (1, 3, 224, 224))
    assert len(inv) == 53
    assert abs(inv.total_macs / 1e6 - 300.8) < 0.5  # 0.30 GMACs
    assert sum(1 for ly in inv if ly.depthwise) == 17
    # 10 inverted-residual adds chain the projection convs of each stage into 5 groups
    assert len(inv.tie_groups) == 5
    assert sum(len(g) for g in inv.tie_groups) == 15
    assert ("features.2.conv.2", "features.3.conv.2") in inv.tie_groups


def test_tie_groups_from_graph():
    inv = trace(TinyResNet(), TinyResNet.input_shape)
    # stem's output and conv2's output meet at the add
    assert set(map(frozenset, inv.tie_groups)) == {frozenset({"stem", "conv2"})}
    inv2 = trace(TinyConcatNet(), TinyConcatNet.input_shape)
    assert frozenset({"a", "b"}) in set(map(frozenset, inv2.tie_groups))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8], ids=lambda b: f"w{b}")
def test_weight_quantizer_grid(bits):
    w = torch.randn(16, 8, 3, 3)
    q, s = quantize_weight(w, bits)
    assert q.abs().max() <= 2 ** (bits - 1) - 1
    assert s.shape == (16,)
    assert torch.allclose(q.float() * s.view(-1, 1, 1, 1), fake_quant_weight(w, bits))


def test_quant_error_shrinks_with_bits():
    w = torch.randn(32, 64)
    errs = [(fake_quant_weight(w, b) - w).pow(2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)


def test_fake_quant_accuracy_monotone_on_embedded_model():
    from lcpaq.data import get_loader
    from lcpaq.models import EMBEDDED, accuracy, get_model

    val = get_loader("mnist5k", "val", batch_size=500)
    cal = get_loader("mnist5k", "train", batch_size=128)
    fp32 = accuracy(get_model(EMBEDDED), val)
    assert fp32 >= 98.0
    accs = {}
    for b in (8, 4, 2):
        m = get_model(EMBEDDED)
        apply_policy(m, Policy.uniform(quantizable_names(m), b, b), calib_loader=cal, calib_batches=2)
        accs[b] = accuracy(m, val)
    assert accs[8] >= fp32 - 0.5
    assert accs[8] >= accs[4] >= accs[2]
    assert accs[2] < fp32 - 20


def test_costs():
    inv = trace(TinyResNet(), TinyResNet.input_shape)
    names = inv.names
    c8 = policy_costs(inv, Policy.uniform(names, 8, 8))
    c4 = policy_costs(inv, Policy.uniform(names, 4, 8))
    c32 = policy_costs(inv, Policy.uniform(names, 32, 32))
    assert c4.total_gbops == pytest.approx(c8.total_gbops / 2)
    assert c32.total_size_bytes == pytest.approx(4 * sum(ly.weight_numel for ly in inv) +
                                                 4 * sum(ly.out_channels for ly in inv if ly.bias))
    assert c4.total_size_bytes < c8.total_size_bytes < c32.total_size_bytes


def test_cli_inspect_and_cost(tmp_path, capsys):
    assert cli_main(["inspect", "--model", "mnist_resnet", "--json"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert len(inv["layers"]) == 10
    pol = Policy.uniform([ly["name"] for ly in inv["layers"]], 4, 8).save(tmp_path / "p.json")
    assert cli_main(["cost", "--model", "mnist_resnet", "--policy", str(pol), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_gbops"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "lcpaq.policy/1", "layers": {"conv1": [4, 8]}}))
    assert cli_main(["cost", "--model", "mnist_resnet", "--policy", str(bad)]) == 2
    assert "no bits for layer" in capsys.readouterr().err
    assert cli_main(["inspect", "--model", "nosuchnet"]) == 2
    assert cli_main(["cost", "--model", "mnist_resnet"]) == 2  # usage error: missing --policy


def test_lean_import():
    code = "import sys, lcpaq, lcpaq.policy, lcpaq.cli; " \
           "bad=[m for m in ('tvm','onnxruntime','torch') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
