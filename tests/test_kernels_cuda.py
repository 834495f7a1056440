"""lcpaq's CUDA kernels on a GPU: bit-exact against the int64 / PyTorch reference, opcheck,
and a converted mixed-precision model on the GPU equal to the same model on the CPU kernels.

Every test skips (with the reason) on a machine without a CUDA GPU or with an extension built
without CUDA; the sources' compilation is checked by test_kernels_cuda_build.py everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lcpaq.kernels import (
    convert,
    pack_conv_weight,
    pack_weight,
    qconv2d,
    qgemm_i32,
    qlinear,
    quantize_act,
    status,
)
from lcpaq.kernels import reference as ref


def _cuda_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine: CUDA kernels compiled (see test_kernels_cuda_build) but not run"
    st = status()
    if not st.loaded:
        return f"lcpaq/_C extension not loaded: {st.reason}"
    if not st.cuda:
        return "lcpaq/_C built without CUDA (nvcc absent or LCPAQ_SKIP_CUDA=1)"
    return ""


pytestmark = pytest.mark.skipif(bool(_cuda_reason()), reason=_cuda_reason() or "-")

BITS = [pytest.param(b, id=f"w{b}") for b in (8, 4, 2)]
XDT = [pytest.param(torch.uint8, id="u8"), pytest.param(torch.int8, id="s8")]
SHAPES = [(1, 1, 1), (7, 13, 37), (13, 1000, 100), (50, 33, 777), (400, 20, 70), (256, 64, 576),
          (3136, 64, 576), (33, 129, 4099)]


def _rand_w(shape: tuple[int, ...], bits: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g)


def _rand_x(shape: tuple[int, ...], dt: torch.dtype, g: torch.Generator) -> torch.Tensor:
    lo, hi = (0, 256) if dt == torch.uint8 else (-128, 128)
    return torch.randint(lo, hi, shape, generator=g).to(dt)


@pytest.fixture(params=["imma", "dp4a"])
def path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CUDA paths: tensor cores (mma.sync, the default on sm_80+) and the dp4a fallback."""
    if request.param == "dp4a":
        monkeypatch.setenv("LCPAQ_CUDA_KERNEL", "dp4a")
    else:
        monkeypatch.delenv("LCPAQ_CUDA_KERNEL", raising=False)
    return request.param


def _gpu(*ts):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in ts)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
def test_qgemm_exact_vs_int64(bits: int, xdt: torch.dtype, shape, path: str) -> None:
    m, n, k = shape
    g = torch.Generator().manual_seed(m * 7 + n + k + bits)
    x, q = _rand_x((m, k), xdt, g), _rand_w((n, k), bits, g)
    got = qgemm_i32(x.cuda(), pack_weight(q, bits).cuda(), bits, n)
    assert got.is_cuda and got.dtype == torch.int32
    assert torch.equal(got.cpu(), (x.long() @ q.long().T).to(torch.int32))


@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
def test_qgemm_extreme_values(bits: int, xdt: torch.dtype, path: str) -> None:
    k = 4099
    xv = 255 if xdt == torch.uint8 else -128
    x = torch.full((5, k), xv, dtype=torch.int64).to(xdt)
    q = torch.stack([torch.full((k,), -(2 ** (bits - 1))), torch.full((k,), 2 ** (bits - 1) - 1)])
    got = qgemm_i32(x.cuda(), pack_weight(q, bits).cuda(), bits, 2).cpu()
    assert torch.equal(got.long(), x.long() @ q.T)


@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["f32", "f32-nobias", "u8-relu"])
def test_qlinear_epilogue_bit_equal_to_reference(bits: int, xdt: torch.dtype, mode: str, path: str) -> None:
    g = torch.Generator().manual_seed(bits + 100)
    m, n, k = 37, 45, 300
    x, q = _rand_x((2, m, k), xdt, g), _rand_w((n, k), bits, g)
    ws, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    if mode == "f32-nobias":
        bias = None
    zx = 17 if xdt == torch.uint8 else -3
    osc, ozp, relu = (0.07, 11, True) if mode == "u8-relu" else (0.0, 0, False)
    blob = pack_weight(q, bits)
    args = (x, blob, bits, n, ws, 0.031, zx, bias, osc, ozp, relu)
    want = ref.qlinear(*args)
    got = qlinear(*_gpu(*args))
    assert got.is_cuda and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)


