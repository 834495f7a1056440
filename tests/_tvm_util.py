"""Shared helpers for the TVM tests: skip cleanly when apache-tvm is not usable, tiny layers."""

from __future__ import annotations

import pytest

from lcpaq.inventory import LayerInfo


def require_tvm() -> None:
    """Skip the calling test module with the reason when ``import tvm`` fails."""
    try:
        import tvm  # noqa: F401
        from tvm.relax.frontend.onnx import from_onnx  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken native library
        pytest.skip(f"apache-tvm not usable: {type(e).__name__}: {e}", allow_module_level=True)


def conv_layer(c: int = 8, o: int = 16, hw: int = 8, k: int = 3, stride: int = 1, act: bool = True) -> LayerInfo:
    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    return LayerInfo(name=f"conv{c}x{o}k{k}s{stride}", kind="conv", in_shape=(1, c, hw, hw),
                     out_shape=(1, o, out, out), in_channels=c, out_channels=o, kernel_size=(k, k),
                     stride=(stride, stride), padding=(pad, pad), fused=("bn", "relu") if act else ("bn",))


def linear_layer(i: int = 32, o: int = 10) -> LayerInfo:
    return LayerInfo(name=f"fc{i}x{o}", kind="linear", in_shape=(1, i), out_shape=(1, o), in_channels=i,
                     out_channels=o)
