"""Per-layer ONNX units in the form ONNX Runtime really runs them inside a mixed-precision model.

A unit is one quantizable layer with BN folded (a bias) and its activation fused. Its *own* class
is "fp32" or "int8" (ORT runs every 2..8-bit weight / 4..8-bit activation in int8 storage with the
same kernel). Its *input* arrives in the producer's natural output form: uint8 after an int8
producer, fp32 after an fp32 producer. So each unit variant includes exactly the convert ops the
whole model has at that boundary:

    int8 unit, int8 input:  u8 -> DQ -> Conv(DQ(w int8), b) -> act -> Q -> u8   (QLinearConv)
    int8 unit, fp32 input:  f32 -> Q -> DQ -> Conv ... -> Q -> u8                 (+ Quantize)
    fp32 unit, fp32 input:  f32 -> Conv -> act -> f32
    fp32 unit, int8 input:  u8 -> DQ -> Conv -> act -> f32                        (+ Dequantize)

The difference between the two input variants of a layer is the *transition* cost the search sees
on the edge from its producer.

``build_unit(..., context=True)`` is the form a whole-model build runs around the layer, for
backends whose tables predict whole builds that do not fuse the way ORT does (TVM): a max-pool that
follows the layer is part of its unit (``layer.fused`` has "maxpool"; pooling is never a unit of
its own), so is the residual Add (and the activation after it) that a conv feeds (``layer.fused``
has "add"; the shortcut is a second input in the unit's class; an int8 unit then also outputs the
float result, which a whole model writes for the next block's shortcut besides quantizing it), and
a layer fed by the model's image (:func:`feeds_image`) takes the image's quantization
(a non-zero zero point, where a ReLU-fed input has 0) in both input variants, since no producer
ever hands it uint8. ORT's and the kernels' tables keep the plain form (``context=False``). Weights of w < 8 bits are stored in int8 restricted to the w-bit
grid; 8-bit weights use a 7-bit range (full-range int8 weights overflow ORT's fused AVX2 int8 conv,
see shared FINDINGS), activations of a < 8 bits use the a-bit range of a uint8 tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lcpaq.inventory import LayerInfo
from lcpaq.policy import FP32, BitPair

OPSET = 17
CLASSES = ("fp32", "int8")


def precision_class(pair: BitPair) -> str:
    """ORT's kernel class for a bit pair: 'fp32' for (32, 32), else 'int8'."""
    if tuple(pair) == FP32:
        return "fp32"
    if 32 in pair:
        from lcpaq.errors import ConfigError

        raise ConfigError(f"bit pair {pair} (one operand fp32) has no ORT kernel; use wXaY or fp32")
    return "int8"


def kernel_name(layer: LayerInfo, own: str) -> str:
    op = "Conv" if layer.kind == "conv" else "MatMul"
    return f"ort:QLinear{op}(int8)" if own == "int8" else f"ort:{op}(fp32)"


def post_act(layer: LayerInfo) -> str | None:
    """The activation ORT fuses into the layer: the first op after an optional BN."""
    ops = [o for o in layer.fused if o != "bn"]
    if ops and ops[0] in ("relu", "relu6"):
        return ops[0]
    return None


def workload_key(layer: LayerInfo) -> str:
    """Canonical, model-independent key of a layer's workload (shape, op, fused activation)."""
    act = post_act(layer) or "none"
    if layer.kind == "conv":
        n, c, h, w = layer.in_shape
        return (f"conv:n{n}c{c}h{h}w{w}:o{layer.out_channels}:k{layer.kernel_size[0]}x{layer.kernel_size[1]}"
                f":s{layer.stride[0]}x{layer.stride[1]}:p{layer.padding[0]}x{layer.padding[1]}"
                f":d{layer.dilation[0]}x{layer.dilation[1]}:g{layer.groups}:b1:{act}")
    return f"linear:n{layer.in_shape[0]}i{layer.in_channels}:o{layer.out_channels}:b1:{act}"


def unit_key(layer: LayerInfo, pair: BitPair, in_class: str) -> str:
    w, a = pair
    bits = "fp32" if tuple(pair) == FP32 else f"w{w}a{a}"
    return f"{workload_key(layer)}|{bits}|in={in_class}"


