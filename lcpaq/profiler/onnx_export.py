"""Whole-model export of a mixed-precision policy to an ONNX QDQ graph that ONNX Runtime runs.

Shared by the profiler (units are cut from this graph), the TVM backend and deploy/validate.

How a policy becomes QDQ (what ORT then fuses into QLinearConv / QGemm / QLinearAdd ...):

* torch -> ONNX with the TorchScript exporter in eval mode, which folds BatchNorm into the conv.
* ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel weights, uint8
  activations) places Q/DQ pairs; layers the policy keeps at fp32 -- and the non-quantizable ops
  they own (ReLU, residual Add, pooling) -- are excluded, so precision boundaries get their real
  standalone QuantizeLinear / DequantizeLinear ops.
* Bits are then written into the initializers: weights of ``w`` bits are symmetric per output
  channel in ``[-(2^(w-1)-1), 2^(w-1)-1]`` stored as int8 (ORT runs 2..8-bit weights with the
  same int8 kernel, FINDINGS.md); **8-bit weights use the 7-bit range [-63, 63]** because
  ORT's fused int8 conv overflows with full-range weights on AVX2 (no VNNI) -- the same reason
  ORT's own ``reduce_range`` exists. Activations of ``a`` bits use ``2^a`` levels of a uint8
  tensor (scale and zero point rescaled from the 8-bit calibration); biases are re-quantized to
  int32 with the final ``s_x * s_w``.

Layers are matched to ONNX Conv/Gemm nodes in execution order and checked by weight shape.

>>> from lcpaq.models import get_model
>>> from lcpaq.policy import Policy
>>> m = get_model("resnet18")
>>> onnx_bytes = export_qdq(m, Policy.uniform(quantizable_names(m), 8, 8), (1, 3, 224, 224))
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.errors import ConfigError, PolicyError
from lcpaq.policy import FP32, BitPair, Policy

ANCHOR_OPS = ("Conv", "Gemm", "MatMul")
WEIGHT_QMAX_8BIT = 63  # 7-bit range for 8-bit weights (ORT AVX2 fused int8 conv overflow)


def quantizable_names(model: Any) -> list[str]:
    """Names of Conv2d / Linear modules in registration order (what a policy must cover)."""
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def is_fp32(pair: BitPair) -> bool:
    """A layer runs the fp32 kernel on ORT when either side stays at 32 bits."""
    return 32 in tuple(pair)


def precision_class(pair: BitPair) -> str:
    """``"fp32"`` or ``"int8"``: the kernel class ORT runs (2..8-bit weights share int8)."""
    return "fp32" if is_fp32(pair) else "int8"


def export_fp32(model: Any, input_shape: tuple[int, ...], *, opset: int = 17, unshare: bool = False) -> bytes:
    """Export ``model`` (eval mode) to ONNX fp32 with BN folded; input 'input', output 'output'.

    ``unshare``: give every node its own copy of an initializer the exporter deduplicated (see
    :func:`unshare_initializers`)."""
    import torch

    model = model.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                model, torch.zeros(input_shape), f, dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["output"], do_constant_folding=True,
            )
    import onnx

    proto = onnx.load_from_string(f.getvalue())
    _drop_initializer_identities(proto)
    if unshare:
        unshare_initializers(proto)
    return proto.SerializeToString()


def unshare_initializers(proto: Any) -> int:
    """In place: an initializer used by several nodes gets one copy per extra node; returns #copies.

    The TorchScript exporter deduplicates equal tensors. In an untrained model every BN-folded bias
    of one width is zero, so e.g. all of mobilenet_v2's 64-channel project convs share one bias;
    ``quantize_static`` then puts a DequantizeLinear on it as soon as one of them is int8, and an
    fp32 conv far away gets a non-constant bias (no NCHWc kernel in ORT). Latency work wants each
    layer's graph to depend on its own precision and its neighbours' only, as in a trained model."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    seen: set[str] = set()
    copies = 0
    for n in g.node:
        for j, t in enumerate(n.input):
            if t not in inits:
                continue
            if t not in seen:
                seen.add(t)
                continue
            copies += 1
            dup = type(inits[t])()
            dup.CopyFrom(inits[t])
            dup.name = f"{t}__u{copies}"
            g.initializer.append(dup)
            n.input[j] = dup.name
    return copies


