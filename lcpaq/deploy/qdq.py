"""Whole-model ONNX QDQ export of a calibrated fake-quant model, each layer at its own precision.

The float graph comes from ``torch.onnx.export`` (BN folded into the convs by the exporter); then
every quantized layer gets exactly the arithmetic of its fake-quant twin:

    input  : [Clip to the a-bit range] -> QuantizeLinear(s_x, z_x) -> DequantizeLinear   (a_bits < 32)
    weight : DequantizeLinear(int8 codes, per-channel scale)                              (w_bits < 32)
    bias   : DequantizeLinear(int32, s_w * s_x)        (when both sides are quantized, as ORT wants)

The integer weight codes are the fake-quant model's own codes (quantized *before* BN folding, as
the model computes); the BN factor g_c is moved into the per-channel scale (sign into the codes),
so DQ(codes) == fold(fake_quant(W)) up to float rounding. Optionally (``quantize_outputs``) an
8-bit Q/DQ pair is added after each integer layer's fused activation where no quantizer follows,
so ONNX Runtime fuses it to QLinearConv (integer output) instead of a float conv with dequantized
weights; its range is calibrated on the given inputs. That step is an extra (8-bit) rounding the
fake-quant model does not have: the deploy check reports how far the outputs move.

The profiler's per-unit graphs (lcpaq.profiler.units) use the same conventions.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcpaq.errors import ConfigError

log = logging.getLogger(__name__)
OPSET = 17


def _float_copy(model: Any) -> Any:
    """A deep copy of ``model`` with every fake-quant layer unwrapped to its float module."""
    from lcpaq.policy import Policy
    from lcpaq.quant import quantizable_names
    from lcpaq.quant.api import apply_policy

    m = copy.deepcopy(model).eval()
    names = quantizable_names(m)
    apply_policy(m, Policy.uniform(names, 32, 32))
    return m


def torch_to_onnx(model: Any, input_shape: Sequence[int], *, dynamic_batch: bool = True) -> bytes:
    """Float ONNX (opset 17, BN folded, dynamic batch unless told otherwise) of a torch model."""
    import warnings

    import torch

    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(*input_shape), f, dynamo=False, opset_version=OPSET,
                          do_constant_folding=True, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic_batch else None)
    return f.getvalue()


def node_module(node_name: str, modules: set[str]) -> str | None:
    """Module name of an exported node, from its scope ('/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1')."""
    segs = [s for s in node_name.split("/") if s][:-1]
    full = ""
    for seg in segs:
        parent = full.rpartition(".")[0]
        for cand in (f"{full}.{seg}" if full else seg, f"{parent}.{seg}" if parent else seg, seg):
            if cand in modules:
                full = cand
                break
    return full or None


class _Graph:
    """Small helpers over an onnx GraphProto."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.m = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.np = numpy_helper
        self._n = 0

    def uniq(self, base: str) -> str:
        self._n += 1
        return f"{base}__lcpaq{self._n}"

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.uniq(base)
        t = self.np.from_array(np.asarray(arr), name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def array(self, name: str) -> np.ndarray:
        return self.np.to_array(self.inits[name])

    def consumers(self, tensor: str) -> list[Any]:
        return [n for n in self.g.node if tensor in n.input]

    def insert_before(self, anchor: Any, nodes: list[Any]) -> None:
        idx = list(self.g.node).index(anchor)
        for k, n in enumerate(nodes):
            self.g.node.insert(idx + k, n)


def _act_q(g: _Graph, tensor: str, scale: float, zp: int, bits: int, symmetric: bool, tag: str) -> tuple[list, str]:
    """Nodes quantize-dequantizing ``tensor`` on an a-bit grid; returns (nodes, output name)."""
    from onnx import helper

    from lcpaq.quant.quantizers import act_range

    qmin, qmax = act_range(bits, symmetric)
    zdt = np.int8 if symmetric else np.uint8
    nodes = []
    src = tensor
    full = (-128, 127) if symmetric else (0, 255)
    if (qmin, qmax) != full:  # a narrower grid than the storage type: clip like the fake quantizer
        lo = g.const(f"{tag}_lo", np.array((qmin - zp) * scale, np.float32))
        hi = g.const(f"{tag}_hi", np.array((qmax - zp) * scale, np.float32))
        clipped = g.uniq(f"{tag}_clip")
        nodes.append(helper.make_node("Clip", [src, lo, hi], [clipped], name=g.uniq(f"{tag}/Clip")))
        src = clipped
    s = g.const(f"{tag}_s", np.array(scale, np.float32))
    z = g.const(f"{tag}_z", np.array(zp, zdt))
    q, dq = g.uniq(f"{tag}_q"), g.uniq(f"{tag}_dq")
    nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [q], name=g.uniq(f"{tag}/QuantizeLinear")))
    nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [dq], name=g.uniq(f"{tag}/DequantizeLinear")))
    return nodes, dq


