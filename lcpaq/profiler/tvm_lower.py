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

Example:
    >>> mod = from_onnx(onnx.load("unit.onnx"), keep_params_in_input=False)  # doctest: +SKIP
    >>> mod, kinds = lower_qdq(mod)  # doctest: +SKIP
    >>> kinds  # doctest: +SKIP
    ['conv2d-int8']
"""

from __future__ import annotations

from typing import Any

import numpy as np


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


def lower_qdq(mod: Any) -> tuple[Any, list[str]]:
    """Rewrite QDQ conv2d/matmul in ``mod['main']`` to int32-accumulating integer ops.

    Returns the new module (dead dequantize ops removed) and the kinds of kernels lowered, e.g.
    ``["conv2d-int8"]``; an empty list means nothing matched (an fp32 unit).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    kinds: list[str] = []
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

    def rw_conv(expr: Any, m: dict) -> Any:
        ops = operands(m)
        if ops is None:
            return expr
        xi, wi, scale, kind = ops
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
        xi, wi, scale, kind = ops
        perm = m[tw].attrs.axes
        acc = relax.op.matmul(xi, relax.op.permute_dims(wi, perm), out_dtype="int32")
        s = relax.const(scale.reshape((1, -1)) if scale.size > 1 else scale.reshape(()))
        kinds.append(f"matmul-{kind}")
        return relax.op.multiply(relax.op.astype(acc, "float32"), s)

    funcs = {}
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            fn = rewrite_call(conv, rw_conv, fn)
            fn = rewrite_call(mm, rw_mm, fn)
        funcs[gv] = fn
    new = tvm.IRModule(funcs, attrs=mod.attrs)
    new = relax.transform.DeadCodeElimination()(new)
    new = relax.transform.FoldConstant()(new)
    return new, kinds


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
    op = "conv2d"
    if mod is not None and "matmul" in str(mod["main"].script()) and "conv2d" not in str(mod["main"].script()):
        op = "matmul"
    return f"tvm:{op}-fp32"
