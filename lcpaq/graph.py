"""Trace a model into an :class:`~lcpaq.inventory.Inventory` of its quantizable layers.

Uses torch.fx (symbolic trace + shape propagation) so that tie groups and producer/consumer edges
come from the real dataflow graph; falls back to forward hooks (layers and shapes, no ties) for
models fx cannot trace, with a warning.

Tie groups (union-find over two relations; a tie means "same activation bits"):
  * layers whose outputs meet at a residual ``add`` or a ``cat`` (their outputs must share one
    quantization grid there), and
  * layers that read the same tensor (it is quantized once, so they share its a_bits).
"""

from __future__ import annotations

import logging
import operator
import warnings
from collections.abc import Iterable

import torch
from torch import fx, nn

from lcpaq.inventory import Inventory, LayerInfo

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Linear)
_ADD = {operator.add, operator.iadd, torch.add}
_CAT = {torch.cat, torch.concat}
_FUSE_NAMES = {
    nn.BatchNorm2d: "bn", nn.BatchNorm1d: "bn", nn.ReLU: "relu", nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.MaxPool2d: "maxpool",
    nn.AdaptiveAvgPool2d: "avgpool", nn.AvgPool2d: "avgpool", nn.Hardsigmoid: "hardsigmoid",
}
_FN_NAMES = {
    torch.relu: "relu", nn.functional.relu: "relu", nn.functional.relu6: "relu6",
    torch.flatten: "flatten", nn.functional.hardswish: "hardswish",
}


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _layer_info(name: str, mod: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                fused: tuple[str, ...] = ()) -> LayerInfo:
    params = sum(p.numel() for p in mod.parameters(recurse=False))
    wnum = mod.weight.numel()
    out_numel = 1
    for s in out_shape:
        out_numel *= s
    if isinstance(mod, nn.Conv2d):
        kh, kw = _pair(mod.kernel_size)
        macs = out_numel * (mod.in_channels // mod.groups) * kh * kw
        return LayerInfo(
            name=name, kind="conv", in_shape=in_shape, out_shape=out_shape,
            in_channels=mod.in_channels, out_channels=mod.out_channels, kernel_size=(kh, kw),
            stride=_pair(mod.stride), padding=_pair(mod.padding) if not isinstance(mod.padding, str) else (0, 0),
            dilation=_pair(mod.dilation), groups=mod.groups, bias=mod.bias is not None,
            weight_numel=wnum, params=params, macs=macs, fused=fused,
        )
    assert isinstance(mod, nn.Linear)
    return LayerInfo(
        name=name, kind="linear", in_shape=in_shape, out_shape=out_shape,
        in_channels=mod.in_features, out_channels=mod.out_features, bias=mod.bias is not None,
        weight_numel=wnum, params=params, macs=out_numel * mod.in_features, fused=fused,
    )


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, items: Iterable[str]) -> None:
        items = list(items)
        for b in items[1:]:
            ra, rb = self.find(items[0]), self.find(b)
            if ra != rb:
                self.parent[rb] = ra

    def groups(self, order: list[str]) -> tuple[tuple[str, ...], ...]:
        by_root: dict[str, list[str]] = {}
        for n in order:
            if n in self.parent:
                by_root.setdefault(self.find(n), []).append(n)
        return tuple(tuple(g) for g in by_root.values() if len(g) > 1)


def trace(model: nn.Module, input_shape: tuple[int, ...], *, name: str = "") -> Inventory:
    """Inventory of every Conv2d/Linear in ``model`` at ``input_shape`` (batch included).

    >>> import torchvision
    >>> inv = trace(torchvision.models.resnet18(), (1, 3, 224, 224), name="resnet18")
    >>> len(inv), round(inv.total_macs / 1e9, 2)
    (21, 1.81)
    """
    was_training = model.training
    model.eval()
    try:
        try:
            return _trace_fx(model, input_shape, name)
        except Exception as e:  # noqa: BLE001 - any fx failure -> hooks fallback
            warnings.warn(
                f"torch.fx could not trace {name or type(model).__name__} ({type(e).__name__}: {e}); "
                "falling back to hooks: no tie groups or edges", stacklevel=2,
            )
            return _trace_hooks(model, input_shape, name)
    finally:
        model.train(was_training)


