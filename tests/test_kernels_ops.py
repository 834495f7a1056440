"""lcpaq integer kernels: bit-exact against the int64 reference, opcheck, ISA/thread variants."""

from __future__ import annotations

import pytest
import torch

from lcpaq.errors import KernelError
from lcpaq.kernels import (
    available,
    pack_conv_weight,
    pack_weight,
    qconv2d,
    qgemm_i32,
    qlinear,
    quantize_act,
    unpack_weight,
)
from lcpaq.kernels import reference as ref

needs_ext = pytest.mark.skipif(not available(), reason="lcpaq/_C extension not built")

BITS = [pytest.param(b, id=f"w{b}") for b in (8, 7, 4, 2)]
# "best": what the CPU has (AVX-512 VNNI where present); "avx2" forces the AVX2 micro-kernels,
# "avxvnni" the ymm vpdpbusd one (AVX2 where the CPU lacks AVX-VNNI)
ISAS = ["best", "avx2", "avxvnni"]
XDT = [pytest.param(torch.uint8, id="u8"), pytest.param(torch.int8, id="s8")]
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in [(1, 1, 1), (7, 13, 37), (13, 1000, 100), (50, 33, 777), (400, 20, 70), (2000, 20, 37)]]


def _rand_w(n: int, k: int, bits: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g)


def _rand_x(shape: tuple[int, ...], dt: torch.dtype, g: torch.Generator) -> torch.Tensor:
    lo, hi = (0, 256) if dt == torch.uint8 else (-128, 128)
    return torch.randint(lo, hi, shape, generator=g).to(dt)


