"""The converted model cut into one *segment* per quantizable layer, and each segment's key.

A segment is a quantizable layer's module call in :func:`lcpaq.kernels.convert`'s output and every
torch.fx node after it up to the next quantizable layer: its activation quantize, kernel and
epilogue (inside the call), then the BN, ReLU, residual add or pooling that still run in torch.
Its cost depends on the layer's own bits and, through fusion, on the class of its *partners*: the
layers at the other end of a uint8 edge that convert() fuses when both are integer (conv -> [BN]
-> ReLU -> next int layer: the producer's epilogue requantizes, the consumer skips its quantize
pass). The latency model built on them lives in :mod:`lcpaq.profiler.backends.kernels_check`.

>>> # plan = segment_plan(model, calib); key = plan.key(policy, "layer1.conv2")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def fuse_class(pair: tuple[int, int]) -> str:
    """A partner's class for fusion: 'f' (a float side: no fusion), 'u' (integer with 8-bit
    activations: a uint8 edge is fused) or 'i' (other integer: the layer runs its own quantize)."""
    w, a = (int(v) for v in pair)
    return "f" if 32 in (w, a) else ("u" if a == 8 else "i")


def segment_key(layer: str, pair: tuple[int, int], ctx: str) -> str:
    """``layer|wXaY|<context classes>``; a float layer: ``layer|fp32|<context>`` (``layer|fp32``
    without context)."""
    w, a = (int(v) for v in pair)
    if 32 in (w, a):
        return f"{layer}|fp32|{ctx}" if ctx else f"{layer}|fp32"
    return f"{layer}|w{w}a{a}|{ctx}"


class SegmentPlan:
    """Layers (model order), each one's fusion partners (producer first), the order in which the
    converted model runs them (``order``; the model order when not given) and whether a segment's
    key also holds the class of the layer run just before it (``prev_context``).

    The context of a layer: its fusion partners (an integer layer only: a float one fuses nothing),
    then, with ``prev_context``, the previous layer in run order where that is not already a
    partner. Session 8: a float conv run after an integer layer cost 10-110 us more than after a
    float one (resnet18, 12 of 14 float convs; sum ~0.7 ms on a ~15 ms model), an integer layer
    without a fused producer up to 44 us more after a float one; a key without it averaged the two."""

    def __init__(self, layers: Sequence[str], partners: Mapping[str, Sequence[str]],
                 order: Sequence[str] | None = None, *, prev_context: bool = False) -> None:
        from lcpaq.errors import KernelError

        self.layers = tuple(layers)
        self.partners = {n: tuple(partners.get(n, ())) for n in self.layers}
        self.order = tuple(order) if order is not None else self.layers
        self.prev_context = bool(prev_context)
        if sorted(self.order) != sorted(self.layers):
            raise KernelError(f"segment plan: run order {list(self.order)} is not a permutation of the layers "
                              f"{list(self.layers)}; build the plan with segment_plan()")
        prev = {b: a for a, b in zip(self.order, self.order[1:], strict=False)}
        self._ctx: dict[tuple[str, bool], tuple[str, ...]] = {}
        for n in self.layers:
            extra = (prev[n],) if self.prev_context and n in prev and prev[n] not in self.partners[n] else ()
            self._ctx[(n, True)] = (prev[n],) if self.prev_context and n in prev else ()
            self._ctx[(n, False)] = self.partners[n] + extra

    def context(self, layer: str, pair: tuple[int, int]) -> tuple[str, ...]:
        """The layers whose class is part of ``layer``'s key at ``pair``."""
        return self._ctx[(layer, fuse_class(pair) == "f")]

    def key(self, policy: Any, layer: str) -> str:
        """The key of ``layer``'s segment under ``policy``."""
        ctx = "".join(fuse_class(policy[p]) for p in self.context(layer, policy[layer]))
        return segment_key(layer, policy[layer], ctx)

    def edges(self) -> list[tuple[str, str]]:
        """Fusable (producer, consumer) edges in model order."""
        pos = {n: i for i, n in enumerate(self.layers)}
        out = {(n, p) if pos[n] < pos[p] else (p, n) for n in self.layers for p in self.partners[n]}
        return sorted(out, key=lambda e: (pos[e[0]], pos[e[1]]))

    def sequence(self) -> list[tuple[str, str]]:
        """Consecutive layers in run order: (previous, next)."""
        return list(zip(self.order, self.order[1:], strict=False))

    def transitions(self, policy: Any) -> int:
        """How often the run switches between a float layer and an integer one (consecutive layers
        in run order, one float and one not)."""
        return sum((fuse_class(policy[a]) == "f") != (fuse_class(policy[b]) == "f") for a, b in self.sequence())

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "partners": {k: list(v) for k, v in self.partners.items()},
                "order": list(self.order), "prev_context": self.prev_context}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SegmentPlan:
        return SegmentPlan(d["layers"], d["partners"], d.get("order"), prev_context=bool(d.get("prev_context")))


def quantized_copy(model: Any, policy: Any, calib: Sequence[Any]) -> Any:
    """A calibrated fake-quant deep copy of ``model`` at ``policy`` (what validate deploys)."""
    import copy

    import torch

    from lcpaq.quant import apply_policy

    cal = [torch.as_tensor(c, dtype=torch.float32) for c in calib]
    return apply_policy(copy.deepcopy(model), policy, calib_loader=cal, calib_batches=len(cal)).eval()