# The quantization a whole model's first layer gets for an ImageNet-normalised RGB image, about
# [-2.12, 2.64]: its zero point is not 0 (TVM then subtracts it in int16: another conv kernel)
IMAGE_RANGE = (-2.118, 2.640)
# the stem max-pool of torchvision's ResNets (the only max-pool in lcpaq's models)
MAXPOOL = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}


def feeds_image(layer: LayerInfo) -> bool:
    """True for a layer that reads the model's image: a dense conv with 1 or 3 input channels."""
    return layer.kind == "conv" and layer.groups == 1 and layer.in_channels in (1, 3)


def _image_quant(a_bits: int) -> tuple[np.float32, np.uint8]:
    lo, hi = IMAGE_RANGE
    scale = (hi - lo) / (2 ** min(a_bits, 8) - 1)
    return np.float32(scale), np.uint8(round(-lo / scale))


def build_unit(layer: LayerInfo, pair: BitPair, in_class: str, *, seed: int = 0,
               context: bool = False) -> tuple[bytes, dict[str, np.ndarray]]:
    """ONNX bytes and feed dict of one unit variant (``context``: the whole-model form, module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    image = context and feeds_image(layer)
    if image:
        in_class = "fp32"  # the image is float: no producer hands this layer uint8
    rng = np.random.default_rng(seed)
    own = precision_class(pair)
    w_bits, a_bits = pair
    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    cin, cout = layer.in_channels, layer.out_channels
    if layer.kind == "conv":
        kh, kw = layer.kernel_size
        wshape = (cout, cin // layer.groups, kh, kw)
    else:
        wshape = (cout, cin)
    in_shape = list(layer.in_shape)
    out_shape = list(layer.out_shape)
    wf = rng.standard_normal(wshape).astype(np.float32) * 0.1
    bias = rng.standard_normal(cout).astype(np.float32) * 0.1
    x_scale, x_zp = np.float32(0.02), np.uint8(0)
    if a_bits < 8:  # a-bit activations: the a-bit sub-range of uint8
        x_scale = np.float32(0.02 * 255 / (2**a_bits - 1))
    if image:
        x_scale, x_zp = _image_quant(a_bits)
    feeds: dict[str, np.ndarray] = {}
    if in_class == "int8":
        feeds["x"] = rng.integers(0, 2 ** min(a_bits, 8), size=in_shape, dtype=np.uint8)
        x_in = helper.make_tensor_value_info("x", TensorProto.UINT8, in_shape)
    else:
        feeds["x"] = rng.standard_normal(in_shape).astype(np.float32)
        x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    const("xs", np.array(x_scale, np.float32))
    const("xz", np.array(x_zp, np.uint8))
    if own == "int8":
        if in_class == "fp32":
            nodes.append(helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]))
            xq = "xq"
        else:
            xq = "x"
        nodes.append(helper.make_node("DequantizeLinear", [xq, "xs", "xz"], ["xd"]))
        qmax = 2 ** (min(w_bits, 7) - 1) - 1  # 8-bit weights on a 7-bit grid (ORT overflow trap)
        ws = np.abs(wf).reshape(cout, -1).max(1) / qmax
        wq = np.clip(np.round(wf / ws.reshape((-1,) + (1,) * (len(wshape) - 1))), -qmax, qmax).astype(np.int8)
        const("wq", wq)
        const("ws", ws.astype(np.float32))
        const("wz", np.zeros(cout, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0))
        bscale = (ws * float(x_scale)).astype(np.float32)
        const("bq", np.round(bias / bscale).astype(np.int32))
        const("bs", bscale)
        const("bz", np.zeros(cout, np.int32))
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0))
        xin, win, bin_ = "xd", "wd", "bd"
    else:
        if in_class == "int8":
            nodes.append(helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]))
            xin = "xd"
        else:
            xin = "x"
        win, bin_ = const("w", wf), const("b", bias)
    if layer.kind == "conv":
        nodes.append(helper.make_node(
            "Conv", [xin, win, bin_], ["y0"], kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
            pads=[layer.padding[0], layer.padding[1]] * 2, dilations=list(layer.dilation), group=layer.groups))
    else:
        if own == "int8":  # MatMul wants W^T: transpose the dequantized weight (constant-folded)
            nodes.append(helper.make_node("Transpose", [win], ["wt"], perm=[1, 0]))
        else:
            inits[-2] = numpy_helper.from_array(wf.T.copy(), "w")
        nodes.append(helper.make_node("MatMul", [xin, "wt" if own == "int8" else win], ["mm"]))
        nodes.append(helper.make_node("Add", ["mm", bin_], ["y0"]))
    def activation(kind: str | None, src: str, dst: str) -> str:
        """ReLU or ReLU6 (Clip) from ``src`` to ``dst``; ``src`` when there is none."""
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [src], [dst]))
        elif kind == "relu6":
            const("c0", np.array(0, np.float32))
            const("c6", np.array(6, np.float32))
            nodes.append(helper.make_node("Clip", [src, "c0", "c6"], [dst]))
        else:
            return src
        return dst

    act = post_act(layer)
    y = activation(act, "y0", "y1")
    pool = context and "maxpool" in layer.fused
    res = context and layer.kind == "conv" and "add" in layer.fused
    after = list(layer.fused[layer.fused.index("add") + 1:]) if res else []
    res_act = after[0] if after and after[0] in ("relu", "relu6") else None
    if pool:
        n_, c_, h_, w_ = out_shape
        out_shape = [n_, c_, (h_ + 2 - 3) // 2 + 1, (w_ + 2 - 3) // 2 + 1]
    extra_in, extra_out = [], []
    if res:  # the block's shortcut, in this unit's class (uint8 from an int8 block, else float)
        r_int8 = own == "int8"
        feeds["r"] = (rng.integers(0, 256, size=list(layer.out_shape), dtype=np.uint8) if r_int8
                      else rng.standard_normal(list(layer.out_shape)).astype(np.float32))
        extra_in.append(helper.make_tensor_value_info(
            "r", TensorProto.UINT8 if r_int8 else TensorProto.FLOAT, list(layer.out_shape)))

    def tail(t: str) -> str:  # what a whole model runs on the layer's float output: add, act, pool
        if res:
            r = "r"
            if own == "int8":
                const("rs", np.array(0.05, np.float32))
                const("rz", np.array(0, np.uint8))
                nodes.append(helper.make_node("DequantizeLinear", ["r", "rs", "rz"], ["rd"]))
                r = "rd"
            nodes.append(helper.make_node("Add", [t, r], ["ya"]))
            t = activation(res_act, "ya", "yr")
        if pool:
            nodes.append(helper.make_node("MaxPool", [t], ["yp"], **MAXPOOL))
            t = "yp"
        return t

    if own == "int8":
        const("ys", np.array(0.05, np.float32))
        const("yz", np.array(0 if act else 128, np.uint8))
        if pool or res:  # a whole QDQ model runs them on the dequantized output, then quantizes again
            nodes.append(helper.make_node("QuantizeLinear", [y, "ys", "yz"], ["yq"]))
            nodes.append(helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["yd"]))
            const("ys2", np.array(0.05, np.float32))
            const("yz2", np.array(0 if (act if not res else res_act) else 128, np.uint8))
            t = tail("yd")
            nodes.append(helper.make_node("QuantizeLinear", [t, "ys2", "yz2"], ["y"]))
            # the float result also feeds the next block's shortcut (a ResNet stem's max-pool, a block's
            # output): a second output, so that it is written once more as in the whole model
            nodes.append(helper.make_node("Identity", [t], ["y_f"]))
            extra_out.append(helper.make_tensor_value_info("y_f", TensorProto.FLOAT, out_shape))
        else:
            nodes.append(helper.make_node("QuantizeLinear", [y, "ys", "yz"], ["y"]))
        y_out = helper.make_tensor_value_info("y", TensorProto.UINT8, out_shape)
    else:
        nodes.append(helper.make_node("Identity", [tail(y)], ["y"]))
        y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "unit", [x_in, *extra_in], [y_out, *extra_out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model.SerializeToString(), feeds


def overhead_unit() -> tuple[bytes, dict[str, np.ndarray]]:
    """A near-empty graph: its time is the per-call overhead subtracted from every unit."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m.SerializeToString(), {"x": np.zeros((1, 8), np.float32)}


def unit_variants(layer: LayerInfo, candidates) -> list[tuple[BitPair, str]]:
    """Every (bits, input class) to measure for a layer."""
    out = []
    for p in candidates:
        for in_class in CLASSES:
            out.append((tuple(p), in_class))
    return out


def layer_spec(layer: LayerInfo) -> Mapping[str, Any]:
    from dataclasses import asdict

    return asdict(layer)
