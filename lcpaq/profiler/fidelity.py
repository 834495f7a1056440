"""Units cut from the mixed-precision QDQ graph itself: what ORT really runs around each layer.

FINDINGS.md: per-layer units built in isolation miss mixed policies by 4-36 %; cutting units from
the mixed graph (conv + BN folded + activation + the residual Add + pooling, with the Q/DQ ops at
precision boundaries) brought resnet18 to about -2..+4 %. This module does that:

* :func:`cut_units` splits an exported QDQ graph (:func:`lcpaq.profiler.onnx_export.export_qdq`)
  into one unit per quantizable layer. Every node belongs to one layer: ReLU / Add / pooling /
  Flatten to the layer that produced their latest input; a QuantizeLinear to the producer of the
  tensor it quantizes (fused into QLinearConv's output, or standalone after an fp32 layer); an
  activation DequantizeLinear to its consumer (fused into QLinearConv's input, or standalone before
  an fp32 layer). So boundary convert ops are timed where they really run.
* A unit's key is its structure (ops, attributes, shapes, boundary dtypes -- i.e. the neighbours'
  precision) without weight values: 2..8-bit weights share the int8 kernel, so the key holds the
  precision *class* only.
* :class:`ContextTable` stores measured units by key; :func:`fit_latency_model` turns the
  measurements of units seen in several random-class policies into an additive
  :class:`~lcpaq.latency.LatencyModel`: ``unary[l][pair]`` = the unit with same-class neighbours,
  ``pairwise[(p, c)]`` = the least-squares transition cost of the edge when the classes differ.

>>> # units = cut_units(export_qdq(model, policy, shape), model, policy)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lcpaq.latency import LatencyModel
from lcpaq.policy import BitPair, Policy
from lcpaq.profiler.onnx_export import ANCHOR_OPS, precision_class

QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class CutUnit:
    """One layer's share of the mixed graph, ready to time."""

    layer: str
    key: str  # structural key (model-independent), includes the precision class
    workload: str  # readable: anchor op/shape + owned ops
    onnx: bytes
    feeds: Mapping[str, np.ndarray]
    in_dtypes: tuple[str, ...]
    out_dtypes: tuple[str, ...]
    neighbours: tuple[str, ...] = ()  # layers on the other side of each boundary tensor
    ops: tuple[str, ...] = field(default_factory=tuple)


def node_owners(proto: Any, anchors: Iterable[str]) -> dict[str, str]:
    """Node name -> anchor node name, for every node (see module docstring for the rules)."""
    from lcpaq.profiler.onnx_export import ownership

    g = proto.graph
    for i, n in enumerate(g.node):
        if not n.name:
            n.name = f"_n{i}_{n.op_type}"
    owner = ownership(proto, anchors)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    changed = True
    while changed:
        changed = False
        for n in g.node:
            if n.name in owner:
                continue
            own = None
            if n.op_type == "QuantizeLinear":
                src = producer.get(n.input[0])
                if src is not None and src.name in owner:
                    own = owner[src.name]
            if own is None:  # DQ, Constant, Q on a graph input: goes with its first consumer
                for o in n.output:
                    for c in consumers.get(o, []):
                        if c.name in owner:
                            own = owner[c.name]
                            break
                    if own:
                        break
            if own is None and n.input:  # e.g. the DQ on the graph output: with its producer
                src = producer.get(n.input[0])
                if src is not None and src.name in owner:
                    own = owner[src.name]
            if own is not None:
                owner[n.name] = own
                changed = True
    return owner


_DT = {1: "f32", 2: "u8", 3: "i8", 6: "i32", 7: "i64"}


def _np_dtype(elem: int) -> Any:
    return {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64}[elem]


def cut_units(qdq_bytes: bytes, model: Any, policy: Policy, *, seed: int = 0) -> dict[str, CutUnit]:
    """Cut ``export_qdq(model, policy, ...)`` bytes into one :class:`CutUnit` per layer."""
    from lcpaq.profiler.onnx_export import quantizable_names

    return cut_groups(qdq_bytes, model, policy, {n: n for n in quantizable_names(model)}, seed=seed)


