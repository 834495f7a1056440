"""Foundation: policy JSON, inventory (resnet18/mobilenet_v2/ties/edges), costs, lean import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from lcpaq.costs import layer_bops, layer_size_bytes, policy_costs
from lcpaq.errors import PolicyError
from lcpaq.graph import trace
from lcpaq.inventory import Inventory
from lcpaq.policy import Policy, parse_bits, parse_bits_list
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


@pytest.mark.parametrize("modules", [
    "lcpaq", "lcpaq.cli", "lcpaq.policy,lcpaq.inventory,lcpaq.costs,lcpaq.latency",
], ids=["package", "cli", "torch_free_cores"])
def test_lean_import(modules):
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules.split(',')!r}]; "
            "bad=[m for m in ('tvm','onnxruntime','torch','onnx') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_resnet18_tie_groups_cover_every_residual_add():
    import torchvision

    inv = trace(torchvision.models.resnet18(), (1, 3, 224, 224))
    group_of = {n: i for i, g in enumerate(inv.tie_groups) for n in g}
    # every conv that feeds an add (each block's conv2 and each downsample) is tied
    feeders = [n for n in inv.names if n.endswith("conv2") or "downsample" in n]
    assert len(feeders) == 8 + 3 and all(n in group_of for n in feeders)
    # the stem's output is layer1's identity: stem, layer1.*.conv2 share one group
    assert group_of["conv1"] == group_of["layer1.0.conv2"] == group_of["layer1.1.conv2"]
    # stages are separated by the stride-2 downsample convs, so there is one group per stage
    assert len({group_of[f"layer{s}.0.conv2"] for s in (1, 2, 3, 4)}) == 4
    assert "fc" not in group_of
    assert inv["layer1.0.conv2"].fused == ("bn", "add", "relu")
    assert inv["conv1"].fused[:3] == ("bn", "relu", "maxpool")


def test_inventory_json_round_trip(tmp_path):
    inv = trace(TinyResNet(), TinyResNet.input_shape, name="tiny")
    inv.save(tmp_path / "inv.json")
    back = Inventory.load(tmp_path / "inv.json")
    assert back == inv


def test_depthwise_and_grouped_macs():
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2))
    inv = trace(m, (2, 8, 10, 10))
    dw, grp = inv.layers
    assert dw.depthwise and dw.macs == 2 * 8 * 10 * 10 * 9
    assert not grp.depthwise and grp.groups == 2 and grp.dilation == (2, 2)
    assert grp.macs == 2 * 16 * 10 * 10 * (8 // 2) * 9
    assert grp.weight_numel == 16 * 4 * 9 and grp.params == 16 * 4 * 9 + 16
    assert inv.edges == (("0", "1"),)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.sum() > 0:
            y = y * 2
        return self.b(y.mean((2, 3)))


def test_hooks_fallback_when_fx_fails():
    with pytest.warns(UserWarning, match="falling back to hooks"):
        inv = trace(_Untraceable(), (1, 3, 8, 8))
    assert inv.names == ("a", "b") and inv.meta["tracer"] == "hooks"
    assert inv["a"].out_shape == (1, 4, 6, 6) and inv["b"].macs == 4 * 2


@pytest.mark.parametrize("pair", [(2, 8), (4, 4), (8, 8), (32, 32)], ids=["w2a8", "w4a4", "w8a8", "fp32"])
def test_layer_costs_follow_bits(pair):
    inv = trace(TinyResNet(), TinyResNet.input_shape)
    ly = inv["proj"]  # has a bias
    assert layer_bops(ly, pair) == ly.macs * pair[0] * pair[1]
    scales = 0 if pair[0] == 32 else 4 * ly.out_channels
    assert layer_size_bytes(ly, pair) == ly.weight_numel * pair[0] / 8 + scales + 4 * ly.out_channels
