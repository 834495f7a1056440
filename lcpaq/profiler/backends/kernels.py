"""``lcpaq-kernels`` latency backend: times a unit's layer on lcpaq's own integer kernels.

The unit's ``layer`` spec (an :class:`lcpaq.inventory.LayerInfo` dict) and ``bits`` say what to
build: a quantized layer (both sides < 32 bits) runs exactly what :class:`lcpaq.kernels.IntConv2d`
/ ``IntLinear`` run (activation quantization + packed integer GEMM with fused dequantize epilogue)
with random integer weights at the kernel width for ``w_bits``; a layer with a float side runs
torch fp32 (what the converted model keeps). The ops that follow the layer in the traced graph
(``LayerInfo.fused``: bn, relu, add) are timed as :func:`lcpaq.kernels.convert` runs them: on the
integer path BN is folded into the epilogue and a ReLU right after the layer (or its BN) runs in
the epilogue, a residual add (+ ReLU) runs in torch; on the float path BN, ReLU and add run in
torch. (The uint8 requantization that convert fuses when the next layer is an 8-bit integer
layer depends on the next layer's bits; the unit keeps the float output and its own quantize
pass.) The ONNX bytes of the unit are not used.
Failures come back as ``Measurement(error=...)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from lcpaq.errors import BackendUnavailableError
from lcpaq.profiler.backend import Measurement, MeasureSettings, Unit, register_backend


def _build(layer: Mapping[str, Any], bits: tuple[int, int]) -> tuple[Callable[[], Any], str]:
    import torch
    from torch.nn import functional as F

    from lcpaq.kernels import (
        kernel_bits,
        pack_conv_weight,
        pack_weight,
        qconv2d,
        qlinear,
        quantize_act,
    )

    g = torch.Generator().manual_seed(0)
    kind = layer["kind"]
    in_shape = tuple(int(v) for v in layer["in_shape"])
    cin, cout = int(layer["in_channels"]), int(layer["out_channels"])
    groups = int(layer.get("groups", 1))
    has_bias = bool(layer.get("bias", False))
    x = torch.randn(in_shape, generator=g)
    bias = torch.randn(cout, generator=g) if has_bias else None
    w_bits, a_bits = bits
    fused = tuple(str(f) for f in layer.get("fused", ()))
    chain = fused[:fused.index("add") + 2] if "add" in fused else fused[:2]
    out_shape = tuple(int(v) for v in layer.get("out_shape", ())) or None
    integer = 32 not in bits
    # epilogue ReLU: right after the layer or after its (folded) BN, as convert() fuses it
    epi_relu = integer and (chain[:1] == ("relu",) or chain[:2] == ("bn", "relu"))
    post: list[Callable[[Any], Any]] = []
    if "add" in chain and out_shape is not None:
        other = torch.randn(out_shape, generator=g)
        if kind == "conv":
            other = other.contiguous(memory_format=torch.channels_last)
    first_relu = chain.index("relu") if "relu" in chain else -1
    for i, op in enumerate(chain):
        if op == "bn" and not integer:
            mean, var = torch.randn(cout, generator=g), torch.rand(cout, generator=g) + 0.5

            def bn(y: Any, m: Any = mean, v: Any = var) -> Any:
                return F.batch_norm(y, m, v, None, None, False, 0.0, 1e-5)
            post.append(bn)
        elif op == "relu" and not (epi_relu and i == first_relu):
            post.append(torch.relu)
        elif op == "add" and out_shape is not None:
            def add(y: Any, o: Any = other) -> Any:
                return y + o
            post.append(add)
        elif op not in ("bn", "relu", "add"):
            break  # pools etc. are not part of the layer's unit

    def finish(fn: Callable[[], Any]) -> Callable[[], Any]:
        if not post:
            return fn

        def run() -> Any:
            y = fn()
            for p in post:
                y = p(y)
            return y
        return run

    if kind == "conv":
        kh, kw = (int(v) for v in layer.get("kernel_size", (1, 1)))
        stride = [int(v) for v in layer.get("stride", (1, 1))]
        padding = [int(v) for v in layer.get("padding", (0, 0))]
        dilation = [int(v) for v in layer.get("dilation", (1, 1))]
        wshape = [cout, cin // groups, kh, kw]
    elif kind == "linear":
        wshape = [cout, cin]
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if 32 in (w_bits, a_bits):
        w = torch.randn(wshape, generator=g)
        if kind == "conv":
            xc = x.contiguous(memory_format=torch.channels_last)
            return finish(lambda: F.conv2d(xc, w, bias, stride, padding, dilation, groups)), "torch:conv2d-fp32"
        return finish(lambda: F.linear(x, w, bias)), "torch:linear-fp32"
    kb = kernel_bits(w_bits)
    q = torch.randint(-(2 ** (kb - 1)) + 1, 2 ** (kb - 1), wshape, generator=g)
    ws = torch.rand(cout, generator=g) * 0.01 + 1e-3
    qmax = 2**a_bits - 1
    sx, zx = 0.05, qmax // 2
    if kind == "conv":
        blob = pack_conv_weight(q, kb, groups)
        xc = x.contiguous(memory_format=torch.channels_last)

        def conv() -> Any:
            xq = quantize_act(xc, sx, zx, 0, qmax)
            return qconv2d(xq, blob, kb, wshape, stride, padding, dilation, groups, ws, sx, zx, bias,
                           0.0, 0, epi_relu)

        return finish(conv), f"lcpaq:qconv2d-w{kb}a8"
    blob = pack_weight(q, kb)
    return finish(lambda: qlinear(quantize_act(x, sx, zx, 0, qmax), blob, kb, cout, ws, sx, zx, bias,
                                  0.0, 0, epi_relu)), f"lcpaq:qlinear-w{kb}a8"



def kernel_isa() -> str:
    """The instruction set the CPU kernels run on here, as the extension picks it (qops_cpu.cpp
    ``isa_level``): 'avx512vnni', 'avxvnni', 'avx2' or 'scalar', lowered by LCPAQ_KERNELS_ISA.
    Part of the table header's versions, so a table is never resumed on another kernel path."""
    import os

    from lcpaq.profiler.table import cpu_flags

    flags = cpu_flags()
    avx2 = {"avx2", "fma"} <= flags
    avxvnni = avx2 and "avx_vnni" in flags
    best = ("avx512vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags else
            "avxvnni" if avxvnni else "avx2") if avx2 else "scalar"
    forced = os.environ.get("LCPAQ_KERNELS_ISA", "")
    if forced == "scalar":
        return "scalar"
    if forced == "avx2":
        return "avx2" if avx2 else "scalar"
    if forced == "avxvnni":
        return "avxvnni" if avxvnni else ("avx2" if avx2 else "scalar")
    return best