def prepare_for_cutting(proto: Any) -> None:
    """In place: Constant nodes become initializers, and a weight DequantizeLinear shared by several
    consumers (the exporter deduplicates equal weights) is copied per consumer.

    ORT does the same to the whole graph (EnsureUniqueDQForNodeUnit); without it a unit would get
    another unit's dequantized weight as a *float graph input*, and ORT cannot fuse a QLinearConv
    around a non-constant weight, so the unit would time a different kernel."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name for i in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = numpy_helper.to_array(n.attribute[0].t)
            g.initializer.append(numpy_helper.from_array(t, n.output[0]))
            inits.add(n.output[0])
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    out_nodes = []
    for n in g.node:
        out_nodes.append(n)
        if n.op_type != "DequantizeLinear" or not all(t in inits for t in n.input if t):
            continue
        for k, c in enumerate(consumers.get(n.output[0], [])[1:], start=1):
            dup = type(n)()
            dup.CopyFrom(n)
            dup.name = f"{n.name}_dup{k}"
            dup.output[0] = f"{n.output[0]}_dup{k}"
            for j, t in enumerate(c.input):
                if t == n.output[0]:
                    c.input[j] = dup.output[0]
            out_nodes.append(dup)
    if len(out_nodes) != len(g.node):
        # keep topological order: each copy right after its original
        del g.node[:]
        g.node.extend(out_nodes)


def pattern(policy: Policy, layers: Sequence[str]) -> str:
    """Precision classes of ``layers`` as one letter each: 'f' (fp32) or 'i' (int8), e.g. 'fif'."""
    return "".join(precision_class(policy[n])[0] for n in layers)


def cut_groups(qdq_bytes: bytes, model: Any, policy: Policy, groups: Mapping[str, str], *,
               seed: int = 0) -> dict[str, CutUnit]:
    """Cut an exported QDQ graph into one :class:`CutUnit` per group of layers (``groups``: layer ->
    group name, e.g. every layer of one residual block -> the block). A group's unit holds every node
    its layers own (:func:`node_owners`); its ``neighbours`` are the layers *outside* the group on the
    other side of its boundary tensors. Single-layer groups key on the layer's class (as before),
    larger ones on the group's class pattern ('fif...')."""
    import onnx
    from onnx import helper, shape_inference

    from lcpaq.profiler.onnx_export import anchor_map, quantizable_names

    raw = onnx.load_from_string(qdq_bytes)
    prepare_for_cutting(raw)
    proto = shape_inference.infer_shapes(raw)
    g = proto.graph
    names = quantizable_names(model)
    mods = dict(model.named_modules())
    amap = _anchor_map_qdq(proto, names, {n: tuple(mods[n].weight.shape) for n in names}, anchor_map)
    layer_of = {v: k for k, v in amap.items()}
    owner = node_owners(proto, amap.values())
    group_of = {n.name: groups[layer_of[owner[n.name]]] for n in g.node if n.name in owner}
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(groups[n], []).append(n)
    vinfo = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: i for i in g.initializer}
    producer_layer = {o: layer_of[owner[n.name]] for n in g.node if n.name in owner for o in n.output}
    consumer_layers: dict[str, set[str]] = {}
    for n in g.node:
        if n.name in owner:
            for t in n.input:
                consumer_layers.setdefault(t, set()).add(layer_of[owner[n.name]])
    graph_outputs = {o.name for o in g.output}
    rng = np.random.default_rng(seed)
    out: dict[str, CutUnit] = {}
    for gname, layers in members.items():
        nodes = [n for n in g.node if group_of.get(n.name) == gname]
        mine = set(layers)
        produced = {o for n in nodes for o in n.output}
        ins, outs, used_inits = [], [], []
        for n in nodes:
            for t in n.input:
                if not t or t in produced:
                    continue
                if t in inits:
                    if t not in used_inits:
                        used_inits.append(t)
                elif t not in ins:
                    ins.append(t)
        for n in nodes:
            for t in n.output:
                if (consumer_layers.get(t, set()) - mine or t in graph_outputs) and t not in outs:
                    outs.append(t)
        in_vi = [vinfo[t] for t in ins]
        out_vi = [vinfo[t] for t in outs]
        sub = helper.make_graph(list(nodes), f"unit_{gname}", in_vi, out_vi, [inits[t] for t in used_inits])
        m = helper.make_model(sub, opset_imports=list(proto.opset_import))
        m.ir_version = proto.ir_version
        feeds = {}
        for v in in_vi:
            tt = v.type.tensor_type
            shape = [d.dim_value if d.dim_value > 0 else 1 for d in tt.shape.dim]  # symbolic (batch) -> 1
            dt = _np_dtype(tt.elem_type)
            feeds[v.name] = (rng.integers(0, 256, size=shape).astype(dt) if dt == np.uint8
                             else rng.standard_normal(shape).astype(dt))
        in_dt = tuple(_DT.get(v.type.tensor_type.elem_type, "?") for v in in_vi)
        out_dt = tuple(_DT.get(v.type.tensor_type.elem_type, "?") for v in out_vi)
        nb = [p for t in ins if (p := producer_layer.get(t)) is not None and p not in mine]
        nb += [c for t in outs for c in sorted(consumer_layers.get(t, set()) - mine)]
        ops = tuple(n.op_type for n in nodes)
        cls = precision_class(policy[layers[0]]) if len(layers) == 1 else pattern(policy, layers)
        workload, key = _key(nodes, vinfo, inits, in_vi, out_vi, cls)
        out[gname] = CutUnit(gname, key, workload, m.SerializeToString(), feeds, in_dt, out_dt,
                             tuple(dict.fromkeys(nb)), ops)
    return out


