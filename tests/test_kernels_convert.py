"""Integer inference path: convert() a calibrated mixed-precision model to the kernels."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from lcpaq.errors import KernelError
from lcpaq.kernels import IntConv2d, IntLinear, available, convert
from lcpaq.kernels import ops as kops
from lcpaq.policy import Policy
from lcpaq.quant import apply_policy, quantizable_names
from lcpaq.testing.models import TinyResNet

MIXED = {"stem": (8, 8), "conv1": (4, 8), "conv2": (2, 8), "proj": (3, 6), "fc": (8, 8)}


def _model(pairs: dict[str, tuple[int, int]], symmetric: bool = False):
    torch.manual_seed(0)
    m = TinyResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics so activations are not all ~0
        for bn in (m.bn0, m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    names = quantizable_names(m)
    pol = Policy({n: pairs.get(n, (8, 8)) for n in names})
    calib = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    apply_policy(m, pol, calib_loader=calib, calib_batches=3, symmetric_act=symmetric)
    return m, pol


@pytest.mark.parametrize("symmetric", [False, True], ids=["u8act", "s8act"])
def test_convert_mixed_model_end_to_end(symmetric: bool) -> None:
    fq, pol = _model(MIXED, symmetric)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    intm = convert(copy.deepcopy(fq), pol)
    kinds = {n: type(mod).__name__ for n, mod in intm.named_modules() if n in MIXED}
    assert kinds == {"stem": "IntConv2d", "conv1": "IntConv2d", "conv2": "IntConv2d",
                     "proj": "IntConv2d", "fc": "IntLinear"}
    assert intm.conv2.kbits == 2 and intm.proj.kbits == 4 and intm.conv1.kbits == 4
    with torch.no_grad():
        y_fq, y_int = fq(x), intm(x)
    # within fake-quant tolerance: same integers up to float rounding order
    assert torch.allclose(y_int, y_fq, rtol=1e-3, atol=1e-3 * float(y_fq.abs().max()) + 1e-5)
    # fusion: BN folded, ReLU in the epilogue, conv1 requantizes onto conv2's uint8 input grid
    # (symmetric activations are int8: no requantization then); the stem's output also feeds
    # the residual add, so it stays float
    assert all(isinstance(getattr(intm, b), torch.nn.Identity) for b in ("bn0", "bn1", "bn2"))
    assert intm.stem.relu and intm.conv1.relu and not intm.conv2.relu and intm.stem.out_scale == 0
    assert (intm.conv1.out_scale > 0) == (not symmetric) == intm.conv2.takes_u8
    unfused = convert(copy.deepcopy(fq), pol, fuse=False)
    assert isinstance(unfused.bn1, torch.nn.BatchNorm2d) and not unfused.conv1.relu
    with torch.no_grad():
        assert torch.allclose(unfused(x), y_fq, rtol=1e-3, atol=1e-3 * float(y_fq.abs().max()) + 1e-5)


@pytest.mark.skipif(not available(), reason="lcpaq/_C extension not built")
def test_converted_model_bit_exact_vs_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    fq, pol = _model(MIXED)
    intm = convert(fq, pol)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ext = intm(x)
        monkeypatch.setattr(kops, "_use_ext", lambda _x: False)
        y_ref = intm(x)
    assert torch.equal(y_ext, y_ref)


def test_convert_keeps_float_layers_and_checks_policy() -> None:
    fq, pol = _model({"stem": (32, 32), "fc": (8, 32)})
    intm = convert(copy.deepcopy(fq), pol)
    assert isinstance(intm.conv1, IntConv2d) and not isinstance(intm.stem, IntConv2d)
    assert not isinstance(intm.fc, IntLinear)  # float activations stay fake-quant
    with pytest.raises(KernelError, match="apply_policy"):
        convert(TinyResNet().eval(), pol)


def test_fallback_without_extension(tmp_path) -> None:
    """With the extension disabled the ops run the PyTorch reference and say why."""
    code = (
        "import torch, lcpaq.kernels as k\n"
        "st = k.status(); assert not st.loaded and 'LCPAQ_KERNELS_DISABLE' in st.reason, st\n"
        "x = torch.tensor([[255, 0, 7]], dtype=torch.uint8)\n"
        "q = torch.tensor([[-8, 7, 1], [1, 1, 1]])\n"
        "for b in (8, 4):\n"
        "    y = k.qgemm_i32(x, k.pack_weight(q, b), b, 2)\n"
        "    assert y.tolist() == [[-2033, 262]], y\n"
        "print('fallback-ok')\n"
    )
    env = dict(os.environ, LCPAQ_KERNELS_DISABLE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fallback-ok" in r.stdout
    assert "PyTorch integer reference" in r.stderr  # the logged reason