def _drop_initializer_identities(proto: Any) -> None:
    """The TorchScript exporter aliases shared initializers through Identity nodes; inline them."""
    inits = {i.name for i in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node
             if n.op_type == "Identity" and n.input[0] in inits}
    if not alias:
        return
    keep = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, t in enumerate(n.input):
            if t in alias:
                n.input[i] = alias[t]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def anchor_map(model_proto: Any, layer_names: list[str], weight_shapes: Mapping[str, tuple]) -> dict[str, str]:
    """Map layer name -> ONNX anchor node name (Conv/Gemm in graph order, checked by shape)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model_proto.graph.initializer}
    anchors = [n for n in model_proto.graph.node if n.op_type in ANCHOR_OPS
               and len(n.input) > 1 and n.input[1] in inits]
    if len(anchors) != len(layer_names):
        raise ConfigError(
            f"ONNX graph has {len(anchors)} Conv/Gemm nodes with constant weights but the model "
            f"has {len(layer_names)} quantizable layers; export a model without weight sharing"
        )
    by_scope = {_scope_module(n.name): n for n in anchors}
    if all(name in by_scope for name in layer_names):
        pairs = [(name, by_scope[name]) for name in layer_names]
    else:  # no scope names (other exporters): fall back to execution order
        pairs = list(zip(layer_names, anchors, strict=True))
    out = {}
    for name, node in pairs:
        w = numpy_helper.to_array(inits[node.input[1]])
        want = tuple(weight_shapes[name])
        if node.op_type == "MatMul":
            w = w.T
        if tuple(w.shape) != want:
            raise ConfigError(
                f"layer '{name}' (weight {want}) does not match ONNX node '{node.name}' "
                f"(weight {tuple(w.shape)}); export with the TorchScript exporter (scoped names)"
            )
        if not node.name:
            node.name = f"{node.op_type}_{name}"
        out[name] = node.name
    return out


def _scope_module(node_name: str) -> str:
    """'/layer2/downsample/downsample.0/Conv' -> 'layer2.downsample.0' (TorchScript scopes)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    cur = ""
    for p in parts:
        if "." in p:
            prefix, last = p.rsplit(".", 1)
            if cur == prefix or cur.endswith("." + prefix):
                cur = f"{cur}.{last}"
                continue
        cur = f"{cur}.{p}" if cur else p
    return cur


def ownership(model_proto: Any, anchors: Iterable[str]) -> dict[str, str]:
    """Node name -> owning anchor node name (non-Q/DQ nodes only).

    A non-quantizable node (ReLU, residual Add, pooling, Flatten...) belongs to the anchor that
    produced its latest-computed input: the runtime fuses it into or runs it right after that
    layer. Nodes before the first anchor belong to nobody (constant part of the model).
    """
    anchors = set(anchors)
    producer: dict[str, str] = {}
    order: dict[str, int] = {}
    owner: dict[str, str] = {}
    for i, node in enumerate(model_proto.graph.node):
        order[node.name] = i
        for o in node.output:
            producer[o] = node.name
        if node.name in anchors:
            owner[node.name] = node.name
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        best, best_i = None, -1
        for t in node.input:
            src = producer.get(t)
            # Look through Q/DQ to the real producer.
            while src is not None and src not in owner:
                srcn = model_proto.graph.node[order[src]]
                if srcn.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                    break
                src = producer.get(srcn.input[0])
            if src is not None and src in owner and order[src] > best_i:
                best, best_i = owner[src], order[src]
        if best is not None:
            owner[node.name] = best
    return owner


def _calib_inputs(input_shape: tuple[int, ...], calib: Any, seed: int) -> list[np.ndarray]:
    if calib is None:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(input_shape).astype(np.float32) for _ in range(2)]
    out = []
    for x in calib:
        if isinstance(x, (tuple, list)):
            x = x[0]
        out.append(np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32))
    if not out:
        raise ConfigError("calib is empty; pass at least one input batch")
    return out