def _anchor_map_qdq(proto: Any, names: list[str], shapes: Mapping[str, tuple], anchor_map: Any) -> dict[str, str]:
    """anchor_map on a QDQ graph: weights of quantized layers come through DequantizeLinear."""
    anchors = [n for n in proto.graph.node if n.op_type in ANCHOR_OPS]
    from lcpaq.profiler.onnx_export import _scope_module

    by_scope = {_scope_module(n.name): n.name for n in anchors}
    if all(n in by_scope for n in names):
        return {n: by_scope[n] for n in names}
    return {n: a.name for n, a in zip(names, anchors, strict=True)}


def _key(nodes: Sequence[Any], vinfo: Mapping[str, Any], inits: Mapping[str, Any], in_vi: Sequence[Any],
         out_vi: Sequence[Any], cls: str) -> tuple[str, str]:
    from onnx import helper

    def shp(t: str) -> str:
        if t in inits:
            return "init" + "x".join(map(str, inits[t].dims)) + f":{_DT.get(inits[t].data_type, '?')}"
        v = vinfo.get(t)
        if v is None:
            return "?"
        tt = v.type.tensor_type
        return "x".join(str(d.dim_value) for d in tt.shape.dim) + f":{_DT.get(tt.elem_type, '?')}"

    parts = []
    for n in nodes:
        attrs = ",".join(f"{a.name}={helper.get_attribute_value(a)}" for a in sorted(n.attribute, key=lambda a: a.name))
        parts.append(f"{n.op_type}({attrs})[{';'.join(shp(t) for t in n.input if t)}]")
    sig = "|".join(parts) + "||in:" + ";".join(shp(v.name) for v in in_vi) + "||out:" + ";".join(
        shp(v.name) for v in out_vi)
    anchor = next((n for n in nodes if n.op_type in ANCHOR_OPS), nodes[0])
    wl = f"{anchor.op_type}:{shp(anchor.input[1]) if len(anchor.input) > 1 else ''}:in{shp(anchor.input[0])}"
    ops = "+".join(n.op_type for n in nodes if n.op_type not in QDQ and n.op_type != "Constant")
    workload = f"{cls}:{wl}:{ops}"
    return workload, f"{cls}:{hashlib.sha1(sig.encode()).hexdigest()[:16]}"