def _fold_factor(w: np.ndarray, wf: np.ndarray) -> np.ndarray:
    """Per-output-channel g with wf ~= g * w (the BN factor the exporter folded in)."""
    a = w.reshape(w.shape[0], -1).astype(np.float64)
    b = wf.reshape(wf.shape[0], -1).astype(np.float64)
    den = (a * a).sum(1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-300), 1.0)


def export_qdq(model: Any, input_shape: Sequence[int], *, calib_inputs: Sequence[np.ndarray] = (),
               quantize_outputs: bool = True, w8_as_w7: bool = True, dynamic_batch: bool = True,
               float_onnx: bytes | None = None) -> bytes:
    """ONNX QDQ bytes of a calibrated fake-quant ``model`` (from ``apply_policy``) at its policy.

    ``w8_as_w7``: store 8-bit weights on a 7-bit grid; ONNX Runtime's fused u8 x s8 int8 conv
    saturates on AVX2 (vpmaddubsw) with full-range 8-bit weights (shared FINDINGS: max error 0.85
    vs 0.05 on the embedded model). ``quantize_outputs``: see the module docstring. ``float_onnx``:
    the float graph of this model (``torch_to_onnx`` of its float copy) when the caller already has
    it (block profiling exports ~100 policies of one model).

    >>> # m = get_model("mnist_resnet"); apply_policy(m, pol, calib_loader=loader)
    >>> # onnx_bytes = export_qdq(m, (1, 1, 28, 28), calib_inputs=[x.numpy()])
    """
    import onnx
    from onnx import helper

    from lcpaq.quant.modules import QUANT_TYPES
    from lcpaq.quant.quantizers import quantize_weight

    fq = dict(model.named_modules())
    qmods = {n: m for n, m in fq.items() if isinstance(m, QUANT_TYPES)}
    for n, m in qmods.items():
        if m.act_quant is not None and not bool(m.act_quant.calibrated):
            raise ConfigError(f"layer '{n}' is not calibrated; pass calib_loader to apply_policy before export")
    proto = onnx.load_from_string(float_onnx if float_onnx is not None
                                  else torch_to_onnx(_float_copy(model), input_shape, dynamic_batch=dynamic_batch))
    g = _Graph(proto)
    names = set(fq)
    int_nodes: list[tuple[Any, str]] = []  # (node, layer) with integer compute
    for node in list(g.g.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        lname = node_module(node.name, names)
        mod = qmods.get(lname or "")
        if mod is None:
            continue
        w_bits, a_bits = mod.w_bits, mod.a_bits
        tag = lname.replace(".", "_")
        new: list[Any] = []
        sx = None
        if a_bits != 32:
            scale, zp, bits, sym = mod.act_qparams()
            nodes, dq = _act_q(g, node.input[0], scale, zp, bits, sym, f"{tag}_in")
            new += nodes
            node.input[0] = dq
            sx = scale
        if w_bits != 32:
            wname = node.input[1]
            if wname not in g.inits:
                raise ConfigError(f"layer '{lname}': exported weight is not a constant; cannot quantize")
            wf = g.array(wname)
            transposed = node.op_type == "MatMul"
            w = mod.weight.detach().double().numpy()
            codes, s = quantize_weight(mod.weight.detach(), w_bits, reduce_range=w8_as_w7 and w_bits == 8)
            codes, s = codes.numpy().astype(np.int8), s.double().numpy()
            gfac = _fold_factor(w, wf.T if transposed else wf)
            sign = np.where(gfac < 0, -1, 1).astype(np.int8)
            codes = codes * sign.reshape((-1,) + (1,) * (codes.ndim - 1))
            ws = (s * np.abs(gfac)).astype(np.float32)
            ws = np.where(ws > 0, ws, np.float32(1e-12)).astype(np.float32)
            cq = g.const(f"{tag}_wq", codes.T.copy() if transposed else codes)
            cs = g.const(f"{tag}_ws", ws)
            cz = g.const(f"{tag}_wz", np.zeros(ws.shape, np.int8))
            wdq = g.uniq(f"{tag}_wdq")
            new.append(helper.make_node("DequantizeLinear", [cq, cs, cz], [wdq], axis=1 if transposed else 0,
                                        name=g.uniq(f"{tag}/w/DequantizeLinear")))
            node.input[1] = wdq
            if sx is not None and len(node.input) > 2 and node.input[2] in g.inits:
                b = g.array(node.input[2]).astype(np.float64)
                bscale = (ws.astype(np.float64) * sx).astype(np.float32)
                bq = np.clip(np.round(b / bscale), -(2**31) + 1, 2**31 - 1).astype(np.int32)
                bdq = g.uniq(f"{tag}_bdq")
                new.append(helper.make_node(
                    "DequantizeLinear", [g.const(f"{tag}_bq", bq), g.const(f"{tag}_bs", bscale),
                                         g.const(f"{tag}_bz", np.zeros(bq.shape, np.int32))], [bdq],
                    axis=0, name=g.uniq(f"{tag}/b/DequantizeLinear")))
                node.input[2] = bdq
            if sx is not None:
                int_nodes.append((node, lname))
        g.insert_before(node, new)
    if quantize_outputs and int_nodes and len(calib_inputs):
        _quantize_outputs(g, int_nodes, calib_inputs)
    _prune_initializers(g)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _out_tensor(g: _Graph, node: Any) -> str:
    """The layer's output after its fused activation (Relu/Clip with a single consumer)."""
    t = node.output[0]
    cons = g.consumers(t)
    if len(cons) == 1 and cons[0].op_type in ("Relu", "Clip"):
        return cons[0].output[0]
    return t


def _quantize_outputs(g: _Graph, int_nodes: list[tuple[Any, str]], calib_inputs: Sequence[np.ndarray]) -> None:
    """Add 8-bit output Q/DQ after integer layers not already followed by a quantizer."""
    import onnx
    from onnx import helper

    from lcpaq.quant.quantizers import qparams_from_range

    todo = []
    for node, lname in int_nodes:
        t = _out_tensor(g, node)
        cons = g.consumers(t)
        if cons and all(c.op_type in ("QuantizeLinear", "Clip") for c in cons):
            continue
        if t in [o.name for o in g.g.output]:
            continue  # keep the model's output in float
        qs = [c for c in cons if c.op_type == "QuantizeLinear" and g.array(c.input[2]).dtype == np.uint8]
        if len(qs) == 1:  # one 8-bit consumer quantizer: move it before the fork (shared by all)
            q = qs[0]
            dq = next(n for n in g.g.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
            for c in cons:
                if c is not q:
                    for i, inp in enumerate(c.input):
                        if inp == t:
                            c.input[i] = dq.output[0]
            continue
        todo.append((t, lname))
    if not todo:
        return
    probe = copy.deepcopy(g.m)
    for t, _ in todo:
        probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    from lcpaq.profiler.backends.ort import session

    sess = session(probe.SerializeToString(), 1)
    lo = {t: np.inf for t, _ in todo}
    hi = {t: -np.inf for t, _ in todo}
    outs = [o.name for o in sess.get_outputs()]
    static = sess.get_inputs()[0].shape[0] == 1
    batches = [b[i:i + 1] for b in calib_inputs for i in range(min(len(b), 64))] if static else calib_inputs
    for x in batches:
        res = dict(zip(outs, sess.run(None, {"x": np.asarray(x, np.float32)}), strict=True))
        for t, _ in todo:
            lo[t] = min(lo[t], float(res[t].min()))
            hi[t] = max(hi[t], float(res[t].max()))
    for t, lname in todo:
        scale, zp = qparams_from_range(lo[t], hi[t], 8, False)
        cons = g.consumers(t)
        tag = lname.replace(".", "_") + "_out"
        nodes, dq = _act_q(g, t, scale, zp, 8, False, tag)
        for c in cons:
            for i, inp in enumerate(c.input):
                if inp == t:
                    c.input[i] = dq
        producer = next(n for n in g.g.node if t in n.output)
        idx = list(g.g.node).index(producer) + 1
        for k, n in enumerate(nodes):
            g.g.node.insert(idx + k, n)


def _prune_initializers(g: _Graph) -> None:
    used = {i for n in g.g.node for i in n.input}
    keep = [i for i in g.g.initializer if i.name in used]
    del g.g.initializer[:]
    g.g.initializer.extend(keep)


def layer_of_node(node_name: str, layers: Sequence[str], modules: set[str]) -> str | None:
    """Layer a runtime node belongs to (for per-layer profiling): by lcpaq tags or export scope."""
    for ly in sorted(layers, key=len, reverse=True):
        tag = ly.replace(".", "_")
        if node_name.startswith(tag + "_") or node_name.startswith(tag + "/"):
            return ly
    mod = node_module(node_name if node_name.startswith("/") else "/" + node_name, modules)
    return mod if mod in layers else None


def export_policy(model: Any, policy: Any, input_shape: Sequence[int], calib: Sequence[np.ndarray], *,
                  float_onnx: bytes | None = None) -> bytes:
    """What ``validate`` deploys on ORT for an fp32 ``model`` at ``policy``: a copy quantized with
    ``apply_policy`` (calibrated on ``calib``) through :func:`export_qdq`. The signature is block
    profiling's exporter hook (:func:`lcpaq.profiler.blocks.profile_blocks` ``export=``), so the block
    units are cut from the very graph that validate measures. ``float_onnx``: ``torch_to_onnx(model,
    input_shape)`` made once for many policies (``functools.partial``)."""
    import torch

    from lcpaq.quant.api import apply_policy

    fq = apply_policy(_float_copy(model), policy, calib_loader=[torch.from_numpy(np.asarray(c)) for c in calib],
                      calib_batches=len(calib))
    return export_qdq(fq.eval(), input_shape, calib_inputs=list(calib), float_onnx=float_onnx)