def segment_plan(model: Any, calib: Sequence[Any]) -> SegmentPlan:
    """The plan of a float ``model``: convert it at uniform W8A8 and read which edges were fused."""
    from lcpaq.kernels.convert import _IntBase, convert
    from lcpaq.policy import Policy
    from lcpaq.quant import quantizable_names

    names = quantizable_names(model)
    conv = convert(quantized_copy(model, Policy.uniform(names, 8, 8), calib), inplace=True)
    partners: dict[str, list[str]] = {n: [] for n in names}
    for n, m in conv.named_modules():
        if isinstance(m, _IntBase) and m.requant_for:
            partners[m.requant_for].insert(0, n)  # producer first
            partners[n].append(m.requant_for)
    order = [n for n in SegmentRunner(conv, names, None).names if n != "(pre)"]
    return SegmentPlan(names, partners, order, prev_context=True)


class SegmentRunner:
    """The converted model's fx graph split into one segment per quantizable layer, compiled to
    plain Python (one function per segment over a slot list, freeing each value after its last
    use, as fx's own codegen does), runnable in sequence with a clock read between segments."""

    def __init__(self, conv_model: Any, layers: Sequence[str], x: Any) -> None:
        from torch import fx, nn

        from lcpaq.errors import KernelError
        from lcpaq.kernels.convert import _IntBase

        class _Tracer(fx.Tracer):  # every layer a leaf (subclasses too: QuantConv2d, NhwcConv2d)
            def is_leaf_module(self, m: Any, qualname: str) -> bool:
                return isinstance(m, (_IntBase, nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)

        try:
            graph = _Tracer().trace(conv_model)
        except Exception as e:  # noqa: BLE001
            raise KernelError(f"segment units need a torch.fx-traceable model ({type(e).__name__}: {e})") from e
        nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        outputs = [n for n in graph.nodes if n.op == "output"]
        if len(inputs) != 1:
            raise KernelError(f"segment units need a model with one input, got {len(inputs)}")
        slot = {inputs[0]: 0} | {n: i + 1 for i, n in enumerate(nodes)}
        last: dict[Any, Any] = {}
        for n in [*nodes, *outputs]:
            for a in n.all_input_nodes:
                last[a] = n
        mods = dict(conv_model.named_modules())
        wanted = set(layers)
        self.names: list[str] = []
        groups: list[list[Any]] = []
        for n in nodes:
            if n.op == "call_module" and str(n.target) in wanted:
                self.names.append(str(n.target))
                groups.append([n])
            elif groups:
                groups[-1].append(n)
            else:  # nodes before the first layer: a prologue segment
                self.names.append("(pre)")
                groups.append([n])
        consts: dict[str, Any] = {}

        def arg(a: Any) -> str:
            if isinstance(a, fx.Node):
                return f"e[{slot[a]}]"
            if isinstance(a, (tuple, list)):
                inner = ", ".join(arg(v) for v in a)
                return f"({inner},)" if isinstance(a, tuple) else f"[{inner}]"
            if isinstance(a, dict):
                return "{" + ", ".join(f"{k!r}: {arg(v)}" for k, v in a.items()) + "}"
            if a is None or isinstance(a, (bool, int, float, str)):
                return repr(a)
            name = f"c{len(consts)}"
            consts[name] = a
            return name

        self._fns = []
        for g in groups:
            lines = ["def seg(e):"]
            for n in g:
                args = [arg(a) for a in n.args] + [f"{k}={arg(v)}" for k, v in n.kwargs.items()]
                if n.op == "call_module":
                    fn = arg(mods[str(n.target)])
                elif n.op == "call_function":
                    fn = arg(n.target)
                elif n.op == "call_method":
                    fn, args = f"{args[0]}.{n.target}", args[1:]
                elif n.op == "get_attr":
                    obj = conv_model
                    for part in str(n.target).split("."):
                        obj = getattr(obj, part)
                    lines.append(f"    e[{slot[n]}] = {arg(obj)}")
                    continue
                else:
                    raise KernelError(f"segment units: unsupported fx node {n.op} {n.target}")
                lines.append(f"    e[{slot[n]}] = {fn}({', '.join(args)})")
                for a in n.all_input_nodes:
                    if last.get(a) is n:
                        lines.append(f"    e[{slot[a]}] = None")
            scope = dict(consts)
            exec("\n".join(lines), scope)  # noqa: S102 - generated from the traced graph above
            self._fns.append(scope["seg"])
        self._out = slot[outputs[0].args[0]] if outputs and isinstance(outputs[0].args[0], fx.Node) else None
        self._n, self.x = len(nodes) + 1, x

    def __call__(self) -> Any:
        e = [None] * self._n
        e[0] = self.x
        for f in self._fns:
            f(e)
        return e[self._out] if self._out is not None else None

    def timed(self, clock: Callable[[], int]) -> list[int]:
        """One run of the whole sequence; clock ticks spent in each segment (one clock read included)."""
        e: list[Any] = [None] * self._n
        e[0] = self.x
        out = []
        t = clock()
        for f in self._fns:
            f(e)
            t2 = clock()
            out.append(t2 - t)
            t = t2
        return out