@dataclass
class ContextTable:
    """Measured cut units: key -> ms, plus per-layer observations (class, neighbour classes, ms)."""

    ms: dict[str, float] = field(default_factory=dict)
    obs: dict[str, list[tuple[str, tuple[str, ...], float]]] = field(default_factory=dict)
    neighbours: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def add(self, units: Mapping[str, CutUnit], policy: Policy, measure: Any) -> int:
        """Measure units not yet seen (``measure(unit) -> ms``); record observations. Returns #new."""
        new = 0
        for lname, u in units.items():
            if u.key not in self.ms:
                self.ms[u.key] = float(measure(u))
                new += 1
            self.neighbours.setdefault(lname, u.neighbours)
            nb_cls = tuple(precision_class(policy[n]) for n in self.neighbours[lname])
            self.obs.setdefault(lname, []).append((precision_class(policy[lname]), nb_cls, self.ms[u.key]))
        return new

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "lcpaq.context_table/1", "ms": self.ms,
                "obs": {k: [[c, list(nc), t] for c, nc, t in v] for k, v in self.obs.items()},
                "neighbours": {k: list(v) for k, v in self.neighbours.items()}}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> ContextTable:
        from lcpaq.errors import TableError

        if d.get("schema") != "lcpaq.context_table/1":
            raise TableError(f"context table schema is {d.get('schema')!r}, expected 'lcpaq.context_table/1'")
        return ContextTable(dict(d["ms"]), {k: [(c, tuple(nc), float(t)) for c, nc, t in v]
                                            for k, v in d["obs"].items()},
                            {k: tuple(v) for k, v in d["neighbours"].items()})

    def save(self, path: Any) -> Any:
        """Atomic JSON write (temp file + rename)."""
        import json

        from lcpaq.policy import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @staticmethod
    def load(path: Any) -> ContextTable:
        import json
        from pathlib import Path

        return ContextTable.from_dict(json.loads(Path(path).read_text()))

    def predict_exact(self, units: Mapping[str, CutUnit]) -> float | None:
        """Sum of the policy's own cut units, or None when one is not in the table."""
        try:
            return sum(self.ms[u.key] for u in units.values())
        except KeyError:
            return None


def fit_latency_model(ct: ContextTable, candidates: Sequence[BitPair]) -> LatencyModel:
    """Additive model: per layer and class, t = base + sum over neighbours of another class of d_e.

    Solved per (layer, class) by non-negative least squares over the observed contexts; an edge's transition cost
    is the sum of both ends' d_e (each end pays its own convert op)."""
    base: dict[tuple[str, str], float] = {}
    delta: dict[tuple[str, str, str], float] = {}  # (layer, class, neighbour) -> ms
    for lname, rows in ct.obs.items():
        nbs = ct.neighbours.get(lname, ())
        for cls in ("fp32", "int8"):
            sel = [(nc, t) for c, nc, t in rows if c == cls]
            if not sel:
                continue
            uniq = sorted({(nc, t) for nc, t in sel})
            same = [t for nc, t in uniq if all(x == cls for x in nc)]
            # Base: the unit among same-class neighbours (the uniform policy); transition costs:
            # non-negative least squares on what the other contexts add (a convert op never
            # saves time; unconstrained fits extrapolated to -9 ms on resnet18).
            b0 = float(np.median(same)) if same else min(t for _, t in uniq)
            base[(lname, cls)] = b0
            A = np.array([[float(x != cls) for x in nc] for nc, _ in uniq]).reshape(len(uniq), len(nbs))
            y = np.array([t - b0 for _, t in uniq])
            coef = _nnls(A, y) if A.size else np.zeros(len(nbs))
            for j, nb in enumerate(nbs):
                delta[(lname, cls, nb)] = float(coef[j])
    unary = {}
    for lname in ct.obs:
        unary[lname] = {tuple(p): base.get((lname, precision_class(p)), float("nan")) for p in candidates}
    pairwise: dict[tuple[str, str], dict[tuple[BitPair, BitPair], float]] = {}
    for lname, nbs in ct.neighbours.items():
        for nb in nbs:
            if nb not in ct.neighbours:
                continue
            edge = tuple(sorted((lname, nb)))
            if edge in pairwise:
                continue
            a, b = edge
            tab = {}
            for pa in candidates:
                for pb in candidates:
                    ca, cb = precision_class(pa), precision_class(pb)
                    if ca != cb:
                        tab[(tuple(pa), tuple(pb))] = delta.get((a, ca, b), 0.0) + delta.get((b, cb, a), 0.0)
            pairwise[edge] = tab  # type: ignore[index]
    return LatencyModel(unary, pairwise, 0.0, meta={"source": "lcpaq.profiler.fidelity", "delta": delta})


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    return nnls(A, y)[0]


