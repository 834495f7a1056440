"""Foundation: quantizers over bits, calibration methods, STE, integer read-back, apply_policy."""

from __future__ import annotations

import pytest
import torch

from lcpaq.errors import ConfigError, PolicyError
from lcpaq.policy import FP32, Policy
from lcpaq.quant import (
    CALIB_METHODS,
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    apply_policy,
    calibrate,
    fake_quant_act,
    fake_quant_weight,
    policy_of,
    quantizable_names,
    quantize_weight,
)
from lcpaq.testing.models import TinyResNet


@pytest.fixture(autouse=True)
def _one_thread():
    """1 intra-op thread: on a shared 2-core box 2 OpenMP threads stall (see FINDINGS)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

BITS = [2, 3, 4, 6, 8]


def _loader(n_batches: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, *TinyResNet.input_shape[1:], generator=g), torch.zeros(4, dtype=torch.long))
            for _ in range(n_batches)]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_weight_quantizer_grid(bits):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits))
    q, s = quantize_weight(w, bits)
    assert q.dtype == torch.int8 and q.abs().max() == 2 ** (bits - 1) - 1  # max|w| hits the grid edge
    assert s.shape == (16,)
    assert torch.allclose(q.float() * s.view(-1, 1, 1, 1), fake_quant_weight(w, bits))
    # per-channel: scaling one output channel changes only that channel's scale
    w2 = w.clone()
    w2[3] *= 10
    s2 = quantize_weight(w2, bits)[1]
    assert torch.allclose(s2[3], 10 * s[3]) and torch.equal(torch.cat([s2[:3], s2[4:]]), torch.cat([s[:3], s[4:]]))


def test_weight_error_shrinks_with_bits():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    errs = [(fake_quant_weight(w, b) - w).pow(2).mean().item() for b in BITS]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert fake_quant_weight(w, 32) is w


@pytest.mark.parametrize("bits", [1, 9, 16], ids=lambda b: f"bits{b}")
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match="out of range"):
        quantize_weight(torch.randn(2, 2), bits)
    with pytest.raises(ConfigError, match="out of range"):
        ActQuantizer(bits)


@pytest.mark.parametrize("method", CALIB_METHODS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_activation_error_shrinks_with_bits(method, symmetric):
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    errs = []
    for b in BITS:
        q = ActQuantizer(b, symmetric=symmetric, method=method)
        q.observe = True
        q(x)
        q.observe = False
        q.compute_qparams()
        if symmetric:
            assert int(q.zero_point) == 0
        errs.append((q(x) - x).pow(2).mean().item())
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def _calibrated(method: str, x: torch.Tensor, bits: int = 4) -> ActQuantizer:
    q = ActQuantizer(bits, method=method)
    q.observe = True
    q(x)
    q.observe = False
    q.compute_qparams()
    return q


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"a{b}")
def test_clipping_methods_vs_minmax_on_heavy_tails(bits):
    torch.manual_seed(3)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))  # heavy tails stretch min/max
    err = {m: (_calibrated(m, x, bits)(x) - x).pow(2).mean().item() for m in CALIB_METHODS}
    assert err["mse"] <= err["minmax"] * (1 + 1e-6), err  # min/max is one of MSE's candidates
    if bits <= 4:  # at low bits clipping the tails must pay off
        assert err["mse"] < 0.6 * err["minmax"], err
        assert err["percentile"] < err["minmax"], err


def test_asymmetric_relu_range_uses_zero_point_zero():
    x = torch.rand(1000) * 6
    q = _calibrated("minmax", x, bits=8)
    assert int(q.zero_point) == 0 and float(q.scale) == pytest.approx(6 / 255, rel=1e-2)


def test_ste_gradients_flow():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    fake_quant_weight(w, 3).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(100, requires_grad=True)
    fake_quant_act(x, torch.tensor(0.05), 0, 4, True).sum().backward()
    inside = x.detach().abs() < 0.05 * 7
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[~inside] == 0)


def test_qat_trains_through_fake_quant():
    torch.manual_seed(0)
    m = TinyResNet()
    apply_policy(m, Policy.uniform(quantizable_names(m), 4, 4), calib_loader=_loader(), calib_batches=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, _ = _loader(1, seed=5)[0]
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert m.stem.weight.grad is not None and m.stem.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_integer_readback_matches_fake_quant():
    m = TinyResNet()
    apply_policy(m, Policy.uniform(quantizable_names(m), 4, 8), calib_loader=_loader(), calib_batches=2)
    conv = m.conv1
    assert isinstance(conv, QuantConv2d)
    q, s = conv.int_weight()
    assert q.dtype == torch.int8 and q.abs().max() <= 7
    assert torch.allclose(q.float() * s.view(-1, 1, 1, 1), conv.qweight())
    scale, zp, bits, sym = conv.act_qparams()
    assert bits == 8 and not sym and 0 <= zp <= 255
    x = torch.randn(2, 8, 16, 16)
    manual = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    assert torch.allclose(conv.qinput(x), manual, atol=1e-6)


def test_apply_policy_mixed_in_place_and_policy_of():
    m = TinyResNet()
    names = quantizable_names(m)
    bits = {n: (8, 8) for n in names}
    bits["stem"], bits["fc"], bits["proj"] = FP32, (2, 32), (32, 6)
    pol = Policy(bits)
    ref = m.stem.weight
    out = apply_policy(m, pol, calib_loader=_loader(), calib_batches=1)
    assert out is m and type(m.stem) is torch.nn.Conv2d and m.stem.weight is ref
    assert isinstance(m.fc, QuantLinear) and m.fc.act_quant is None and m.fc.bits == (2, 32)
    assert isinstance(m.proj, QuantConv2d) and m.proj.act_qparams()[2] == 6
    assert policy_of(m) == pol
    with pytest.raises(ConfigError, match="fp32 weights"):
        m.proj.int_weight()
    # re-applying with other bits replaces the wrappers, weights stay shared
    apply_policy(m, Policy.uniform(names, 4, 4), calib_loader=_loader(), calib_batches=1)
    assert policy_of(m) == Policy.uniform(names, 4, 4) and m.conv1.w_bits == 4
    m(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("edit,needle", [
    (lambda b: b.update(nosuch=(8, 8)), "unknown layer 'nosuch'"),
    (lambda b: b.pop("conv2"), "no bits for layer 'conv2'"),
], ids=["unknown_layer", "missing_layer"])
def test_apply_policy_validates_first(edit, needle):
    m = TinyResNet()
    bits = {n: (4, 8) for n in quantizable_names(m)}
    edit(bits)
    with pytest.raises(PolicyError, match=needle):
        apply_policy(m, Policy(bits))
    assert not any(isinstance(x, (QuantConv2d, QuantLinear)) for x in m.modules())  # untouched


def test_apply_policy_rejects_unknown_method_untouched():
    m = TinyResNet()
    with pytest.raises(ConfigError, match="unknown calibration method 'kl'"):
        apply_policy(m, Policy.uniform(quantizable_names(m), 8, 8), method="kl")
    assert not any(isinstance(x, (QuantConv2d, QuantLinear)) for x in m.modules())


def test_uncalibrated_activation_quantizer_says_what_to_do():
    m = TinyResNet()
    apply_policy(m, Policy.uniform(quantizable_names(m), 8, 8))
    with pytest.raises(ConfigError, match="calibrat"):
        m(torch.randn(1, 3, 16, 16))
    calibrate(m, _loader(), 1)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_fake_quant_accuracy_monotone_on_embedded_model():
    from lcpaq.data import get_loader
    from lcpaq.models import EMBEDDED, accuracy, get_model

    val = get_loader("mnist5k", "val", batch_size=500)
    cal = get_loader("mnist5k", "train", batch_size=128)
    fp32 = accuracy(get_model(EMBEDDED), val)
    assert fp32 >= 98.0
    accs = {}
    for b in (8, 4, 3, 2):
        m = get_model(EMBEDDED)
        apply_policy(m, Policy.uniform(quantizable_names(m), b, b), calib_loader=cal, calib_batches=2)
        accs[b] = accuracy(m, val)
    assert accs[8] >= fp32 - 0.5, accs
    assert accs[8] >= accs[4] >= accs[3] >= accs[2], accs
    assert accs[2] < fp32 - 20, accs