@pytest.fixture(params=[1, 2], ids=["t1", "t2"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("bits", BITS)
def test_pack_roundtrip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n, k in [(1, 1), (17, 9), (16, 8), (40, 131)]:
        q = _rand_w(n, k, bits, g)
        assert torch.equal(unpack_weight(pack_weight(q, bits), bits, n, k), q.to(torch.int8))


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(KernelError, match="4-bit range"):
        pack_weight(torch.tensor([[8]]), 4)
    with pytest.raises(KernelError, match="one of"):
        pack_weight(torch.tensor([[1]]), 3)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
def test_qgemm_exact_vs_int64(bits: int, xdt: torch.dtype, shape, threads: int) -> None:
    m, n, k = shape
    g = torch.Generator().manual_seed(m * 7 + n + k + bits)
    x, q = _rand_x((m, k), xdt, g), _rand_w(n, k, bits, g)
    got = qgemm_i32(x, pack_weight(q, bits), bits, n)
    want = (x.long() @ q.long().T).to(torch.int32)
    assert torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("isa", ISAS)
def test_qgemm_extreme_values(bits: int, xdt: torch.dtype, isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-range activations against the most negative/positive weights over a long K: the
    int16 partial sums of vpmaddubsw (AVX2) must never saturate, and on the VNNI route 8-bit
    weights of -128 run through vpdpbusd exactly."""
    if isa != "best":
        monkeypatch.setenv("LCPAQ_KERNELS_ISA", isa)
    k = 4099
    xmax = 255 if xdt == torch.uint8 else -128
    x = torch.full((7, k), xmax, dtype=torch.int64)
    x[1] = 0 if xdt == torch.uint8 else 127
    x[2, ::2] = 0 if xdt == torch.uint8 else 127
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.full((18, k), lo, dtype=torch.int64)
    q[1] = hi
    q[2, 1::2] = hi
    x = x.to(xdt)
    got = qgemm_i32(x, pack_weight(q, bits), bits, 18)
    assert torch.equal(got.long(), x.long() @ q.T)


@needs_ext
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["f32", "u8-relu", "u8-negscale-nobias"])
def test_qlinear_epilogue_matches_reference(bits: int, xdt: torch.dtype, mode: str, threads: int) -> None:
    g = torch.Generator().manual_seed(bits)
    m, n, k = 13, 45, 200
    x, q = _rand_x((2, m, k), xdt, g), _rand_w(n, k, bits, g)
    ws, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    zx = 17 if xdt == torch.uint8 else -3
    osc, ozp, relu = (0.0, 0, False) if mode == "f32" else (0.07, 11, True)
    if mode == "u8-negscale-nobias":  # BN folded by convert() can flip a channel's scale sign
        ws, bias, relu = ws * (torch.rand(n, generator=g) - 0.5).sign(), None, False
    blob = pack_weight(q, bits)
    args = (x, blob, bits, n, ws, 0.031, zx, bias, osc, ozp, relu)
    got, want = qlinear(*args), ref.qlinear(*args)
    assert got.dtype == (torch.float32 if mode == "f32" else torch.uint8)
    assert torch.equal(got, want)
    if mode == "f32":  # and it is the real-valued product of the dequantized operands
        real = ((x.double() - zx) * 0.031) @ (q.double() * ws.double()[:, None]).T + bias.double()  # type: ignore[union-attr]
        assert torch.allclose(got.double(), real, rtol=1e-5, atol=1e-3)


CONVS = [
    pytest.param(dict(c=5, co=7, h=9, w=11, k=3, s=1, p=1, d=1, g=1), id="3x3"),
    pytest.param(dict(c=16, co=20, h=8, w=8, k=1, s=1, p=0, d=1, g=1), id="1x1"),
    pytest.param(dict(c=3, co=8, h=15, w=15, k=7, s=2, p=3, d=1, g=1), id="7x7s2"),
    pytest.param(dict(c=6, co=4, h=7, w=6, k=3, s=2, p=1, d=2, g=2), id="grouped-dil"),
    pytest.param(dict(c=8, co=8, h=6, w=6, k=3, s=1, p=1, d=1, g=8), id="depthwise"),
]


@needs_ext
@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
def test_qconv2d_matches_reference(bits: int, xdt: torch.dtype, cfg: dict, threads: int) -> None:
    g = torch.Generator().manual_seed(cfg["c"] + bits)
    x = _rand_x((2, cfg["c"], cfg["h"], cfg["w"]), xdt, g)
    wshape = [cfg["co"], cfg["c"] // cfg["g"], cfg["k"], cfg["k"]]
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), wshape, generator=g)
    blob = pack_conv_weight(q, bits, cfg["g"])
    ws, bias = torch.rand(cfg["co"], generator=g) * 0.02, torch.randn(cfg["co"], generator=g)
    zx = 100 if xdt == torch.uint8 else 5
    args = (x, blob, bits, wshape, [cfg["s"]] * 2, [cfg["p"]] * 2, [cfg["d"]] * 2, cfg["g"], ws,
            0.05, zx, bias, 0.0, 0, False)
    got, want = qconv2d(*args), ref.qconv2d(*args)
    assert torch.equal(got, want)
    # and the reference is the float conv of the dequantized operands (padding = real zero)
    real = torch.nn.functional.conv2d((x.double() - zx) * 0.05, q.double() * ws.double().view(-1, 1, 1, 1),
                                      bias.double(), cfg["s"], cfg["p"], cfg["d"], cfg["g"])
    assert torch.allclose(got.double(), real, rtol=1e-5, atol=1e-3)


@needs_ext
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni"])
def test_forced_isa_is_exact(bits: int, xdt: torch.dtype, isa: str, threads: int,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """LCPAQ_KERNELS_ISA=scalar|avx2|avxvnni runs the lower paths (the default one is the best the CPU
    has): each exact, so all paths agree bit for bit. 50 rows x 40 channels: an odd panel count
    (the VNNI kernel's single-panel tile) and a partial row tile; 2000 rows x 37: row blocks
    read in place (uint8, K not a multiple of 4: each row's last step reads into the next); one
    row (GEMV: the VNNI kernel reading the blob, 3 and 2 panels, odd step counts and the 2-bit
    blob's half-filled last load at K=37)."""
    g = torch.Generator().manual_seed(3)
    for m, n, k in [(50, 40, 300), (2000, 20, 37), (1, 40, 300), (1, 20, 37), (1, 70, 4)]:
        x, q = _rand_x((m, k), xdt, g), _rand_w(n, k, bits, g)
        blob = pack_weight(q, bits)
        monkeypatch.delenv("LCPAQ_KERNELS_ISA", raising=False)
        best = qgemm_i32(x, blob, bits, n)
        monkeypatch.setenv("LCPAQ_KERNELS_ISA", isa)
        got = qgemm_i32(x, blob, bits, n)
        assert torch.equal(got.long(), x.long() @ q.T)
        assert torch.equal(got, best)


# convs that take the direct path (one group, unit column dilation, KW * C <= 64): the 7x7/s2
# stem with odd sizes and an odd panel count, a 1-channel 5x5 with row dilation 2, a 3x3 with
# unequal strides and paddings
DIRECT = [
    pytest.param(dict(c=3, co=40, h=23, w=18, k=(7, 7), s=(2, 2), p=(3, 3), d=(1, 1)), id="stem"),
    pytest.param(dict(c=1, co=16, h=9, w=13, k=(5, 5), s=(1, 1), p=(2, 2), d=(2, 1)), id="c1-5x5-dh2"),
    pytest.param(dict(c=5, co=7, h=8, w=11, k=(3, 3), s=(1, 2), p=(0, 1), d=(1, 1)), id="3x3-s12"),
]


@needs_ext
@pytest.mark.parametrize("xdt", XDT)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("isa", ["best", "avx2", "avxvnni", "scalar"])
def test_direct_conv_exact(bits: int, xdt: torch.dtype, isa: str, threads: int,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct conv (short kernel rows, the stem) equals the int64 reference and the im2col
    path (LCPAQ_KERNELS_DIRECT=0) bit for bit on every ISA, also at full-range activations
    against the extreme weights (the int16 partial sums of the AVX2 W4/W2 kernels)."""
    if isa != "best":
        monkeypatch.setenv("LCPAQ_KERNELS_ISA", isa)
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for i, param in enumerate(DIRECT + [DIRECT[0]]):
        cfg = param.values[0]
        x = _rand_x((2, cfg["c"], cfg["h"], cfg["w"]), xdt, g)
        wshape = [cfg["co"], cfg["c"], *cfg["k"]]
        q = torch.randint(lo, hi + 1, wshape, generator=g)
        if i == len(DIRECT):  # extremes: x at its maximum magnitude, weights at lo (one channel hi)
            x.fill_(255 if xdt == torch.uint8 else -128)
            q.fill_(lo)
            q[1] = hi
        blob = pack_conv_weight(q, bits, 1)
        ws, bias = torch.rand(cfg["co"], generator=g) * 0.02, torch.randn(cfg["co"], generator=g)
        zx = 100 if xdt == torch.uint8 else 5
        for osc, ozp, relu in [(0.0, 0, False), (0.3, 7, True)]:
            args = (x, blob, bits, wshape, list(cfg["s"]), list(cfg["p"]), list(cfg["d"]), 1, ws,
                    0.05, zx, bias, osc, ozp, relu)
            got = qconv2d(*args)
            assert torch.equal(got, ref.qconv2d(*args)), (param.id, osc)
            monkeypatch.setenv("LCPAQ_KERNELS_DIRECT", "0")
            assert torch.equal(got, qconv2d(*args)), (param.id, osc)
            monkeypatch.delenv("LCPAQ_KERNELS_DIRECT")


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_quantize_act_matches_fake_quant(signed: bool) -> None:
    from lcpaq.quant.quantizers import act_range, fake_quant_act

    x = torch.randn(2, 3, 5, 5) * 3
    qmin, qmax = act_range(8, signed)
    zp = 0 if signed else 77
    s = torch.tensor(0.05)
    q = quantize_act(x, float(s), zp, qmin, qmax)
    assert q.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal((q.float() - zp) * s, fake_quant_act(x, s, zp, 8, signed))
    assert torch.equal(q, ref.quantize_act(x, float(s), zp, qmin, qmax))


@needs_ext
def test_bad_inputs_raise_clear_errors() -> None:
    blob = pack_weight(torch.zeros(4, 8, dtype=torch.int64), 4)
    with pytest.raises(RuntimeError, match="uint8 or int8"):
        torch.ops.lcpaq.qgemm_i32(torch.zeros(2, 8), blob, 4, 4)
    with pytest.raises(RuntimeError, match="bytes, expected"):
        torch.ops.lcpaq.qgemm_i32(torch.zeros(2, 9, dtype=torch.uint8), blob, 4, 4)


@needs_ext
@pytest.mark.parametrize("bits", BITS)
def test_opcheck(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, q = _rand_x((5, 40), torch.uint8, g), _rand_w(20, 40, bits, g)
    blob, ws = pack_weight(q, bits), torch.rand(20, generator=g)
    torch.library.opcheck(torch.ops.lcpaq.qgemm_i32.default, (x, blob, bits, 20))
    torch.library.opcheck(torch.ops.lcpaq.qlinear.default,
                          (x, blob, bits, 20, ws, 0.1, 3, torch.randn(20), 0.2, 5, True))
    xc = _rand_x((1, 4, 6, 6), torch.int8, g)
    qc = torch.randint(-2, 2, (6, 4, 3, 3), generator=g)
    torch.library.opcheck(
        torch.ops.lcpaq.qconv2d.default,
        (xc, pack_conv_weight(qc, bits, 1), bits, [6, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1,
         torch.rand(6, generator=g), 0.1, 0, None, 0.0, 0, False))
    torch.library.opcheck(torch.ops.lcpaq.quantize_act.default, (torch.randn(2, 3), 0.1, 4, 0, 255))
