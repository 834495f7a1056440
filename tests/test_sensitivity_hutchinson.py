"""Hutchinson per-layer traces: exact Hessian traces of a known quadratic loss, sum over layers ==
whole-model estimate on the same probes, reproducibility, stopping rule, Fisher agreement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lcpaq.sensitivity import (
    SensitivityConfig,
    estimate_sensitivity,
    fisher_traces,
    hutchinson_traces,
    rademacher,
)
from lcpaq.testing.models import TinyResNet


class LinearNet(nn.Module):
    """out = fc2(fc1(x)): with a loss quadratic in ``out`` every block's Hessian is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def quad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L = 1/(2N) sum_i ||out_i||^2 + 0.1 sum(out): quadratic, independent of y."""
    return 0.5 * out.pow(2).sum() / out.shape[0] + 0.1 * out.sum()


def exact_traces(m: LinearNet, x: torch.Tensor) -> dict[str, float]:
    """Closed-form block traces of quad_loss (derived by hand, not by autograd).

    d²L/dW2² = (1/N) I_3 ⊗ HᵀH (H = fc1(x))        -> 3/N Σ||h_i||²
    d²L/dW1² = (1/N) Σ_i W2ᵀW2 ⊗ x_i x_iᵀ             -> ||W2||² · 1/N Σ||x_i||²
    d²L/dh² (h = fc2's input, all N rows) = (1/N) I_N ⊗ W2ᵀW2 -> ||W2||²
    d²L/dx² = (1/N) I_N ⊗ (W2W1)ᵀ(W2W1)              -> ||W2 W1||²
    """
    with torch.no_grad():
        n = x.shape[0]
        h = m.fc1(x)
        w1, w2 = m.fc1.weight, m.fc2.weight
        return {
            "w:fc2": float(3 * h.pow(2).sum() / n),
            "w:fc1": float(w2.pow(2).sum() * x.pow(2).sum() / n),
            "a:fc2": float(w2.pow(2).sum()),
            "a:fc1": float((w2 @ w1).pow(2).sum()),
        }


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_per_layer_traces_match_exact_quadratic_hessian(seed):
    torch.manual_seed(seed)
    m = LinearNet().eval()
    x, y = torch.randn(16, 8), torch.zeros(16, dtype=torch.long)
    w, a, _ = hutchinson_traces(m, x, y, ["fc1", "fc2"], max_probes=1000, min_probes=1000, seed=seed,
                                loss_fn=quad_loss)
    exact = exact_traces(m, x)
    for key, est in [*((f"w:{k}", v) for k, v in w.items()), *((f"a:{k}", v) for k, v in a.items())]:
        assert est.probes == 1000
        assert 0 < 3 * est.stderr < abs(exact[key]), (key, est)  # the interval excludes 0
        assert abs(est.mean - exact[key]) <= 3 * est.stderr, (key, est, exact[key])


def test_sum_of_layer_traces_equals_whole_model_hutchinson():
    """Per probe, Σ_l v_l·(Hv)_l == v·Hv computed independently (torch.autograd.functional.hvp
    on the flattened weight vector), with the same Rademacher stream."""
    torch.manual_seed(0)
    m = TinyResNet().eval()
    gx = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=gx), torch.randint(0, 4, (6,), generator=gx)
    names = ["stem", "conv1", "conv2", "proj", "fc"]
    _, _, samples = hutchinson_traces(m, x, y, names, activations=False, max_probes=6, min_probes=6, seed=5)

    shapes = [m.get_submodule(n).weight.shape for n in names]
    flat0 = torch.cat([m.get_submodule(n).weight.detach().reshape(-1) for n in names])
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = dict(m.named_buffers())

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        p, i = dict(params), 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            p[f"{n}.weight"] = theta[i:i + k].view(s)
            i += k
        return nn.functional.cross_entropy(torch.func.functional_call(m, (p, buffers), (x,)), y)

    gen = torch.Generator().manual_seed(5)
    for s in samples:
        v = torch.cat([rademacher(torch.empty(sh), gen).reshape(-1) for sh in shapes])
        _, hv = torch.autograd.functional.hvp(loss_of, flat0, v)
        whole = float(v @ hv)
        assert sum(s.values()) == pytest.approx(whole, rel=1e-5, abs=1e-7)


def _rep(seed=None, generator=None, probes=12):
    torch.manual_seed(0)
    m = TinyResNet().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    return estimate_sensitivity(m, (x, y), candidates=[(4, 8), (8, 8), (32, 32)], probes=probes,
                                seed=seed if seed is not None else 0, generator=generator,
                                config=SensitivityConfig(min_probes=probes))


def test_same_seed_gives_identical_report_other_seed_differs():
    a, b, c = _rep(3), _rep(3), _rep(4)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict()["layers"] != c.to_dict()["layers"]
    g = _rep(3, generator=torch.Generator().manual_seed(3))
    assert g.to_dict()["layers"] == a.to_dict()["layers"]  # a caller's generator = the seed's stream


def test_stops_when_every_block_reaches_tol_and_caps_at_max():
    torch.manual_seed(0)
    m = LinearNet().eval()
    x, y = torch.randn(16, 8), torch.zeros(16, dtype=torch.long)
    seen = []
    w, a, _ = hutchinson_traces(m, x, y, ["fc1", "fc2"], max_probes=500, min_probes=5, tol=0.1, seed=0,
                                activations=False, loss_fn=quad_loss, progress=lambda i, r: seen.append((i, r)))
    n = w["fc1"].probes
    assert 5 <= n < 500 and [i for i, _ in seen] == list(range(1, n + 1))
    assert seen[-1][1] < 0.1 and all(r >= 0.1 for i, r in seen[:-1] if i >= 5)
    assert max(e.rel_stderr for e in [*w.values(), *a.values()]) < 0.1
    w2, _, _ = hutchinson_traces(m, x, y, ["fc1"], max_probes=7, min_probes=5, tol=1e-9, seed=0,
                                 loss_fn=quad_loss)
    assert w2["fc1"].probes == 7


def test_model_left_in_its_mode_and_bn_running_stats_untouched():
    torch.manual_seed(0)
    m = TinyResNet().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    rep = estimate_sensitivity(m, (x, y), candidates=[(8, 8)], probes=3, config=SensitivityConfig(min_probes=3))
    assert m.training and rep.method == "hutchinson"
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())


def test_fisher_estimate_agrees_with_hutchinson_on_a_relu_net():
    """For CE and a net piecewise linear in each block (ReLU, eval BN), the model-label Fisher's
    diagonal blocks equal the Hessian's: the fallback is unbiased there."""
    torch.manual_seed(0)
    m = TinyResNet(width=4).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    names = ["stem", "conv2", "fc"]
    hw, ha, _ = hutchinson_traces(m, x, y, names, max_probes=200, min_probes=200, seed=0)
    fw, fa = fisher_traces(m, x, y, names, max_samples=48, min_samples=48, seed=0)
    for h, f in [*((hw[k], fw[k]) for k in names), *((ha[k], fa[k]) for k in names)]:
        assert f.method == "fisher" and f.probes == 48
        assert abs(h.mean - f.mean) <= 4 * (h.stderr**2 + f.stderr**2) ** 0.5, (h, f)
