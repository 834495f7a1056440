"""The lcpaq-kernels latency backend times units built from their layer spec."""

from __future__ import annotations

import math

import pytest
import torch

from lcpaq.kernels import available
from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend

pytestmark = pytest.mark.skipif(not available(), reason="lcpaq/_C extension not built")

CONV = {"name": "c", "kind": "conv", "in_shape": (1, 8, 10, 10), "out_shape": (1, 16, 10, 10),
        "in_channels": 8, "out_channels": 16, "kernel_size": (3, 3), "stride": (1, 1),
        "padding": (1, 1), "dilation": (1, 1), "groups": 1, "bias": True}
FC = {"name": "fc", "kind": "linear", "in_shape": (4, 32), "out_shape": (4, 10),
      "in_channels": 32, "out_channels": 10, "bias": False}
CONV_BR = dict(CONV, fused=("bn", "relu", "maxpool"))  # what follows the layer in the graph
CONV_BAR = dict(CONV, fused=("bn", "add", "relu"))
FAST = MeasureSettings(warmup=1, number=2, repeat=3)


@pytest.mark.parametrize("layer,bits,kernel", [
    (CONV, (4, 8), "lcpaq:qconv2d-w4a8"), (CONV, (3, 8), "lcpaq:qconv2d-w4a8"),
    (CONV, (8, 8), "lcpaq:qconv2d-w8a8"), (FC, (2, 8), "lcpaq:qlinear-w2a8"),
    (CONV, (32, 32), "torch:conv2d-fp32"), (FC, (8, 32), "torch:linear-fp32"),
    (CONV_BR, (4, 8), "lcpaq:qconv2d-w4a8"), (CONV_BAR, (4, 8), "lcpaq:qconv2d-w4a8"),
    (CONV_BAR, (32, 32), "torch:conv2d-fp32"),
], ids=["conv-w4a8", "conv-w3a8", "conv-w8a8", "fc-w2a8", "conv-fp32", "fc-w8a32",
        "conv-bn-relu-w4a8", "conv-bn-add-relu-w4a8", "conv-bn-add-relu-fp32"])
def test_backend_measures_unit(layer, bits, kernel) -> None:
    be = get_backend("lcpaq-kernels")
    m = be.measure(Unit(key="k", onnx=b"", inputs={}, layer=layer, bits=bits), FAST)
    assert m.ok, m.error
    assert m.kernel == kernel and m.n == 3
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms
    assert "torch" in be.versions()


def test_unit_runs_the_converted_layer_with_its_post_ops() -> None:
    """The timed callable is what convert() runs: BN folded, first ReLU in the epilogue, add+ReLU
    in torch (outputs non-negative after the ReLU; with the add, not all equal to the conv's)."""
    from lcpaq.profiler.backends.kernels import _build

    fn, _ = _build(CONV_BR, (4, 8))
    y = fn()
    assert y.shape == (1, 16, 10, 10) and y.dtype == torch.float32 and bool((y >= 0).all())
    fn2, _ = _build(CONV_BAR, (4, 8))
    y2 = fn2()
    assert bool((y2 >= 0).all()) and not torch.equal(y2, y)
    plain, _ = _build(CONV, (4, 8))
    assert bool((plain() < 0).any())  # no post-ops: no ReLU


def test_backend_failure_is_data() -> None:
    be = get_backend("lcpaq-kernels")
    bad = dict(CONV, kind="pool")
    m = be.measure(Unit(key="k", onnx=b"", inputs={}, layer=bad, bits=(4, 8)), FAST)
    assert not m.ok and "pool" in m.error and math.isnan(m.median_ms)
