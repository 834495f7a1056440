"""Sensitivity: Hutchinson per-layer traces vs exact Hessians, sum == whole-model, seeds, fallback."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from lcpaq.errors import SensitivityError
from lcpaq.sensitivity import SensitivityReport, estimate_sensitivity, hutchinson_traces
from lcpaq.sensitivity.hutchinson import _rademacher
from lcpaq.testing.models import TinyMLP, TinyResNet


def _data(n=16, d=8, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def quad_loss(out, y):  # a loss quadratic in the output; with a linear net, quadratic in each layer
    return 0.5 * (out ** 2).sum() / out.shape[0] + 0.1 * out.sum()


class LinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def exact_block_trace(model, x, y, name, loss_fn):
    mod = model.get_submodule(name)
    w0 = mod.weight.detach().clone()
    from torch.func import functional_call

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(w):
        p = dict(params)
        p[f"{name}.weight"] = w.view_as(w0)
        return loss_fn(functional_call(model, p, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, w0.reshape(-1))
    return float(torch.diagonal(H).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_per_layer_traces_match_exact_hessian(seed):
    torch.manual_seed(seed)
    model = LinearNet().eval()
    x, y = _data(seed=seed)
    w, _, _ = hutchinson_traces(model, x, y, ["fc1", "fc2"], activations=False, max_probes=400,
                                min_probes=400, seed=seed, loss_fn=quad_loss)
    for name in ("fc1", "fc2"):
        exact = exact_block_trace(model, x, y, name, quad_loss)
        est = w[name]
        assert est.probes == 400
        assert abs(est.mean - exact) <= 3 * est.stderr + 1e-9, (name, est, exact)


def test_sum_of_layers_equals_whole_model_hutchinson():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x, y = _data()
    names = ["fc1", "fc2"]
    _, _, samples = hutchinson_traces(model, x, y, names, activations=False, max_probes=20,
                                      min_probes=20, seed=5)
    # whole-model Hutchinson v.Hv with the same generator stream (same probes)
    gen = torch.Generator().manual_seed(5)
    ws = [model.get_submodule(n).weight for n in names]
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, ws, create_graph=True)
    for s in samples:
        vs = [_rademacher(w, gen) for w in ws]
        hv = torch.autograd.grad(g, ws, grad_outputs=vs, retain_graph=True)
        whole = sum(float((v * h).sum()) for v, h in zip(vs, hv, strict=True))
        assert sum(s.values()) == pytest.approx(whole, rel=1e-6, abs=1e-9)


def _report(seed, model=None):
    torch.manual_seed(0)
    model = model or TinyResNet().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    return estimate_sensitivity(model, (x, y), candidates=[(2, 8), (4, 8), (8, 8), (4, 4), (32, 32)],
                                probes=12, min_probes=12, seed=seed, model_name="tiny", data_name="rand")


def test_same_seed_identical_report_and_omega_monotone(tmp_path):
    a, b, c = _report(3), _report(3), _report(4)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    for ly in a.layers:
        assert a.omega(ly, (32, 32)) == 0.0
        assert a.omega(ly, (2, 8)) >= a.omega(ly, (4, 8)) >= a.omega(ly, (8, 8)) >= 0
        assert a.omega(ly, (4, 4)) >= a.omega(ly, (4, 8))
        assert a.omega(ly, (4, 8), variant="plain") > 0
    path = a.save(tmp_path / "s.json")
    back = SensitivityReport.load(path)
    assert back.to_dict() == a.to_dict()
    assert back.omega_table()["stem"][(4, 8)] == pytest.approx(a.omega("stem", (4, 8)))


def test_malformed_reports(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SensitivityError, match="not valid JSON"):
        SensitivityReport.load(p)
    p.write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(SensitivityError, match="schema"):
        SensitivityReport.load(p)
    p.write_text(json.dumps({"schema": "lcpaq.sensitivity/1", "layers": {}}))
    with pytest.raises(SensitivityError, match="malformed"):
        SensitivityReport.load(p)
    with pytest.raises(SensitivityError, match="does not exist"):
        SensitivityReport.load(tmp_path / "missing.json")
    rep = _report(0)
    with pytest.raises(SensitivityError, match="2 bits"):
        SensitivityReport.from_dict({**rep.to_dict(), "layers": {
            k: {**v, "w_pert": {"8": 1.0}} for k, v in rep.to_dict()["layers"].items()}}).omega("stem", (2, 8))


def test_fisher_fallback_on_hardsigmoid_model():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = estimate_sensitivity(model, (x, y), candidates=[(4, 8), (8, 8)], probes=3)
    assert rep.method == "fisher"
    assert "hardsigmoid" in (rep.meta["fallback_reason"] or "")
    assert any("Fisher" in str(m.message) for m in w)
    assert all(rep.weight_trace[ly][0] >= 0 for ly in rep.layers)
