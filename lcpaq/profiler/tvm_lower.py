"""Lower QDQ conv/matmul patterns in a Relax module to integer compute (TVM 0.27).

TVM 0.27's relax ONNX frontend imports a QDQ graph as ``dequantize -> float conv2d -> quantize``:
the bit-width would not change the compute at all. This pass rewrites

    conv2d(dequantize(x, sx, zx), dequantize(w, sw, 0))
        -> astype(conv2d(x, w, out_dtype="int32"), "float32") * (sx * sw[c])
    matmul(dequantize(x, sx, zx), permute_dims(dequantize(w, sw, 0)))
        -> astype(matmul(x, permute_dims(w), out_dtype="int32"), "float32") * (sx * sw[c])

so the conv/matmul runs on the integer tensors with an int32 accumulator; the float multiply is
the requantize (bias add, activation and the output ``quantize`` that follow stay as imported and
fuse into the same kernel). A non-zero activation zero point is subtracted in int16 first (the
ONNX padding value is the zero point, so ``conv(x) - zx * sum(w)`` would be wrong at borders).
Weights must be symmetric (zero point 0), as lcpaq exports them; anything else is left alone.

Tensor-intrinsic int8 path (``lower_qdq(mod, int8_intrin="vnni" | "avx2")``): TVM 0.27's own x86
int8 intrinsics sit behind a 34 s import and its generic int8 conv is a plain int32 loop nest, as
slow as its fp32 conv. Here a u8 x s8 conv with C % 4 == 0, O % L == 0, groups 1 (and, for AVX2,
weights within +-63) runs as ``conv2d_nchwc{L}_u8s8`` in NCHW4c x OIHW[i/4][L o][4 i] layouts, the
data packed by a ``layout_transform`` and the weights packed offline. Its L x 4 inner block is one
call of a tensor intrinsic from :data:`INT8_INTRINS` (VNNI: vpdpbusd, L = 16; AVX2: vpmaddubsw +
vpmaddwd by ones, L = 8), which MetaSchedule's ``MultiLevelTilingWithIntrin`` rule tiles for.
vpmaddubsw saturates an i16 pair sum: 2 * 255 * 63 = 32130 fits, so AVX2 is exact for |w| <= 63
(lcpaq's 8-bit weights use a 7-bit grid for the same reason on ORT); larger weights keep the
generic path. The output comes back to NCHW before the requantize epilogue (one more elementwise
kernel: a whole-model TVM deployment would keep NCHWc between layers, so this unit form is
conservative).

Example:
    >>> mod = from_onnx(onnx.load("unit.onnx"), keep_params_in_input=False)  # doctest: +SKIP
    >>> mod, kinds = lower_qdq(mod)  # doctest: +SKIP
    >>> kinds  # doctest: +SKIP
    ['conv2d-int8']
"""

from __future__ import annotations

from typing import Any

import numpy as np

# NCHWc epilogue (lower_qdq(nchwc_epilogue=True)) only for int8 convs with at least this many
# outputs: resnet18 at 1 thread, 64 trials: 200K and 100K outputs 1.65-1.71x ORT -> 1.27-1.37x;
# 50K and less 1.08-1.49x -> 1.16-1.58x (one more kernel launch, untuned-size elementwise tasks)
EPILOGUE_MIN_ELEMS = 65536

# int8 tensor intrinsics, by kind: (name, output channels per call (lanes), max |w| for exactness)
INT8_INTRINS = {
    # AVX2: vpmaddubsw (u8 x s8 -> i16 pair sums, saturating) + vpmaddwd by ones -> 8 x i32.
    # 2 * 255 * 63 = 32130 <= 32767: exact for |w| <= 63.
    "avx2": ("lcpaq_dot_8x4_u8i8i32_avx2", 8, 63),
    # AVX-512 VNNI: vpdpbusd, u8 x s8 summed in groups of 4 straight into 16 x i32: always exact.
    "vnni": ("lcpaq_dot_16x4_u8i8i32_vnni", 16, 127),
}