CONVS = [
    pytest.param(dict(c=5, co=7, h=9, w=11, k=3, s=1, p=1, d=1, g=1), id="3x3"),
    pytest.param(dict(c=64, co=64, h=14, w=14, k=3, s=1, p=1, d=1, g=1), id="3x3-64"),
    pytest.param(dict(c=16, co=20, h=8, w=8, k=1, s=1, p=0, d=1, g=1), id="1x1"),
    pytest.param(dict(c=24, co=40, h=9, w=7, k=1, s=2, p=0, d=1, g=1), id="1x1s2"),
    pytest.param(dict(c=3, co=8, h=15, w=15, k=7, s=2, p=3, d=1, g=1), id="7x7s2"),
    pytest.param(dict(c=6, co=4, h=7, w=6, k=3, s=2, p=1, d=2, g=2), id="grouped-dil"),
    pytest.param(dict(c=32, co=48, h=11, w=9, k=3, s=2, p=2, d=2, g=2), id="grouped16-s2-dil"),
    pytest.param(dict(c=32, co=20, h=13, w=10, k=3, s=2, p=1, d=1, g=1), id="3x3s2-32"),
    pytest.param(dict(c=32, co=32, h=10, w=10, k=3, s=1, p=1, d=1, g=32), id="depthwise"),
    pytest.param(dict(c=24, co=24, h=9, w=9, k=5, s=2, p=2, d=1, g=24), id="depthwise5x5s2"),
]


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("requant", [False, True], ids=["f32", "u8"])
def test_qconv2d_bit_equal_to_reference(bits: int, xdt: torch.dtype, cfg: dict, requant: bool,
                                        path: str) -> None:
    g = torch.Generator().manual_seed(cfg["c"] + bits)
    x = _rand_x((2, cfg["c"], cfg["h"], cfg["w"]), xdt, g)
    wshape = [cfg["co"], cfg["c"] // cfg["g"], cfg["k"], cfg["k"]]
    q = _rand_w(tuple(wshape), bits, g)
    blob = pack_conv_weight(q, bits, cfg["g"])
    ws, bias = torch.rand(cfg["co"], generator=g) * 0.02, torch.randn(cfg["co"], generator=g)
    zx = 100 if xdt == torch.uint8 else 5
    osc, ozp, relu = (0.05, 3, True) if requant else (0.0, 0, False)
    args = (x, blob, bits, wshape, [cfg["s"]] * 2, [cfg["p"]] * 2, [cfg["d"]] * 2, cfg["g"], ws,
            0.05, zx, bias, osc, ozp, relu)
    want = ref.qconv2d(*args)
    got = qconv2d(*_gpu(*args))
    assert got.is_cuda and got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_quantize_act_bit_equal(signed: bool) -> None:
    x = torch.randn(2, 3, 33, 17, generator=torch.Generator().manual_seed(5)) * 3
    x[0, 0, 0, :4] = torch.tensor([1e9, -1e9, 0.025, -0.075])  # saturation and rounding ties
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = 0 if signed else 77
    want = ref.quantize_act(x, 0.05, zp, qmin, qmax)
    got = quantize_act(x.cuda(), 0.05, zp, qmin, qmax)
    assert got.dtype == want.dtype
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("bits", BITS)
def test_opcheck_cuda(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, q = _rand_x((5, 40), torch.uint8, g).cuda(), _rand_w((20, 40), bits, g)
    blob, ws = pack_weight(q, bits).cuda(), torch.rand(20, generator=g).cuda()
    torch.library.opcheck(torch.ops.lcpaq.qgemm_i32.default, (x, blob, bits, 20))
    torch.library.opcheck(torch.ops.lcpaq.qlinear.default,
                          (x, blob, bits, 20, ws, 0.1, 3, torch.randn(20).cuda(), 0.2, 5, True))
    xc = _rand_x((1, 4, 6, 6), torch.int8, g).cuda()
    qc = torch.randint(-2, 2, (6, 4, 3, 3), generator=g)
    torch.library.opcheck(
        torch.ops.lcpaq.qconv2d.default,
        (xc, pack_conv_weight(qc, bits, 1).cuda(), bits, [6, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1,
         torch.rand(6, generator=g).cuda(), 0.1, 0, None, 0.0, 0, False))
    torch.library.opcheck(torch.ops.lcpaq.quantize_act.default,
                          (torch.randn(2, 3).cuda(), 0.1, 4, 0, 255))


def test_converted_mixed_model_on_gpu_equals_cpu_kernels() -> None:
    from lcpaq.policy import Policy
    from lcpaq.quant import apply_policy, quantizable_names
    from lcpaq.testing.models import TinyResNet

    torch.manual_seed(0)
    m = TinyResNet().eval()
    names = quantizable_names(m)
    pairs = {"stem": (8, 8), "conv1": (4, 8), "conv2": (2, 8), "proj": (3, 6), "fc": (8, 8)}
    pol = Policy({n: pairs.get(n, (8, 8)) for n in names})
    calib = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    apply_policy(m, pol, calib_loader=calib, calib_batches=3)
    cpu_model = convert(copy.deepcopy(m), pol)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_cpu, y_gpu = cpu_model(x), gpu_model(x.cuda())
    assert y_gpu.is_cuda
    # the integer layers are bit-exact; float glue (BN, add, pooling) may round differently
    assert torch.allclose(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4 * float(y_cpu.abs().max()))