class KernelsBackend:
    """Times units on lcpaq's compiled integer kernels (CPU)."""

    name = "lcpaq-kernels"

    def __init__(self, profile: Any = None) -> None:
        from lcpaq.kernels import status

        st = status()
        if not st.loaded:
            raise BackendUnavailableError(
                f"lcpaq-kernels backend needs the compiled extension: {st.reason}")
        self.profile = profile

    def versions(self) -> dict[str, str]:
        import torch

        from lcpaq.kernels import status

        return {"torch": torch.__version__, "lcpaq-kernels": f"cpu-{kernel_isa()}" + ("+cuda" if status().cuda else "")}

    def measure(self, unit: Unit, settings: MeasureSettings) -> Measurement:
        import torch

        nan = float("nan")
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(settings.threads)
            fn, kernel = _build(unit.layer, unit.bits)
            with torch.inference_mode():
                for _ in range(settings.warmup):
                    fn()
                cpu, wall = [], []
                for _ in range(settings.repeat):
                    t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                    for _ in range(settings.number):
                        fn()
                    c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
                    cpu.append((c1 - c0) / 1e6 / settings.number)
                    wall.append((t1 - t0) / 1e6 / settings.number)
            xs = sorted(cpu if settings.metric == "thread_cpu" and settings.threads == 1 else wall)
            q = lambda p: xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]  # noqa: E731
            return Measurement(median_ms=q(0.5), p10_ms=q(0.1), p90_ms=q(0.9), n=len(xs),
                               wall_median_ms=sorted(wall)[len(wall) // 2], kernel=kernel)
        except Exception as e:  # a failing workload is data, never an abort
            return Measurement(nan, nan, nan, 0, error=f"{type(e).__name__}: {e}")
        finally:
            torch.set_num_threads(old)


register_backend("lcpaq-kernels", KernelsBackend)