def _trace_fx(model: nn.Module, input_shape: tuple[int, ...], name: str) -> Inventory:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(input_shape))
    modules = dict(gm.named_modules())

    def qname(node: fx.Node) -> str | None:
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            return str(node.target)
        return None

    def shape(node: fx.Node) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else ()

    def producers(node: fx.Node, seen: set[fx.Node] | None = None) -> set[str]:
        """Quantizable layers whose output reaches ``node`` through non-quantizable ops only."""
        seen = seen if seen is not None else set()
        out: set[str] = set()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            q = qname(arg)
            if q is not None:
                out.add(q)
            else:
                out |= producers(arg, seen)
        return out

    def op_label(node: fx.Node) -> str | None:
        if node.op == "call_module":
            return _FUSE_NAMES.get(type(modules[node.target]))
        if node.op == "call_function":
            if node.target in _ADD:
                return "add"
            return _FN_NAMES.get(node.target)  # type: ignore[arg-type]
        if node.op == "call_method" and node.target in ("add", "add_", "relu", "relu_"):
            return "add" if str(node.target).startswith("add") else "relu"
        return None

    layers: list[LayerInfo] = []
    uf = _UnionFind()
    edges: set[tuple[str, str]] = set()
    readers: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        q = qname(node)
        if q is not None:
            src = node.args[0]
            # fused ops: follow the single-user chain of fusable ops after the layer
            fused: list[str] = []
            cur = node
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                lab = op_label(nxt)
                if lab is None:
                    break
                fused.append(lab)
                cur = nxt
            layers.append(_layer_info(q, modules[node.target], shape(src), shape(node), tuple(fused)))
            for p in producers(node):
                edges.add((p, q))
            readers.setdefault(_source_tensor(src, qname), []).append(q)
            uf.find(q)
        elif (node.op == "call_function" and node.target in _ADD | _CAT) or (
            node.op == "call_method" and node.target in ("add", "add_")
        ):
            meet = producers(node)
            if len(meet) > 1:
                uf.union(sorted(meet))
    for names in readers.values():
        if len(names) > 1:
            uf.union(names)
    order = [ly.name for ly in layers]
    rank = {n: i for i, n in enumerate(order)}
    return Inventory(
        model=name, input_shape=tuple(input_shape), layers=tuple(layers),
        tie_groups=uf.groups(order),
        edges=tuple(sorted(edges, key=lambda e: (rank[e[1]], rank[e[0]]))),
        meta={"tracer": "fx"},
    )


def _source_tensor(node: fx.Node, qname) -> fx.Node:
    """Walk back through shape-only / elementwise single-input ops to the tensor a layer reads."""
    cur = node
    while (
        qname(cur) is None
        and cur.op in ("call_function", "call_method")
        and len(cur.all_input_nodes) == 1
        and cur.target in (torch.flatten, "flatten", "view", "reshape", "contiguous")
    ):
        cur = cur.all_input_nodes[0]
    return cur


def _trace_hooks(model: nn.Module, input_shape: tuple[int, ...], name: str) -> Inventory:
    records: list[LayerInfo] = []
    handles = []
    for mname, mod in model.named_modules():
        if isinstance(mod, QUANTIZABLE):
            def hook(m, inp, out, _n=mname):
                records.append(_layer_info(_n, m, tuple(inp[0].shape), tuple(out.shape)))
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    layers = tuple(r for r in records if not (r.name in seen or seen.add(r.name)))  # type: ignore[func-returns-value]
    return Inventory(model=name, input_shape=tuple(input_shape), layers=layers, meta={"tracer": "hooks"})


def trace_named(model_name: str, *, input_shape: tuple[int, ...] | None = None,
                weights: str | None = None) -> tuple[nn.Module, Inventory]:
    """Build a registered model and trace it at its default (or the given) input shape."""
    from lcpaq.models import default_input_shape, get_model

    model = get_model(model_name, weights=weights)
    shape = input_shape or default_input_shape(model_name)
    return model, trace(model, shape, name=model_name)