def predict_hybrid(ct: ContextTable, lm: LatencyModel, units: Mapping[str, CutUnit], policy: Policy) -> float:
    """Measured unit where the table holds the policy's exact unit, else the fitted layer cost.

    Needs the policy's own cut units (an export): what validate has, not what the search has.
    ``lm`` is the (calibrated) fitted model; its per-unit correction applies to measured units too."""
    corr = lm.meta.get("per_unit_correction_ms", {})
    delta = lm.meta.get("delta", {})
    total = lm.constant_ms
    for lname, u in units.items():
        cls = precision_class(policy[lname])
        if u.key in ct.ms:
            total += ct.ms[u.key] - corr.get(cls, 0.0)
        else:
            total += lm.layer_ms(lname, policy[lname]) + sum(
                delta.get((lname, cls, nb), 0.0) for nb in u.neighbours
                if precision_class(policy[nb]) != cls)
    return float(total)


def calibrate_to_references(lm: LatencyModel, refs: Mapping[BitPair, float], *,
                             share: float = 0.0) -> LatencyModel:
    """Spread each uniform policy's (predicted - measured whole model) evenly over its units.

    ``refs``: measured whole-model ms of uniform policies, e.g. {(32, 32): 40.0, (8, 8): 21.4},
    measured in the same run. What remains after subtracting the empty-graph overhead is the
    per-unit cost of isolation (session call, output allocation, layout at the unit's edges);
    it is per class, so it is removed per class; transition costs are untouched."""
    unary = {n: dict(t) for n, t in lm.unary.items()}
    names = list(unary)
    corr: dict[str, float] = {}
    for pair, whole in refs.items():
        pol = Policy({n: tuple(pair) for n in names})
        c = (lm.predict(pol) - float(whole)) / max(len(names), 1)
        corr[precision_class(pair)] = c
    for tab in unary.values():
        for p in tab:
            tab[p] = tab[p] - corr.get(precision_class(p), 0.0)
    # The isolation cost sits at a unit's edges (layout conversion in/out); at a precision boundary
    # the whole model really pays it, so boundary edges get each end's share back.
    deg: dict[str, int] = {}
    for a, b in lm.pairwise:
        deg[a] = deg.get(a, 0) + 1
        deg[b] = deg.get(b, 0) + 1
    pairwise = {}
    for (a, b), tab in lm.pairwise.items():
        pairwise[(a, b)] = {
            (pa, pb): v + share * (corr.get(precision_class(pa), 0.0) / deg[a]
                                   + corr.get(precision_class(pb), 0.0) / deg[b])
            for (pa, pb), v in tab.items()
        }
    meta = dict(lm.meta)
    meta["per_unit_correction_ms"] = corr
    meta.pop("reference", None)  # calibrated to now: no table-time reference to rescale by
    return LatencyModel(unary, pairwise, lm.constant_ms, meta=meta)


def profile_context(
    model: Any,
    input_shape: tuple[int, ...],
    candidates: Sequence[BitPair],
    *,
    train: int = 6,
    settings: Any = None,
    seed: int = 1000,
    calib: Any = None,
) -> tuple[ContextTable, LatencyModel]:
    """Measure cut units of 2 uniform + ``train`` random-class policies on ORT (in-process) and
    return the context table and its calibrated additive LatencyModel.

    >>> # ct, lm = profile_context(get_model("resnet18"), (1, 3, 224, 224), [(32, 32), (4, 8), (8, 8)])
    """
    from lcpaq.profiler.backend import MeasureSettings, Unit
    from lcpaq.profiler.backends.ort import OrtBackend
    from lcpaq.profiler.onnx_export import export_qdq, quantizable_names
    from lcpaq.profiler.units import overhead_unit

    st = settings or MeasureSettings(warmup=3, number=3, repeat=5)
    be = OrtBackend()
    x = np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)

    def timed(onnx_bytes: bytes, feeds: Mapping[str, np.ndarray]) -> float:
        m = be.measure(Unit("u", onnx_bytes, feeds), st)
        if m.error:
            from lcpaq.errors import BackendUnavailableError

            raise BackendUnavailableError(f"ORT failed on a cut unit: {m.error}")
        return m.median_ms

    ov = timed(*overhead_unit())
    names = quantizable_names(model)
    rng = np.random.default_rng(seed)
    ints = [tuple(c) for c in candidates if precision_class(c) == "int8"] or [(8, 8)]
    pols = [Policy.uniform(names, 32, 32), Policy.uniform(names, *ints[-1])]
    pols += [random_class_policy(names, rng, candidates) for _ in range(train)]
    ct, refs = ContextTable(), {}
    for i, pol in enumerate(pols):
        b = export_qdq(model, pol, input_shape, calib=calib if calib is not None else [x])
        ct.add(cut_units(b, model, pol), pol, lambda u: timed(u.onnx, u.feeds) - ov)
        if i < 2:
            refs[tuple(pol[names[0]])] = min(timed(b, {"input": x}) for _ in range(2))
    return ct, calibrate_to_references(fit_latency_model(ct, candidates), refs)