def register_int8_intrin(kind: str) -> str:
    """Register the ``kind`` ("avx2" or "vnni") 4-deep u8 x s8 dot intrinsic with TVM once per
    process (needed wherever a schedule that uses it is created or replayed: tuning, applying the
    database); returns its name. C[i] += sum_k A[k] * B[i, k], i < lanes, k < 4."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name, lanes, _ = INT8_INTRINS[kind]
    try:
        TensorIntrin.get(name)
        return name
    except Exception:  # noqa: BLE001 - not registered yet (TVM raises a plain ValueError/TVMError)
        pass

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def avx2(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((8, 4), "int8", offset_factor=1),
             c: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:4], b[0:8, 0:4])
            T.writes(c[0:8])
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")  # 4 input channels
            pairs = T.call_llvm_pure_intrin(  # 16 x (u8*s8 + u8*s8) -> i16
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32"), b.vload([0, 0], dtype="int8x32"),
                dtype="int16x16")
            c[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(  # pairs of i16 -> 8 x i32
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def vnni(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(  # c += 4-deep u8.s8 dots
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c.vload([0], dtype="int32x16"),
                # LLVM >= 19 declares the two u8/s8 operands as <64 x i8>
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"), b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(name, desc, avx2 if kind == "avx2" else vnni)
    return name


def conv2d_nchwc_u8s8(shape: tuple[int, ...], oc: int, k: tuple[int, int], strides: Any, padding: Any,
                      lanes: int = 8) -> Any:
    """PrimFunc: x u8 [N, C/4, H, W, 4] (*) w s8 [O/L, C/4, KH, KW, L, 4] -> i32 [N, O/L, OH, OW, L]
    with L = ``lanes``; zero padding (the activation zero point is 0 on this path)."""
    return _conv2d_nchwc(shape, oc, k, strides, padding, lanes, int8=True)


def conv2d_nchwc_f32(shape: tuple[int, ...], oc: int, k: tuple[int, int], strides: Any, padding: Any,
                     lanes: int = 16) -> Any:
    """PrimFunc: x f32 [N, C/4, H, W, 4] (*) w f32 [O/L, C/4, KH, KW, 4, L] -> f32 [N, O/L, OH, OW, L]:
    the output-channel block is innermost in the weights and the output, one vector FMA per input
    value (the x86 NCHWc form; TVM's NCHW conv vectorizes poorly at 64 trials)."""
    return _conv2d_nchwc(shape, oc, k, strides, padding, lanes, int8=False)


def _conv2d_nchwc(shape: tuple[int, ...], oc: int, k: tuple[int, int], strides: Any, padding: Any,
                  lanes: int, *, int8: bool) -> Any:
    """The packed conv of both paths. int8: the 4 input channels are innermost in the weights
    ([.., L, 4], what the vpdpbusd / vpmaddubsw intrinsics read) and products accumulate in int32;
    float: the L output channels are innermost ([.., 4, L])."""
    from tvm import te, tirx

    n, c, h, w = shape
    kh, kw = k
    sh, sw = (int(v) for v in strides)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    xdt = "uint8" if int8 else "float32"
    x = te.placeholder((n, c // 4, h, w, 4), xdt, name="x")
    wshape = (oc // lanes, c // 4, kh, kw, lanes, 4) if int8 else (oc // lanes, c // 4, kh, kw, 4, lanes)
    wt = te.placeholder(wshape, "int8" if int8 else "float32", name="w")
    xp = te.compute(
        (n, c // 4, h + pt + pb, w + pl + pr, 4),
        lambda b, ci, y, xx, c4: tirx.if_then_else(
            tirx.all(y >= pt, y < h + pt, xx >= pl, xx < w + pl), x[b, ci, y - pt, xx - pl, c4],
            tirx.const(0, xdt)), name="pad")
    ric, rkh, rkw, rc4 = (te.reduce_axis((0, e), nm) for e, nm in ((c // 4, "ic"), (kh, "kh"), (kw, "kw"), (4, "c4")))
    if int8:
        out = te.compute(
            (n, oc // lanes, oh, ow, lanes),
            lambda b, o, y, xx, o8: te.sum(
                xp[b, ric, y * sh + rkh, xx * sw + rkw, rc4].astype("int32")
                * wt[o, ric, rkh, rkw, o8, rc4].astype("int32"), axis=[ric, rkh, rkw, rc4]),
            name="conv2d_nchwc")
    else:
        out = te.compute(
            (n, oc // lanes, oh, ow, lanes),
            lambda b, o, y, xx, ol: te.sum(xp[b, ric, y * sh + rkh, xx * sw + rkw, rc4] * wt[o, ric, rkh, rkw, rc4, ol],
                                           axis=[ric, rkh, rkw, rc4]),
            name="conv2d_nchwc_f32")
    return te.create_prim_func([x, wt, out])


def _const_np(expr: Any) -> np.ndarray | None:
    import tvm

    if isinstance(expr, tvm.ir.Constant):  # 0.27: relax.Constant moved to tvm.ir.Constant
        return expr.value.numpy()  # and .data became .value
    return None


def _int_operand(x: Any, zp: np.ndarray | None, dtype: str) -> tuple[Any, str]:
    """The integer form of a dequantized operand: itself if its zero point is 0, else x - zp in int16."""
    from tvm import relax

    if zp is None:
        return None, ""
    if not np.any(zp):
        return x, dtype
    z = relax.const(np.asarray(zp, np.int16).reshape(()) if zp.size == 1 else np.asarray(zp, np.int16))
    return relax.op.subtract(relax.op.astype(x, "int16"), z), "int16"


def lower_qdq(mod: Any, *, int8_intrin: str | None = None, fp32_nchwc: int = 0,
              nchwc_epilogue: bool = False, fp32_unpack: bool = False,
              int8_unpack: bool = False) -> tuple[Any, list[str]]:
    """Rewrite QDQ conv2d/matmul in ``mod['main']`` to int32-accumulating integer ops.

    Returns the new module (dead dequantize ops removed) and the kinds of kernels lowered, e.g.
    ``["conv2d-int8"]`` (``"conv2d-int8-avx2"`` / ``"-vnni"`` on the tensor-intrinsic path that
    ``int8_intrin`` = "avx2" / "vnni" enables, see the module doc); an empty list means nothing
    matched (an fp32 unit). ``fp32_nchwc`` = L > 0 also rewrites float convs (C % 4 == 0,
    O % L == 0, groups 1) to :func:`conv2d_nchwc_f32`; their kind is then ``"conv2d-fp32-nchwc"``.
    ``nchwc_epilogue``: the elementwise ops after a packed int8 conv (requantize, bias, activation,
    output quantize) run on its NCHWc output and only the uint8 result goes back to NCHW, through an
    opaque transpose kernel (:func:`sink_epilogue`).
    ``fp32_unpack``: the NCHWc float conv's output goes back to NCHW through a hand-vectorized
    kernel that also adds the bias and applies the ReLU (:func:`vector_unpack`), instead of the
    transposing loop nest FuseOps builds around them. ``int8_unpack``: the same for a packed int8
    conv's requantize epilogue (scale, bias, ReLU, output quantize: :func:`vector_requant`).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    kinds: list[str] = []
    prims: dict[str, Any] = {}  # name -> (GlobalVar, PrimFunc) added for the intrinsic path
    big: dict[str, bool] = {}  # int8 conv name -> output large enough for the NCHWc epilogue
    builder = relax.BlockBuilder(mod)
    x, sx, zx = wildcard(), is_const(), is_const()
    w, sw, zw = is_const(), is_const(), is_const()
    dqx = is_op("relax.dequantize")(x, sx, zx)
    dqw = is_op("relax.dequantize")(w, sw, zw)
    conv = is_op("relax.nn.conv2d")(dqx, dqw)
    tw = is_op("relax.permute_dims")(dqw)
    mm = is_op("relax.matmul")(dqx, tw)

    def operands(m: Any) -> tuple[Any, Any, np.ndarray, str] | None:
        wv, zwv = _const_np(m[w]), _const_np(m[zw])
        sxv, swv = _const_np(m[sx]), _const_np(m[sw])
        if wv is None or zwv is None or sxv is None or swv is None or np.any(zwv):
            return None  # asymmetric weights: leave the float path
        if sxv.size != 1 or str(wv.dtype) not in ("int8", "uint8"):
            return None
        xd = str(m[x].ty.dtype)  # 0.27: struct_info -> ty
        if xd not in ("int8", "uint8"):
            return None
        xi, xdt = _int_operand(m[x], _const_np(m[zx]), xd)
        if xi is None:
            return None
        wi = m[w]
        if xdt == "int16":
            wi = relax.op.astype(wi, "int16")
        scale = (float(sxv.reshape(())) * swv.astype(np.float64)).astype(np.float32)
        return xi, wi, scale, "int16" if xdt == "int16" else "int8"

    def intrin_conv(m: dict, xi: Any, wv: np.ndarray, scale: np.ndarray) -> Any | None:
        _, lanes, max_w = INT8_INTRINS[int8_intrin]  # type: ignore[index]
        a = m[conv].attrs
        shape = [int(d) for d in m[x].ty.shape]
        o, c = wv.shape[:2]
        if (str(m[x].ty.dtype) != "uint8" or not xi.same_as(m[x]) or str(wv.dtype) != "int8" or int(a.groups) != 1
                or c % 4 or o % lanes or len(shape) != 4 or any(int(d) != 1 for d in a.dilation)
                or (a.data_layout, a.kernel_layout) != ("NCHW", "OIHW")
                or np.abs(wv.astype(np.int32)).max() > max_w):
            return None
        kh, kw = wv.shape[2:]
        name = f"conv2d_nchwc{lanes}_u8s8_{'x'.join(map(str, shape))}_o{o}_k{kh}x{kw}_s{a.strides[0]}x{a.strides[1]}" \
               f"_p{'x'.join(str(int(p)) for p in a.padding)}"
        if name not in prims:  # a typed GlobalVar, as call_tir's normalizer requires
            prim = conv2d_nchwc_u8s8(tuple(shape), o, (kh, kw), a.strides, a.padding, lanes)
            prims[name] = (builder.add_func(prim.with_attr("global_symbol", name), name), prim)
        # offline weight packing (a constant): OIHW -> [O/L, C/4, KH, KW, L o, 4 i]
        wp = wv.reshape(o // lanes, lanes, c // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3).copy()
        xc = relax.op.layout_transform(xi, index_map=lambda b, ch, y, xx: (b, ch // 4, y, xx, ch % 4))
        oshape = [int(d) for d in m[conv].ty.shape]
        big[name] = int(np.prod(oshape)) >= EPILOGUE_MIN_ELEMS
        acc = relax.call_tir(prims[name][0], [xc, relax.const(wp)], relax.TensorType(
            (oshape[0], o // lanes, oshape[2], oshape[3], lanes), "int32"))
        # back to NCHW: [N, O/L, OH, OW, L] -> [N, O/L, L, OH, OW] -> [N, O, OH, OW]
        acc = relax.op.reshape(relax.op.permute_dims(acc, [0, 1, 4, 2, 3]), oshape)
        c_ = scale.size
        s_ = relax.const(scale.reshape((1, c_, 1, 1)) if c_ > 1 else scale.reshape(()))
        kinds.append(f"conv2d-int8-{int8_intrin}")
        return relax.op.multiply(relax.op.astype(acc, "float32"), s_)

    def rw_conv(expr: Any, m: dict) -> Any:
        ops = operands(m)
        if ops is None:
            return expr
        xi, wi, scale, kind = ops
        if int8_intrin and kind == "int8":
            fast = intrin_conv(m, xi, _const_np(m[w]), scale)
            if fast is not None:
                return fast
        a = m[conv].attrs
        acc = relax.op.nn.conv2d(
            xi, wi, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
            data_layout=a.data_layout, kernel_layout=a.kernel_layout, out_layout=a.out_layout,
            out_dtype="int32")
        c = scale.size
        s = relax.const(scale.reshape((1, c, 1, 1)) if c > 1 else scale.reshape(()))
        kinds.append(f"conv2d-{kind}")
        return relax.op.multiply(relax.op.astype(acc, "float32"), s)

    def rw_mm(expr: Any, m: dict) -> Any:
        ops = operands(m)
        if ops is None:
            return expr
        xi, _, scale, kind = ops
        perm = m[tw].attrs.axes
        # transpose the constant weights here: once lifted to a parameter, a permute_dims would
        # run at every call (fp32 units come from ONNX with the weights stored transposed)
        wt = _const_np(m[w])
        wt = np.ascontiguousarray(np.transpose(wt, None if perm is None else [int(a) for a in perm]))
        wc = relax.const(wt.astype(np.int16) if kind == "int16" else wt)
        acc = relax.op.matmul(xi, wc, out_dtype="int32")
        s = relax.const(scale.reshape((1, -1)) if scale.size > 1 else scale.reshape(()))
        kinds.append(f"matmul-{kind}")
        return relax.op.multiply(relax.op.astype(acc, "float32"), s)

    fx, fw = wildcard(), is_const()
    conv_f = is_op("relax.nn.conv2d")(fx, fw)

    def rw_conv_f32(expr: Any, m: dict) -> Any:
        a, wv = m[conv_f].attrs, _const_np(m[fw])
        shape = [int(d) for d in m[fx].ty.shape] if len(m[fx].ty.shape or []) == 4 else []
        lanes = fp32_nchwc
        if (wv is None or str(wv.dtype) != "float32" or str(m[fx].ty.dtype) != "float32" or not shape
                or int(a.groups) != 1 or wv.shape[1] % 4 or wv.shape[0] % lanes
                or any(int(d) != 1 for d in a.dilation) or (a.data_layout, a.kernel_layout) != ("NCHW", "OIHW")):
            return expr
        o, c, kh, kw = wv.shape
        name = f"conv2d_nchwc{lanes}_f32_{'x'.join(map(str, shape))}_o{o}_k{kh}x{kw}_s{a.strides[0]}x{a.strides[1]}" \
               f"_p{'x'.join(str(int(p)) for p in a.padding)}"
        if name not in prims:
            prim = conv2d_nchwc_f32(tuple(shape), o, (kh, kw), a.strides, a.padding, lanes)
            prims[name] = (builder.add_func(prim.with_attr("global_symbol", name), name), prim)
        # OIHW -> [O/L, C/4, KH, KW, 4 i, L o], packed offline (a constant)
        wp = wv.reshape(o // lanes, lanes, c // 4, 4, kh, kw).transpose(0, 2, 4, 5, 3, 1).copy()
        xc = relax.op.layout_transform(m[fx], index_map=lambda b, ch, y, xx: (b, ch // 4, y, xx, ch % 4))
        oshape = [int(d) for d in m[conv_f].ty.shape]
        acc = relax.call_tir(prims[name][0], [xc, relax.const(wp)], relax.TensorType(
            (oshape[0], o // lanes, oshape[2], oshape[3], lanes), "float32"))
        kinds.append("conv2d-fp32-nchwc")
        return relax.op.reshape(relax.op.permute_dims(acc, [0, 1, 4, 2, 3]), oshape)

    funcs = {}
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            fn = rewrite_call(conv, rw_conv, fn)
            fn = rewrite_call(mm, rw_mm, fn)
            if fp32_nchwc:
                fn = rewrite_call(conv_f, rw_conv_f32, fn)
        funcs[gv] = fn
    for pgv, _ in prims.values():
        funcs[pgv] = builder.get()[pgv]
    new = tvm.IRModule(funcs, attrs=mod.attrs)
    new = relax.transform.DeadCodeElimination()(new)
    new = relax.transform.FoldConstant()(new)
    if fp32_unpack and "conv2d-fp32-nchwc" in kinds:
        new = vector_unpack(new)
    if int8_unpack and prims:
        new = vector_requant(new)
    if nchwc_epilogue and prims:
        # the packed convs stay kernels of their own (FuseTIR rejects fusing these TE convs with an
        # elementwise consumer in 0.27: "Inconsistent buffers ... mapped to the same relax var")
        # int8 convs with >= EPILOGUE_MIN_ELEMS outputs only: their int32 accumulator is 4x the size
        # of the uint8 result; on small outputs the extra kernel cost more than it saved. A float conv
        # gains nothing (its transpose still moves float32; measured 1.42 vs 1.44 ms on resnet18's
        # 64->64 56x56 conv, and the re-tuned opaque conv came out slower)
        new = sink_epilogue(tvm.IRModule({gv: (f.with_attr("op_pattern", 8) if big.get(gv.name_hint) else f)
                                          for gv, f in new.functions.items()}, attrs=new.attrs),
                            dtypes=("int32",), min_elems=EPILOGUE_MIN_ELEMS)
    return new, kinds


def nchwc_to_nchw(shape: tuple[int, ...], dtype: str) -> Any:
    """PrimFunc [N, C/L, H, W, L] -> [N, C, H, W] (``shape`` = the NCHWc shape), marked opaque
    (``op_pattern`` 8) so that FuseOps keeps the elementwise ops before it out of this loop nest:
    they run vectorized on the NCHWc tensor."""
    from tvm import te

    n, cb, h, w, lanes = shape
    x = te.placeholder(shape, dtype, name="x")
    y = te.compute((n, cb * lanes, h, w), lambda b, c, yy, xx: x[b, c // lanes, yy, xx, c % lanes], name="T_nchw")
    return te.create_prim_func([x, y]).with_attr("op_pattern", 8)


def unpack_nchwc(shape: tuple[int, ...], dtype: str, *, bias: bool, relu: bool) -> Any:
    """Scheduled PrimFunc x [N, C/L, H, W, L] (+ bias [1, C, 1, 1]) -> y [N, C, H, W], with the
    bias added and the ReLU applied on the way (``shape`` = the NCHWc shape).

    Written vectorized by hand (``tirx.is_scheduled``: no tuning task) and opaque (``op_pattern``
    8: FuseOps leaves it alone): for each block of ``tw`` spatial positions and each of the L
    channels, one ``tw``-lane store along H*W (contiguous in y) from a stride-L load (LLVM
    gathers it with inserts from the L1-resident block). The loop nest FuseOps built for
    ``relu(reshape(permute_dims(x)) + b)`` stored one element at a time: 74 us vs 30 us for
    resnet18's 64x56x56 fp32 output on this host (warm, in a loop). ``tirx.noalias`` is required:
    with the key ``tir.noalias`` instead, no kernel of the module got its noalias compute function
    and the tuned conv beside it ran 2.3x slower.
    """
    from tvm.script import tirx as T

    n, cb, h, w, lanes = (int(d) for d in shape)
    hw = h * w
    tw = next(t for t in (16, 8, 4, 2, 1) if hw % t == 0)
    zero = 0.0

    if bias:
        @T.prim_func(private=True)
        def f_bias(x: T.Buffer((n, cb, h, w, lanes), dtype), b: T.Buffer((1, cb * lanes, 1, 1), dtype),
                   y: T.Buffer((n, cb * lanes, h, w), dtype)) -> None:
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            xf = T.decl_buffer((n * cb * hw * lanes,), dtype, data=x.data)
            yf = T.decl_buffer((n * cb * lanes * hw,), dtype, data=y.data)
            bf = T.decl_buffer((cb * lanes,), dtype, data=b.data)
            for i, s in T.grid(n * cb, hw // tw):
                for c in T.unroll(lanes):
                    for j in T.vectorized(tw):
                        if relu:
                            yf[(i * lanes + c) * hw + s * tw + j] = T.max(
                                xf[(i * hw + s * tw + j) * lanes + c] + bf[(i % cb) * lanes + c], T.Cast(dtype, zero))
                        else:
                            yf[(i * lanes + c) * hw + s * tw + j] = (
                                xf[(i * hw + s * tw + j) * lanes + c] + bf[(i % cb) * lanes + c])
        return f_bias

    @T.prim_func(private=True)
    def f_plain(x: T.Buffer((n, cb, h, w, lanes), dtype), y: T.Buffer((n, cb * lanes, h, w), dtype)) -> None:
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        xf = T.decl_buffer((n * cb * hw * lanes,), dtype, data=x.data)
        yf = T.decl_buffer((n * cb * lanes * hw,), dtype, data=y.data)
        for i, s in T.grid(n * cb, hw // tw):
            for c in T.unroll(lanes):
                for j in T.vectorized(tw):
                    if relu:
                        yf[(i * lanes + c) * hw + s * tw + j] = T.max(xf[(i * hw + s * tw + j) * lanes + c],
                                                                      T.Cast(dtype, zero))
                    else:
                        yf[(i * lanes + c) * hw + s * tw + j] = xf[(i * hw + s * tw + j) * lanes + c]
    return f_plain


def unpack_requant_nchwc(shape: tuple[int, ...], *, relu: bool, out_scale: float, out_zp: int,
                         out_dtype: str) -> Any:
    """Scheduled PrimFunc: the int32 accumulator x [N, C/L, H, W, L] of a packed int8 conv, its
    per-channel scale s and bias b ([1, C, 1, 1] float32) -> y [N, C, H, W] of ``out_dtype``:
    ``clip(round(relu(float(x) * s + b) / out_scale) + out_zp)``, the requantize epilogue and the
    transposition back to NCHW in one vectorized pass (same loop form as :func:`unpack_nchwc`)."""
    from tvm.script import tirx as T

    n, cb, h, w, lanes = (int(d) for d in shape)
    hw = h * w
    tw = next(t for t in (16, 8, 4, 2, 1) if hw % t == 0)
    lo, hi = (0.0, 255.0) if out_dtype == "uint8" else (-128.0, 127.0)
    inv, zp, zero = 1.0 / float(out_scale), float(out_zp), 0.0

    @T.prim_func(private=True)
    def f(x: T.Buffer((n, cb, h, w, lanes), "int32"), sc: T.Buffer((1, cb * lanes, 1, 1), "float32"),
          b: T.Buffer((1, cb * lanes, 1, 1), "float32"), y: T.Buffer((n, cb * lanes, h, w), out_dtype)) -> None:
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        xf = T.decl_buffer((n * cb * hw * lanes,), "int32", data=x.data)
        yf = T.decl_buffer((n * cb * lanes * hw,), out_dtype, data=y.data)
        sf = T.decl_buffer((cb * lanes,), "float32", data=sc.data)
        bf = T.decl_buffer((cb * lanes,), "float32", data=b.data)
        for i, s in T.grid(n * cb, hw // tw):
            for c in T.unroll(lanes):
                for j in T.vectorized(tw):
                    if relu:
                        yf[(i * lanes + c) * hw + s * tw + j] = T.Cast(out_dtype, T.max(T.min(T.round(
                            T.max(T.Cast("float32", xf[(i * hw + s * tw + j) * lanes + c]) * sf[(i % cb) * lanes + c]
                                  + bf[(i % cb) * lanes + c], T.float32(zero)) * T.float32(inv)) + T.float32(zp),
                            T.float32(hi)), T.float32(lo)))
                    else:
                        yf[(i * lanes + c) * hw + s * tw + j] = T.Cast(out_dtype, T.max(T.min(T.round(
                            (T.Cast("float32", xf[(i * hw + s * tw + j) * lanes + c]) * sf[(i % cb) * lanes + c]
                             + bf[(i % cb) * lanes + c]) * T.float32(inv)) + T.float32(zp),
                            T.float32(hi)), T.float32(lo)))
    return f


def vector_requant(mod: Any) -> Any:
    """Replace ``quantize([relu](astype(reshape(permute_dims(acc)), f32) * s + b), ys, yz)`` after a
    packed int8 conv (``acc`` int32 NCHWc, ``s`` and ``b`` [1, C, 1, 1] constants, scalar ``ys`` /
    ``yz``) by one :func:`unpack_requant_nchwc` kernel; other chains are left as they are."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    builder = relax.BlockBuilder(mod)
    added: dict[str, Any] = {}
    src, sconst, bconst, ys, yz = wildcard(), is_const(), is_const(), is_const(), is_const()
    perm = is_op("relax.permute_dims")(src)
    back = is_op("relax.reshape")(perm, wildcard())
    biased = is_op("relax.add")(is_op("relax.multiply")(is_op("relax.astype")(back), sconst), bconst)
    forms = [(is_op("relax.quantize")(is_op("relax.nn.relu")(biased), ys, yz), True),
             (is_op("relax.quantize")(biased, ys, yz), False)]

    def rewrite(relu: bool) -> Any:
        def fn(expr: Any, m: dict) -> Any:
            x = m[src]
            shape = [int(d) for d in x.ty.shape]
            if (len(shape) != 5 or [int(a) for a in m[perm].attrs.axes] != [0, 1, 4, 2, 3]
                    or str(x.ty.dtype) != "int32"):
                return expr
            n, cb, h, w, lanes = shape
            sv, bv, ysv, yzv = (_const_np(m[c]) for c in (sconst, bconst, ys, yz))
            c_ = cb * lanes
            if (any(v is None for v in (sv, bv, ysv, yzv)) or sv.shape != (1, c_, 1, 1) or bv.shape != (1, c_, 1, 1)
                    or ysv.size != 1 or yzv.size != 1 or str(expr.ty.dtype) not in ("uint8", "int8")):
                return expr
            dtype = str(expr.ty.dtype)
            ysf, yzi = float(ysv.reshape(())), int(yzv.reshape(()))
            name = f"unpack_requant_nchwc{lanes}_{dtype}{'_r' if relu else ''}_{n}x{cb}x{h}x{w}_{ysf:.6g}_{yzi}"
            name = name.replace(".", "p").replace("-", "m")
            if name not in added:
                prim = unpack_requant_nchwc((n, cb, h, w, lanes), relu=relu, out_scale=ysf, out_zp=yzi, out_dtype=dtype)
                added[name] = builder.add_func(prim.with_attr("global_symbol", name), name)
            return relax.call_tir(added[name], [x, m[sconst], m[bconst]], relax.TensorType((n, c_, h, w), dtype))
        return fn

    funcs = {}
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            for pat, relu in forms:
                fn = rewrite_call(pat, rewrite(relu), fn)
        funcs[gv] = fn
    for gv in added.values():
        funcs[gv] = builder.get()[gv]
    return relax.transform.DeadCodeElimination()(tvm.IRModule(funcs, attrs=mod.attrs))


def vector_unpack(mod: Any, dtypes: tuple[str, ...] = ("float32",)) -> Any:
    """Replace ``[relu](reshape(permute_dims(x, [0, 1, 4, 2, 3])) [+ bias])`` (how lower_qdq brings an
    NCHWc conv output back to NCHW, then the imported bias add and ReLU), ``x`` 5-D of one of
    ``dtypes``, bias a [1, C, 1, 1] constant, by one :func:`unpack_nchwc` kernel. A residual add or
    anything else after it stays as it was."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    builder = relax.BlockBuilder(mod)
    added: dict[str, Any] = {}
    src, bconst = wildcard(), is_const()
    perm = is_op("relax.permute_dims")(src)
    back = is_op("relax.reshape")(perm, wildcard())
    with_bias = is_op("relax.add")(back, bconst)
    forms = [(is_op("relax.nn.relu")(with_bias), True, True), (with_bias, True, False),
             (is_op("relax.nn.relu")(back), False, True), (back, False, False)]  # longest first

    def rewrite(has_bias: bool, relu: bool) -> Any:
        def fn(expr: Any, m: dict) -> Any:
            x = m[src]
            shape = [int(d) for d in x.ty.shape]
            if (len(shape) != 5 or [int(a) for a in m[perm].attrs.axes] != [0, 1, 4, 2, 3]
                    or str(x.ty.dtype) not in dtypes):
                return expr
            n, cb, h, w, lanes = shape
            args = [x]
            if has_bias:
                b = _const_np(m[bconst])
                if b is None or b.shape != (1, cb * lanes, 1, 1):
                    return expr
                args.append(m[bconst])
            dtype = str(x.ty.dtype)
            name = f"unpack_nchwc{lanes}_{dtype}{'_b' if has_bias else ''}{'_r' if relu else ''}_{n}x{cb}x{h}x{w}"
            if name not in added:
                prim = unpack_nchwc((n, cb, h, w, lanes), dtype, bias=has_bias, relu=relu)
                added[name] = builder.add_func(prim.with_attr("global_symbol", name), name)
            return relax.call_tir(added[name], args, relax.TensorType((n, cb * lanes, h, w), dtype))
        return fn

    funcs = {}
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            for pat, has_bias, relu in forms:
                fn = rewrite_call(pat, rewrite(has_bias, relu), fn)
        funcs[gv] = fn
    for gv in added.values():
        funcs[gv] = builder.get()[gv]
    return relax.transform.DeadCodeElimination()(tvm.IRModule(funcs, attrs=mod.attrs))


# elementwise ops moved onto the NCHWc output: (relax op, its constant operands are channel-wise)
_SINKABLE = ("relax.astype", "relax.multiply", "relax.add", "relax.nn.relu", "relax.quantize")


def sink_epilogue(mod: Any, dtypes: tuple[str, ...] = ("int32", "float32"), min_elems: int = 0) -> Any:
    """Move the elementwise chain after ``reshape(permute_dims(nchwc, [0, 1, 4, 2, 3]))`` (the way
    lower_qdq brings a packed conv's output back to NCHW) before the transposition: astype,
    multiply / add by a scalar or a [1, C, 1, 1] constant, relu, quantize with scalar parameters.
    The transposition then moves the final (for an int8 layer: uint8, 4x smaller) tensor, in an
    opaque kernel of its own; the chain runs as one contiguous elementwise kernel on the NCHWc
    tensor (vectorizable), instead of inside the transposing loop nest.
    A chain op with another operand (a residual add) ends the chain: it stays after the transpose.
    ``dtypes``: the NCHWc tensors (int32 accumulators, float32 outputs) whose chains move;
    ``min_elems``: only tensors of at least that many elements.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    builder = relax.BlockBuilder(mod)
    added: dict[str, Any] = {}
    src = wildcard()
    perm = is_op("relax.permute_dims")(src)
    back = is_op("relax.reshape")(perm, wildcard())
    # chains from the transposition outwards, longest first
    chains = [("astype", "multiply", "add", "relu", "quantize"), ("astype", "multiply", "add", "quantize"),
              ("astype", "multiply", "add", "relu"), ("astype", "multiply", "add"), ("astype", "multiply"),
              ("add", "relu", "quantize"), ("add", "quantize"), ("add", "relu"), ("add",)]

    def pattern(chain: tuple[str, ...]) -> tuple[Any, list[Any], list[Any]]:
        e, consts, ops = back, [], []
        for op in chain:
            if op in ("multiply", "add"):
                c = is_const()
                consts.append(c)
                e = is_op(f"relax.{op}")(e, c)
            elif op == "relu":
                e = is_op("relax.nn.relu")(e)
            elif op == "quantize":
                c1, c2 = is_const(), is_const()
                consts += [c1, c2]
                e = is_op("relax.quantize")(e, c1, c2)
            else:
                e = is_op(f"relax.{op}")(e)
            ops.append(e)
        return e, consts, ops

    def rewrite(chain: tuple[str, ...], ops: list[Any], consts: list[Any]) -> Any:
        def fn(expr: Any, m: dict) -> Any:
            x = m[src]
            shape = [int(d) for d in x.ty.shape]
            if (len(shape) != 5 or [int(a) for a in m[perm].attrs.axes] != [0, 1, 4, 2, 3]
                    or str(x.ty.dtype) not in dtypes or int(np.prod(shape)) < min_elems):
                return expr
            n, cb, h, w, lanes = shape
            vals = [_const_np(m[c]) for c in consts]
            if any(v is None or (v.size not in (1, cb * lanes)) for v in vals):
                return expr
            if "quantize" in chain and any(v.size != 1 for v in vals[-2:]):
                return expr  # per-channel output quantization: leave it in NCHW

            def lay(v: np.ndarray) -> Any:  # a channel-wise constant in the NCHWc layout
                return relax.const(v.reshape(()) if v.size == 1 else v.reshape(1, cb, 1, 1, lanes))

            e, k = x, 0
            for call in (m[o] for o in ops):
                op = call.op.name
                if op == "relax.astype":
                    e = relax.op.astype(e, call.attrs.dtype)
                elif op in ("relax.multiply", "relax.add"):
                    e = (relax.op.multiply if op == "relax.multiply" else relax.op.add)(e, lay(vals[k]))
                    k += 1
                elif op == "relax.nn.relu":
                    e = relax.op.nn.relu(e)
                else:  # quantize, scalar scale / zero point
                    e = relax.op.quantize(e, lay(vals[k]), lay(vals[k + 1]), axis=-1,
                                          out_dtype=call.attrs.out_dtype)
                    k += 2
            dtype = str(expr.ty.dtype)
            name = f"transpose_nchwc{lanes}_to_nchw_{dtype}_{n}x{cb}x{h}x{w}"
            if name not in added:
                prim = nchwc_to_nchw((n, cb, h, w, lanes), dtype)
                added[name] = builder.add_func(prim.with_attr("global_symbol", name), name)
            return relax.call_tir(added[name], [e], relax.TensorType((n, cb * lanes, h, w), dtype))
        return fn

    funcs = {}
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            for chain in chains:
                pat, consts, ops = pattern(chain)
                fn = rewrite_call(pat, rewrite(chain, ops, consts), fn)
        funcs[gv] = fn
    for gv in added.values():
        funcs[gv] = builder.get()[gv]
    new = tvm.IRModule(funcs, attrs=mod.attrs)
    return relax.transform.DeadCodeElimination()(new)


def lift_constants(mod: Any) -> tuple[Any, list[np.ndarray], bytes]:
    """Turn the tensor constants of ``mod['main']`` (weights, per-channel scales, bias) into
    trailing parameters of ``main``.

    Returns (module, the lifted arrays in parameter order, the bytes of the scalar constants that
    stay inline). The module text then depends only on the unit's structure, not its weight
    values: w2..w8 at a8 lower to the same int8 module, so one compiled library serves all four
    bit pairs, each timed with its own weights passed as arguments. The TIR tasks are unchanged
    (Relax passes constants to TIR functions as arguments either way).
    """
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Lift(PyExprMutator):
        def __init__(self, m: Any) -> None:
            super().__init__(m)
            self.vars: list[Any] = []
            self.arrays: list[np.ndarray] = []
            self.scalars: list[bytes] = []

        def visit_generic_const_(self, op: Any) -> Any:  # 0.27 name of visit_constant_
            arr = op.value.numpy()
            if arr.ndim == 0:  # scalars (output scale / zero point) stay: ops want them constant
                self.scalars.append(f"{arr.dtype}:".encode() + arr.tobytes())
                return op
            v = relax.Var(f"param{len(self.vars)}", relax.TensorType(arr.shape, str(arr.dtype)))
            self.vars.append(v)
            self.arrays.append(arr)
            return v

    fn = mod["main"]
    lift = _Lift(mod)
    body = lift.visit_expr(fn.body)
    new_fn = relax.Function(list(fn.params) + lift.vars, body, fn.ret_ty, fn.is_pure, fn.attrs)
    funcs = {gv: (new_fn if gv.name_hint == "main" else f) for gv, f in mod.functions.items()}
    return tvm.IRModule(funcs, attrs=mod.attrs), lift.arrays, b"|".join(lift.scalars)


def kernel_label(kinds: list[str], mod: Any = None) -> str:
    """The `kernel` column of a measurement: 'tvm:conv2d-int8', 'tvm:conv2d-fp32', ..."""
    if kinds:
        return "tvm:" + "+".join(sorted(set(kinds)))
    text = str(mod["main"].script()) if mod is not None else "conv2d"
    op = "conv2d" if "conv2d" in text else "matmul" if "matmul" in text else "elementwise"
    return f"tvm:{op}-fp32"