def export_qdq(
    model: Any,
    policy: Policy,
    input_shape: tuple[int, ...],
    *,
    calib: Iterable[Any] | None = None,
    seed: int = 0,
    opset: int = 17,
    unshare: bool = False,
) -> bytes:
    """Export ``model`` under ``policy`` to ONNX QDQ bytes runnable on ONNX Runtime.

    ``calib``: input batches (arrays/tensors, or (x, y) pairs) for activation ranges (min-max);
    None uses two seeded random-normal batches (fine for latency work, not for accuracy).
    ``unshare``: no initializer shared between layers (:func:`unshare_initializers`).

    >>> from lcpaq.testing.models import TinyResNet
    >>> m = TinyResNet(); names = quantizable_names(m)
    >>> b = export_qdq(m, Policy.uniform(names, 4, 8), (1, 3, 16, 16))
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    names = quantizable_names(model)
    policy.validate(names)
    mods = dict(model.named_modules())
    shapes = {n: tuple(mods[n].weight.shape) for n in names}
    proto = onnx.load_from_string(export_fp32(model, input_shape, opset=opset, unshare=unshare))
    amap = anchor_map(proto, names, shapes)
    owner = ownership(proto, amap.values())
    fp32_anchor = {amap[n] for n in names if is_fp32(policy[n])}
    exclude = sorted(n for n, a in owner.items() if a in fp32_anchor)
    inputs = _calib_inputs(input_shape, calib, seed)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"input": x}

    if all(is_fp32(policy[n]) for n in names):
        return proto.SerializeToString()
    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "fp32.onnx", Path(td) / "qdq.onnx"
        onnx.save(proto, src)
        root = logging.getLogger()
        old_level = root.level
        root.setLevel(logging.ERROR)  # ORT's tool warns about pre-processing on the root logger
        try:
            quantize_static(
                str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": False},
            )
        finally:
            root.setLevel(old_level)
        q = onnx.load(dst)
    _apply_bits(q, proto, policy, amap)
    return q.SerializeToString()


def _apply_bits(q: Any, fp32: Any, policy: Policy, amap: Mapping[str, str]) -> None:
    """Rewrite activation scales and weight/bias initializers for each layer's own bits."""
    from onnx import numpy_helper

    inits = {i.name: i for i in q.graph.initializer}
    f_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    f_nodes = {n.name: n for n in fp32.graph.node}
    produced = {o: n for n in q.graph.node for o in n.output}
    nodes = {n.name: n for n in q.graph.node}

    def set_init(name: str, arr: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    def dq_of(tensor: str) -> Any:
        n = produced.get(tensor)
        if n is None or n.op_type != "DequantizeLinear":
            raise PolicyError(f"expected DequantizeLinear feeding '{tensor}'; the QDQ export failed")
        return n

    # 1) activation scales: tensors feeding quantized anchors get 2^a levels (min a over consumers)
    act_bits: dict[str, int] = {}
    for lname, node_name in amap.items():
        pair = policy[lname]
        if is_fp32(pair):
            continue
        dq = dq_of(nodes[node_name].input[0])
        act_bits[dq.input[1]] = min(act_bits.get(dq.input[1], 8), pair[1])
    for scale_name, a in act_bits.items():
        if a >= 8:
            continue
        zp_name = scale_name[: -len("_scale")] + "_zero_point" if scale_name.endswith("_scale") else None
        s = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        levels = 2**a - 1
        set_init(scale_name, (s * 255.0 / levels).astype(np.float32))
        if zp_name and zp_name in inits:
            zp = numpy_helper.to_array(inits[zp_name])
            set_init(zp_name, np.round(zp.astype(np.float64) * levels / 255.0).astype(zp.dtype))
    # 2) weights and biases with the final input scale
    for lname, node_name in amap.items():
        pair = policy[lname]
        if is_fp32(pair):
            continue
        node = nodes[node_name]
        fnode = f_nodes[node_name]
        w = f_inits[fnode.input[1]].astype(np.float64)
        transposed = node.op_type == "MatMul"
        if transposed:
            w = w.T
        qmax = WEIGHT_QMAX_8BIT if pair[0] >= 8 else 2 ** (pair[0] - 1) - 1
        flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        sw = np.where(flat > 0, flat / qmax, 1.0)
        qw = np.clip(np.round(w / sw.reshape(-1, *([1] * (w.ndim - 1)))), -qmax, qmax).astype(np.int8)
        wdq = dq_of(node.input[1])
        set_init(wdq.input[0], qw.T if transposed else qw)
        set_init(wdq.input[1], sw.astype(np.float32))
        if len(node.input) > 2 and node.input[2] and len(fnode.input) > 2:
            b = f_inits[fnode.input[2]].astype(np.float64)
            bdq = produced.get(node.input[2])
            if bdq is not None and bdq.op_type == "DequantizeLinear":
                sx = float(numpy_helper.to_array(inits[dq_of(node.input[0]).input[1]]))
                sb = (sx * sw).astype(np.float32)
                set_init(bdq.input[0], np.round(b / sb).astype(np.int32))
                set_init(bdq.input[1], sb)


def kernel_name(pair: BitPair, op: str = "Conv") -> str:
    """Which ORT kernel runs a layer at ``pair`` (stated in every table row)."""
    if is_fp32(pair):
        return f"ort:{op}-fp32"
    qop = {"Conv": "QLinearConv", "Gemm": "QGemm", "MatMul": "QGemm"}.get(op, op)
    return f"ort:{qop}-int8(w{pair[0]}-in-int8,a{pair[1]}-in-uint8)"


__all__ = [
    "FP32", "export_fp32", "export_qdq", "quantizable_names", "precision_class", "is_fp32",
    "anchor_map", "ownership", "kernel_name", "WEIGHT_QMAX_8BIT", "unshare_initializers",
]