def class_edges(model: Any, input_shape: tuple[int, ...], *, calib: Any = None) -> list[tuple[str, str]]:
    """Undirected edges between quantizable layers whose units exchange a tensor (the cut units' neighbours)."""
    from lcpaq.profiler.onnx_export import export_qdq, quantizable_names

    names = quantizable_names(model)
    x = np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)
    pol = Policy.uniform(names, 8, 8)
    units = cut_units(export_qdq(model, pol, input_shape, calib=calib if calib is not None else [x]), model, pol)
    return sorted({tuple(sorted((a, b))) for a, u in units.items() for b in u.neighbours if b in units})  # type: ignore[misc]


def whole_training_policies(names: Sequence[str], candidates: Sequence[BitPair], rng: np.random.Generator,
                            n_random: int) -> list[Policy]:
    """Uniform fp32 and int8, every single-layer flip from both, and ``n_random`` random class mixes.

    A flip to fp32 in the int8 model costs -a_l + sum of l's boundary edges; the flip to int8 in the
    fp32 model costs +a_l + the same edges: together they separate a layer's own cost from its edges."""
    ints = [tuple(c) for c in candidates if precision_class(c) == "int8"] or [(8, 8)]
    i8, f32 = ints[-1], (32, 32)
    pols = [Policy.uniform(names, *f32), Policy.uniform(names, *i8)]
    for n in names:
        pols.append(Policy({k: (f32 if k == n else i8) for k in names}))
        pols.append(Policy({k: (i8 if k == n else f32) for k in names}))
    pols += [random_class_policy(names, rng, candidates) for _ in range(n_random)]
    return pols


def fit_whole_model(policies: Sequence[Policy], rel_times: Sequence[float], edges: Sequence[tuple[str, str]],
                    candidates: Sequence[BitPair], *, ref_ms: float) -> LatencyModel:
    """Additive model fitted on whole-model times: T = c + sum_l int8_l * a_l + sum_e boundary_e * b_e.

    ``rel_times``: each policy's whole-model time divided by an interleaved reference (drift-free);
    ``ref_ms`` turns the fit back into ms. Transition costs b_e >= 0 (a convert op never saves time).
    Nothing is measured in isolation, so no isolation overhead or layout change at cut edges enters."""
    from scipy.optimize import lsq_linear

    names = list(policies[0])
    idx = {n: i for i, n in enumerate(names)}
    L, E = len(names), len(edges)
    X = np.zeros((len(policies), 1 + L + E))
    for r, pol in enumerate(policies):
        c = np.array([precision_class(pol[n]) == "int8" for n in names], dtype=float)
        X[r, 0] = 1.0
        X[r, 1:1 + L] = c
        for j, (a, b) in enumerate(edges):
            X[r, 1 + L + j] = float(c[idx[a]] != c[idx[b]])
    lb = np.r_[np.full(1 + L, -np.inf), np.zeros(E)]
    coef = lsq_linear(X, np.asarray(rel_times, float), bounds=(lb, np.full(1 + L + E, np.inf))).x * ref_ms
    rms = float(np.sqrt(np.mean((X @ coef / ref_ms - np.asarray(rel_times)) ** 2)))
    # The fp32 whole model (c) is spread evenly over the layers so that breakdowns read as layer
    # costs; int8 adds a_l (usually negative) to that share. Only sums are measured.
    share = float(coef[0]) / max(L, 1)
    unary = {n: {tuple(p): share + (float(coef[1 + idx[n]]) if precision_class(p) == "int8" else 0.0)
                 for p in candidates} for n in names}
    pairwise = {}
    for j, (a, b) in enumerate(edges):
        pairwise[(a, b)] = {(tuple(pa), tuple(pb)): float(coef[1 + L + j]) for pa in candidates for pb in candidates
                            if precision_class(pa) != precision_class(pb)}
    return LatencyModel(unary, pairwise, 0.0,  # type: ignore[arg-type]
                        meta={"source": "lcpaq.profiler.fidelity.fit_whole_model", "fit_rms_rel": rms,
                              "policies": len(policies), "ref_ms": ref_ms})


def profile_whole(
    model: Any,
    input_shape: tuple[int, ...],
    candidates: Sequence[BitPair],
    *,
    n_random: int = 10,
    settings: Any = None,
    seed: int = 1000,
    calib: Any = None,
    progress: Any = None,
) -> tuple[LatencyModel, list[dict[str, Any]]]:
    """Measure whole QDQ models (:func:`whole_training_policies`) on ORT in-process and fit
    :func:`fit_whole_model`. Each policy is timed A B A B against the uniform int8 model; the fastest
    round of each is kept. Returns the model and one record per training policy.

    >>> # lm, rows = profile_whole(get_model("mnist_resnet"), (1, 1, 28, 28), [(32, 32), (8, 8)])
    """
    from lcpaq.profiler.backend import MeasureSettings, Unit
    from lcpaq.profiler.backends.ort import OrtBackend
    from lcpaq.profiler.onnx_export import export_qdq, quantizable_names

    st = settings or MeasureSettings(warmup=3, number=3, repeat=5)
    be = OrtBackend()
    x = np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)
    cal = calib if calib is not None else [x]
    names = quantizable_names(model)
    pols = whole_training_policies(names, candidates, np.random.default_rng(seed), n_random)

    def timed(b: bytes) -> float:
        m = be.measure(Unit("w", b, {"input": x}), st)
        if m.error:
            from lcpaq.errors import BackendUnavailableError

            raise BackendUnavailableError(f"ORT failed on a whole model: {m.error}")
        return m.median_ms

    ref_b = export_qdq(model, pols[1], input_shape, calib=cal)
    rows, rel = [], []
    for i, pol in enumerate(pols):
        b = export_qdq(model, pol, input_shape, calib=cal)
        r, p = [], []
        for _ in range(2):
            r.append(timed(ref_b))
            p.append(timed(b))
        rows.append({"policy": {n: list(pb) for n, pb in pol.items()},
                     "ms": min(p), "ref_ms": min(r)})
        rel.append(min(p) / min(r))
        if progress:
            progress(i + 1, len(pols))
    ref_ms = float(np.median([r["ref_ms"] for r in rows]))
    edges = class_edges(model, input_shape, calib=cal)
    return fit_whole_model(pols, rel, edges, candidates, ref_ms=ref_ms), rows


def random_class_policy(names: Sequence[str], rng: np.random.Generator, candidates: Sequence[BitPair],
                        p_fp32: float = 0.5) -> Policy:
    """A random mixed policy: each layer fp32 with probability ``p_fp32``, else a random int pair."""
    ints = [tuple(c) for c in candidates if precision_class(c) == "int8"]
    fps = [tuple(c) for c in candidates if precision_class(c) == "fp32"] or [(32, 32)]
    return Policy({n: (fps[0] if rng.random() < p_fp32 else ints[rng.integers(len(ints))]) for n in names})


__all__ = ["CutUnit", "ContextTable", "cut_units", "cut_groups", "prepare_for_cutting", "pattern", "fit_latency_model", "node_owners", "random_class_policy", "calibrate_to_references", "predict_hybrid", "profile_context",
           "class_edges", "whole_training_policies", "fit_whole_model", "profile_whole"]
