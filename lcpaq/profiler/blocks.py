"""Block units: one unit per residual / inverted-residual block, keyed by its precision pattern.

Per-layer units are additive; ORT's optimized graph is not. Inside one mobilenet_v2 inverted-residual
block (expand 1x1 -> depthwise 3x3 -> project 1x1 -> Add) several precision boundaries cost less
than the sum of each alone (layout and Q/DQ work is shared), so per-layer and per-edge models
over-predict mixed blocks. A block unit is cut from the mixed QDQ graph as one subgraph holding every
node its layers own (:func:`~lcpaq.profiler.fidelity.cut_groups`), so whatever ORT fuses inside the
block is timed as it runs. Its table key is the block's *context*: the precision class of each of
its layers and of each layer outside it that shares a boundary tensor (producer and consumers).

* :func:`block_groups`: layer -> block (the outermost module above a layer that is not a plain
  container: torchvision's BasicBlock / InvertedResidual / Conv2dNormActivation).
* :func:`block_plan`: blocks, their members and context layers, read from a few uniform exports.
* :func:`design_policies`: policies that show every block in every one of its contexts, with few
  exports (blocks whose contexts share no layer vary together).
* :class:`BlockTable`: measured block units (key -> ms, (block, context) -> key) plus whole-model
  references; :func:`fit_block_model` turns it into a :class:`~lcpaq.latency.LatencyModel` whose
  groups hold the block tables and whose constant and pairwise terms hold the isolation correction
  fitted on the whole-model references.

>>> # plan = block_plan(model, (1, 3, 224, 224)); pols = design_policies(plan, candidates, rng)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.errors import MissingLatencyError, TableError
from lcpaq.latency import GroupCost, LatencyModel
from lcpaq.policy import BitPair, Policy
from lcpaq.profiler.fidelity import cut_groups, pattern
from lcpaq.profiler.onnx_export import precision_class

BLOCK_SCHEMA = "lcpaq.block_table/1"

_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def block_groups(model: Any) -> dict[str, str]:
    """Quantizable layer -> its block: the outermost ancestor module that is not the model itself
    nor a plain container (exact type Sequential/ModuleList/ModuleDict); else the layer alone."""
    from lcpaq.profiler.onnx_export import quantizable_names

    mods = dict(model.named_modules())
    out = {}
    for name in quantizable_names(model):
        parts = name.split(".")
        block = name
        for k in range(1, len(parts)):
            anc = ".".join(parts[:k])
            if type(mods[anc]).__name__ not in _CONTAINERS:
                block = anc
                break
        out[name] = block
    return out


@dataclass(frozen=True)
class BlockPlan:
    """What a model's block table must cover."""

    layers: tuple[str, ...]  # quantizable layers in model order
    groups: Mapping[str, str]  # layer -> block
    members: Mapping[str, tuple[str, ...]]  # block -> its layers in model order
    context: Mapping[str, tuple[str, ...]]  # block -> members + outside layers sharing a tensor
    edges: tuple[tuple[str, str], ...] = ()  # (producer layer, consumer layer) across blocks
    edge_numel: Mapping[str, int] = field(default_factory=dict)  # producer layer -> output elements
    weight_numel: Mapping[str, int] = field(default_factory=dict)  # layer -> weight elements

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(self.members)

    def context_of(self, policy: Policy, block: str) -> str:
        """The block's context under ``policy``: 'f'/'i' per context layer."""
        return pattern(policy, self.context[block])

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "groups": dict(self.groups),
                "members": {k: list(v) for k, v in self.members.items()},
                "context": {k: list(v) for k, v in self.context.items()},
                "edges": [list(e) for e in self.edges], "edge_numel": dict(self.edge_numel),
                "weight_numel": dict(self.weight_numel)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> BlockPlan:
        return BlockPlan(tuple(d["layers"]), dict(d["groups"]), {k: tuple(v) for k, v in d["members"].items()},
                         {k: tuple(v) for k, v in d["context"].items()}, tuple(tuple(e) for e in d["edges"]),
                         {k: int(v) for k, v in d.get("edge_numel", {}).items()},
                         {k: int(v) for k, v in d.get("weight_numel", {}).items()})


def profiler_export(model: Any, policy: Policy, input_shape: tuple[int, ...], calib: Any) -> bytes:
    """The default exporter of block profiling: the fp32 model at ``policy`` through
    :func:`lcpaq.profiler.onnx_export.export_qdq` (ORT quantize_static), every initializer unshared."""
    from lcpaq.profiler.onnx_export import export_qdq

    return export_qdq(model, policy, input_shape, calib=calib, unshare=True)


def block_plan(model: Any, input_shape: tuple[int, ...], *, calib: Any = None,
               groups: Mapping[str, str] | None = None, export: Any = None) -> BlockPlan:
    """Blocks, members and context layers of ``model``, read from its uniform fp32 and int8 exports
    and one alternating export (where Q/DQ ops sit changes which outside layer touches a tensor).
    ``export(model, policy, input_shape, calib) -> onnx bytes``: the graph that will be deployed
    (default :func:`profiler_export`; the demo passes :func:`lcpaq.deploy.qdq` 's)."""
    import torch

    from lcpaq.profiler.onnx_export import quantizable_names

    export = export or profiler_export

    names = quantizable_names(model)
    groups = dict(groups or block_groups(model))
    x = np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)
    cal = calib if calib is not None else [x]
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(groups[n], []).append(n)
    ctx: dict[str, dict[str, None]] = {b: dict.fromkeys(m) for b, m in members.items()}
    edges: dict[tuple[str, str], None] = {}
    pols = [Policy.uniform(names, 32, 32), Policy.uniform(names, 8, 8),
            Policy({n: ((8, 8) if i % 2 else (32, 32)) for i, n in enumerate(names)})]
    for pol in pols:
        single = cut_groups(export(model, pol, input_shape, cal), model, pol, {n: n for n in names})
        for lname, u in single.items():
            for nb in u.neighbours:
                if groups[nb] != groups[lname]:
                    ctx[groups[lname]][nb] = None
                    ctx[groups[nb]][lname] = None
                    a, b = (nb, lname) if names.index(nb) < names.index(lname) else (lname, nb)
                    edges[(a, b)] = None
    numel: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: numel.__setitem__(n, int(o.numel())))
             for n, m in model.named_modules() if n in set(names)]
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    order = {n: i for i, n in enumerate(names)}
    context = {b: tuple(members[b]) + tuple(sorted((n for n in c if n not in members[b]), key=order.get))
               for b, c in ctx.items()}
    mods = dict(model.named_modules())
    return BlockPlan(tuple(names), groups, {b: tuple(m) for b, m in members.items()}, context,
                     tuple(sorted(edges, key=lambda e: (order[e[0]], order[e[1]]))), numel,
                     {n: int(mods[n].weight.numel()) for n in names})


def design_policies(plan: BlockPlan, candidates: Sequence[BitPair], rng: np.random.Generator) -> list[Policy]:
    """Policies in which every block appears in every context (2^|context| each).

    Blocks whose context layers are disjoint are set together (greedy colouring of the overlap
    graph), so the count is sum over colours of the largest 2^|context|, not the sum over blocks.
    Layers outside the blocks being set get a random class, fp32 with a probability drawn per policy
    from [0, 1] (so the whole rows span nearly-int8 to nearly-fp32 models, not only ~50 % mixes: a
    correction fitted on 50 % mixes alone missed a nearly uniform policy by +15 % on the embedded
    model); int8 layers a random int candidate."""
    ints = [tuple(c) for c in candidates if precision_class(c) == "int8"] or [(8, 8)]
    fp = next((tuple(c) for c in candidates if precision_class(c) == "fp32"), (32, 32))
    colours: list[list[str]] = []
    used: list[set[str]] = []
    for b in sorted(plan.blocks, key=lambda b: -len(plan.context[b])):
        for k, u in enumerate(used):
            if not u & set(plan.context[b]):
                colours[k].append(b)
                u.update(plan.context[b])
                break
        else:
            colours.append([b])
            used.append(set(plan.context[b]))
    out = []
    for col in colours:
        for k in range(max(2 ** len(plan.context[b]) for b in col)):
            q = rng.random()
            cls = {n: bool(rng.random() < q) for n in plan.layers}  # True = fp32
            for b in col:
                ctx = plan.context[b]
                j = k % (2 ** len(ctx))
                for bit, n in enumerate(ctx):
                    cls[n] = not (j >> bit) & 1
            out.append(Policy({n: (fp if cls[n] else ints[rng.integers(len(ints))]) for n in plan.layers}))
    return out


@dataclass
class BlockTable:
    """Measured block units of one model: key -> ms, (block, context) -> key, whole-model rows."""

    plan: BlockPlan
    ms: dict[str, float] = field(default_factory=dict)
    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # block -> context -> key
    whole: list[dict[str, Any]] = field(default_factory=list)  # {"policy", "ms", "ref_ms", "rel": ms/ref}
    # boundary 'a+b' -> [pair-context pattern, pair key, key of a, key of b] per designed policy
    # (lcpaq.profiler.pairs); empty when the pairs were not timed
    pairs: dict[str, list[list[str]]] = field(default_factory=dict)
    # how the whole rows were timed against the reference (lcpaq.profiler.backends.ort.WHOLE_MODES)
    whole_mode: str = "warm"

    def add(self, units: Mapping[str, Any], policy: Policy) -> list[Any]:
        """Record each block's key for its context in ``policy``; return the units not yet timed."""
        todo = []
        for b, u in units.items():
            self.keys.setdefault(b, {})[self.plan.context_of(policy, b)] = u.key
            if u.key not in self.ms and all(u.key != t.key for t in todo):
                todo.append(u)
        return todo

    def block_ms(self, policy: Policy) -> dict[str, float]:
        """Measured ms of each block in its context under ``policy`` (MissingLatencyError if unseen)."""
        out, missing = {}, []
        for b in self.plan.blocks:
            ctx = self.plan.context_of(policy, b)
            key = self.keys.get(b, {}).get(ctx)
            if key is None or key not in self.ms:
                missing.append(f"{b}@{ctx}")
            else:
                out[b] = self.ms[key]
        if missing:
            raise MissingLatencyError(
                f"block table lacks {len(missing)} block context(s), e.g. {', '.join(missing[:3])}; "
                "profile the model's designed policies again (lcpaq.profiler.blocks.profile_blocks)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": BLOCK_SCHEMA, "plan": self.plan.to_dict(), "ms": self.ms, "keys": self.keys,
                "whole": self.whole, "pairs": self.pairs, "whole_mode": self.whole_mode}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> BlockTable:
        if d.get("schema") != BLOCK_SCHEMA:
            raise TableError(f"block table schema is {d.get('schema')!r}, expected {BLOCK_SCHEMA!r}")
        return BlockTable(BlockPlan.from_dict(d["plan"]), dict(d["ms"]),
                          {b: dict(v) for b, v in d["keys"].items()}, list(d.get("whole", [])),
                          {g: [list(o) for o in v] for g, v in d.get("pairs", {}).items()},
                          str(d.get("whole_mode", "warm")))

    def save(self, path: str | Path) -> Path:
        from lcpaq.policy import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @staticmethod
    def load(path: str | Path) -> BlockTable:
        return BlockTable.from_dict(json.loads(Path(path).read_text()))


SAME = ("ff", "ii")  # cross-block edges whose ends share a class: the whole graph pays no convert there


def edge_features(plan: BlockPlan, policy: Policy, *, scale: float = 1e-5) -> np.ndarray:
    """Isolation-correction features of ``policy``: for the cross-block edges (producer, consumer)
    whose ends are both fp32 / both int8, their count and the producer's output size (x ``scale``).
    Isolated units pay layout changes and call overhead at every cut edge; the whole graph only where
    the classes differ. Mixed edges are the baseline (in the constant: the four counts add up to the
    fixed number of edges, so one class pair must be left out)."""
    f = np.zeros(2 * len(SAME))
    for p, c in plan.edges:
        pair = precision_class(policy[p])[0] + precision_class(policy[c])[0]
        if pair in SAME:
            k = SAME.index(pair)
            f[k] += 1.0
            f[len(SAME) + k] += plan.edge_numel.get(p, 0) * scale
    return f


EDGE_PAIRS = ("ff", "ii", "fi")  # per cross edge; "if" is the baseline (the four add up to 1 per edge)
RIDGE = 1.0  # ms^2 per coefficient^2, only for the per-edge variant (3 x edges coefficients)


WEIGHT_SCALE = 1e-6  # fp32 weight elements -> millions


def correction_features(plan: BlockPlan, policy: Policy) -> np.ndarray:
    """:func:`edge_features` (4), one indicator per cross edge and class pair (3 x edges), then the
    fp32 layers' weight elements (millions; int8 weights are the baseline). A unit timed alone in a
    loop keeps its weights in cache; in the whole model they are fetched again on every call, 4 bytes
    per element for fp32 (mobilenet_v2: 3.4 M fp32 weights = 14 MB against a 1 MB L2)."""
    per_edge = np.zeros(len(EDGE_PAIRS) * len(plan.edges))
    for j, (p, c) in enumerate(plan.edges):
        pair = precision_class(policy[p])[0] + precision_class(policy[c])[0]
        if pair in EDGE_PAIRS:
            per_edge[len(EDGE_PAIRS) * j + EDGE_PAIRS.index(pair)] = 1.0
    fw = sum(plan.weight_numel.get(n, 0) for n in plan.layers if precision_class(policy[n]) == "fp32")
    n_int = sum(precision_class(policy[n]) == "int8" for n in plan.layers)
    return np.r_[edge_features(plan, policy), per_edge, fw * WEIGHT_SCALE, n_int / max(len(plan.layers), 1)]


def _free(sel: Sequence[int], plan: BlockPlan) -> list[int]:
    """Columns of the design matrix (1 + position in ``sel``) that the ridge must not shrink."""
    frac = 4 + len(EDGE_PAIRS) * len(plan.edges) + 1
    return [1 + j for j, k in enumerate(sel) if k == frac]


def _has_corners(table: BlockTable) -> bool:
    """Whether the whole rows include the uniform fp32 and the uniform int8 model (anchor rows)."""
    seen = {frozenset(precision_class(tuple(p)) for p in r["policy"].values()) for r in table.whole}
    return frozenset({"fp32"}) in seen and frozenset({"int8"}) in seen


def _variants(plan: BlockPlan, corners: bool = False) -> dict[str, list[int]]:
    """Feature indices per variant. With corner rows every variant also gets the int8 fraction: the
    designed policies are all ~50 % mixes, so only the uniform rows fix that slope, which the
    deployed (often nearly uniform) policies need."""
    n_edge = len(EDGE_PAIRS) * len(plan.edges)
    edge = list(range(4, 4 + n_edge))
    out = {"const": [], "count": [0, 1], "size": [2, 3], "both": [0, 1, 2, 3], "edge": edge}
    if plan.weight_numel:
        w = 4 + n_edge
        out.update({"weights": [w], "count+weights": [0, 1, w], "both+weights": [0, 1, 2, 3, w]})
    if corners:
        out = {k: [*v, 4 + n_edge + 1] for k, v in out.items()}
    return out


def _solve(X: np.ndarray, y: np.ndarray, ridge: float, free: Sequence[int] = ()) -> np.ndarray:
    if not ridge:
        return np.linalg.lstsq(X, y, rcond=None)[0]
    pen = np.eye(X.shape[1]) * ridge
    for k in (0, *free):  # the constant (and the int8-fraction slope) are not shrunk
        pen[k, k] = 0.0
    return np.linalg.solve(X.T @ X + pen, X.T @ y)


def smooth_drift(refs: Sequence[float], window: int = 7) -> np.ndarray:
    """Running median of reference times (in measurement order) over ``window`` neighbours, divided
    by their overall median: the slow drift of the machine. One reference is the faster of two
    rounds, a few % noisy under load; the drift itself moves over minutes (FINDINGS: 10-25 %/hour),
    so neighbours estimate it better than the single reading."""
    v = np.asarray(refs, dtype=float)
    if not len(v):
        return v
    h = window // 2
    run = np.array([np.median(v[max(0, i - h):i + h + 1]) for i in range(len(v))])
    return run / float(np.median(v))


def drift_free_ms(rows: Sequence[Mapping[str, Any]], ms_key: str = "ms") -> np.ndarray:
    """Whole-model times of ``rows`` (each with ``ref_ms``) at the reference's median time: rows
    timed against the interleaved reference carry their ratio ``rel``, exact to the moment; older
    rows are divided by the running-median drift of the reference (:func:`smooth_drift`)."""
    refs = [r["ref_ms"] for r in rows]
    drift = smooth_drift(refs)
    scale = float(np.median(refs)) if refs else 1.0
    return np.array([r["rel"] * scale if "rel" in r else r[ms_key] / d for r, d in zip(rows, drift, strict=True)])


def _correction_data(table: BlockTable, sel: Sequence[int], extra: Sequence[GroupCost] = ()
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (1, features), targets (whole - sum of blocks - sum of ``extra`` groups, ms, drift-free)
    and whole ms."""
    X, y, tot = [], [], []
    for row, whole in zip(table.whole, drift_free_ms(table.whole).tolist(), strict=True):
        pol = Policy({n: tuple(p) for n, p in row["policy"].items()})
        X.append(np.r_[1.0, correction_features(table.plan, pol)[list(sel)]])
        y.append(whole - sum(table.block_ms(pol).values()) - sum(g.cost(pol) for g in extra))
        tot.append(whole)
    return np.array(X).reshape(len(X), 1 + len(sel)), np.array(y), np.array(tot)


def fit_correction(table: BlockTable, *, features: str = "auto", extra: Sequence[GroupCost] = ()
                   ) -> tuple[np.ndarray, float, str]:
    """Fit ``whole_ms - sum(block ms) = c0 + w . features`` over the table's whole rows.

    ``features``: "const" (c0 only), "count" (+ counts of same-class cross edges), "size" (+ their
    tensor sizes), "both", "edge" (+ one cost per cross edge and class pair, ridge-regularised:
    what each boundary really adds in the whole graph), or "auto": by leave-one-out relative error
    on the whole rows, the variant with the fewest features among those within one standard error
    of the best (the one-standard-error rule: mobilenet_v2, session 7, LOO 2.40 % for "edge" and
    2.54 % for "both+weights", 1 SE = 0.14 %; held out 2.2 / 5.0 % vs 1.2 / 2.7 %). Returns (coefficients: c0, then one per entry of
    :func:`correction_features`, zero where the variant does not use it; the relative rms; the choice)."""
    variants = _variants(table.plan, _has_corners(table))
    if features == "auto":
        scores = []  # (mean squared LOO error, its standard error, number of features, name)
        for name, sel in variants.items():
            X, y, tot = _correction_data(table, sel, extra)
            ridge = RIDGE if name == "edge" else 0.0
            if len(y) <= (X.shape[1] + 1 if not ridge else 2):
                continue
            loo = []
            for i in range(len(y)):
                m = np.arange(len(y)) != i
                loo.append((X[i] @ _solve(X[m], y[m], ridge, _free(sel, table.plan)) - y[i]) / tot[i])
            sq = np.square(loo)
            scores.append((float(sq.mean()), float(sq.std() / np.sqrt(len(sq))), len(sel), name))
        if scores:
            mse, se, _, _ = min(scores)
            features = min((k, m, n) for m, _, k, n in scores if m <= mse + se)[2]
        else:
            features = "const"
    if features not in variants:
        from lcpaq.errors import ConfigError

        raise ConfigError(f"unknown correction features {features!r}; use one of auto, {', '.join(variants)}")
    sel = variants[features]
    full = np.zeros(1 + 4 + len(EDGE_PAIRS) * len(table.plan.edges) + 2)
    if not table.whole:
        return full, float("nan"), features
    X, y, tot = _correction_data(table, sel, extra)
    coef = _solve(X, y, RIDGE if features == "edge" else 0.0, _free(sel, table.plan))
    rms = float(np.sqrt(np.mean(((X @ coef - y) / tot) ** 2)))
    full[0] = coef[0]
    for j, k in enumerate(sel):
        full[1 + k] = coef[1 + j]
    return full, rms, features


def fit_block_model(table: BlockTable, candidates: Sequence[BitPair], *, features: str = "auto",
                    pairs: bool = False) -> LatencyModel:
    """LatencyModel that reproduces the measured block tables exactly, split for the search:

    * unary + pairwise: each block's table projected by least squares onto its layers' classes and
      the pairs among its context layers (what an additive search can use),
    * groups: what that projection misses (the block's sub-additive part), per context,
    * constant + pairwise on cross-block edges: the isolation correction fitted on whole models.
    * groups 'pair:a+b' (when the table holds pair rows and ``pairs``): each boundary's joint cost
      (:mod:`lcpaq.profiler.pairs`), before the correction is fitted. Off by default: on
      mobilenet_v2 (session 6) the pairs cost what their two blocks cost (sum of J ~ 0) and the
      held-out error did not improve.
    ``predict`` = projection + residual + pairs + correction = sum of measured blocks + pairs + correction."""
    from lcpaq.profiler.pairs import pair_costs

    joint = pair_costs(table) if pairs else []
    coef, rms, features = fit_correction(table, features=features, extra=joint)
    plan = table.plan
    unary = {n: {tuple(p): 0.0 for p in candidates} for n in plan.layers}
    pairwise: dict[tuple[str, str], dict[tuple[BitPair, BitPair], float]] = {}

    def add_pair(a: str, b: str, diff: float = 0.0, by_class: Mapping[str, float] | None = None) -> None:
        key = (a, b) if plan.layers.index(a) < plan.layers.index(b) else (b, a)
        tab = pairwise.setdefault(key, {})  # type: ignore[arg-type]
        for pa in candidates:
            for pb in candidates:
                ca, cb = precision_class(pa)[0], precision_class(pb)[0]
                v = (diff if ca != cb else 0.0) + (by_class or {}).get(ca + cb, 0.0)
                tab[(tuple(pa), tuple(pb))] = tab.get((tuple(pa), tuple(pb)), 0.0) + v

    groups = []
    for b in plan.blocks:
        obs = {ctx: table.ms[k] for ctx, k in table.keys.get(b, {}).items() if k in table.ms}
        ctxl, mem = plan.context[b], plan.members[b]
        pairs = [(i, j) for i in range(len(ctxl)) for j in range(i + 1, len(ctxl))
                 if ctxl[i] in mem or ctxl[j] in mem]
        ctxs = sorted(obs)
        A = np.array([[1.0] + [float(c[i] == "i") for i in range(len(mem))]
                      + [float(c[i] != c[j]) for i, j in pairs] for c in ctxs]).reshape(len(ctxs), -1)
        y = np.array([obs[c] for c in ctxs])
        w = np.linalg.lstsq(A, y, rcond=None)[0] if len(ctxs) else np.zeros(1 + len(mem) + len(pairs))
        for i, n in enumerate(mem):
            for p in candidates:
                unary[n][tuple(p)] += w[0] / len(mem) + (w[1 + i] if precision_class(p) == "int8" else 0.0)
        for k, (i, j) in enumerate(pairs):
            add_pair(ctxl[i], ctxl[j], diff=float(w[1 + len(mem) + k]))
        resid = {c: float(obs[c] - A[r] @ w) for r, c in enumerate(ctxs)}
        groups.append(GroupCost(b, ctxl, resid))
    groups += joint
    for e, (p, c) in enumerate(plan.edges):
        size = plan.edge_numel.get(p, 0) * 1e-5
        by_class = {k: coef[1 + j] + coef[3 + j] * size for j, k in enumerate(SAME)}
        for j, k in enumerate(EDGE_PAIRS):
            by_class[k] = by_class.get(k, 0.0) + coef[5 + len(EDGE_PAIRS) * e + j]
        add_pair(p, c, by_class=by_class)
    for n in plan.layers:  # the fp32 weight term is per layer: additive, the search sees it
        for p in candidates:
            if precision_class(p) == "fp32":
                unary[n][tuple(p)] += coef[-2] * plan.weight_numel.get(n, 0) * WEIGHT_SCALE
            else:  # the int8-fraction term, one share per int8 layer
                unary[n][tuple(p)] += coef[-1] / len(plan.layers)
    return LatencyModel(unary, pairwise, float(coef[0]), groups=tuple(groups),  # type: ignore[arg-type]
                        meta={"source": "lcpaq.profiler.blocks.fit_block_model", "correction": coef.tolist(),
                              "correction_features": features, "fit_rms_rel": rms,
                              "whole_rows": len(table.whole), "pair_groups": len(joint),
                              **reference_meta(table.whole, table.whole_mode)})


def reference_meta(rows: Sequence[Mapping[str, Any]], whole_mode: str = "warm",
                   bits: BitPair = (8, 8)) -> dict[str, Any]:
    """``{"reference": {"bits", "ms", "whole"}}`` for a model fitted on whole rows timed against a
    uniform ``bits`` reference: the reference's median time when the table was made, and the timing
    mode. :func:`lcpaq.deploy.validate.validate` times the deployed policy against the same
    reference and compares the prediction with ``rel x ms`` (the measurement in the table's time,
    the machine's drift since the table divided out). Empty when no row carries ``ref_ms``."""
    refs = [float(r["ref_ms"]) for r in rows if r.get("ref_ms")]
    if not refs:
        return {}
    return {"reference": {"bits": [int(b) for b in bits], "ms": float(np.median(refs)), "whole": whole_mode}}


def profile_blocks(
    model: Any,
    input_shape: tuple[int, ...],
    candidates: Sequence[BitPair],
    *,
    settings: Any = None,
    calib: Any = None,
    n_whole: int | None = None,
    anchors: int = 3,
    seed: int = 1000,
    pairs: bool = False,
    export: Any = None,
    progress: Any = None,
    flush_bytes: int = 0,
    whole: str = "warm",
) -> tuple[BlockTable, LatencyModel]:
    """Export the designed policies, cut and time every new block unit (per-call overhead removed),
    time ``n_whole`` of those policies (None: all) whole against an interleaved uniform-int8
    reference, and fit. On mobilenet_v2 the correction fitted on all 192 rather than 40 whole rows
    took the test error from 6.3 % / 12.2 % to 3.7 % / 8.9 %; timing them costs ~1 min, the exports
    (needed for the units anyway) dominate. ``pairs``: also cut each boundary's two blocks as one
    unit from the same exports and time them (:mod:`lcpaq.profiler.pairs`). ``anchors``: the
    uniform fp32 and int8 models are also timed whole, ``anchors`` rows each: the designed policies
    are ~50 % mixes, and a correction fitted on them alone extrapolated to the uniform corners by
    +8 % on the embedded model (predicted 0.0795 ms for the W8A8 graph the same run measured at
    0.0737 ms), where a deployed policy often sits. ``export``: see
    :func:`block_plan`; ``progress(done, total)`` after each designed policy. ``flush_bytes``: time
    the units with cold caches (:class:`OrtTimer`; 0 = warm, the default). ``whole``: how the whole
    rows are timed against the reference ("warm" chunks or call-by-call "stream",
    :data:`lcpaq.profiler.backends.ort.WHOLE_MODES`); recorded in the table, and validate measures
    the same way by default.

    >>> # table, lm = profile_blocks(get_model("mobilenet_v2"), (1, 3, 224, 224), [(32, 32), (8, 8)])
    """
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.backends.ort import whole_mode_kwargs
    from lcpaq.profiler.pairs import pair_groupings, record_pairs

    export = export or profiler_export
    chunk = whole_mode_kwargs(whole)
    st = settings or MeasureSettings(warmup=3, number=3, repeat=5)
    x = np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)
    cal = calib if calib is not None else [x]
    plan = block_plan(model, input_shape, calib=cal, export=export)
    pols = design_policies(plan, candidates, np.random.default_rng(seed))
    table = BlockTable(plan, whole_mode=whole)
    timer = OrtTimer(st, x, flush_bytes=flush_bytes)
    n = len(pols) if n_whole is None else min(n_whole, len(pols))
    whole_idx = set(np.linspace(0, len(pols) - 1, n).round().astype(int).tolist())
    ref = export(model, Policy.uniform(plan.layers, 8, 8), input_shape, cal)
    for i, pol in enumerate(pols):
        b = export(model, pol, input_shape, cal)
        for u in table.add(cut_groups(b, model, pol, plan.groups), pol):
            table.ms[u.key] = timer.unit(u)
        for grouping in pair_groupings(plan) if pairs else []:
            for u in record_pairs(table, cut_groups(b, model, pol, grouping), pol):
                table.ms[u.key] = timer.unit(u)
        if i in whole_idx:
            table.whole.append(timer.whole_row(pol, b, ref, **chunk))
        if progress:
            progress(i + 1, len(pols))
    fp = next((tuple(c) for c in candidates if precision_class(c) == "fp32"), (32, 32))
    uniform = [(Policy.uniform(plan.layers, *fp), None), (Policy.uniform(plan.layers, 8, 8), ref)]
    uniform = [(p, b if b is not None else export(model, p, input_shape, cal)) for p, b in uniform]
    for _ in range(anchors if table.whole else 0):
        for pol, b in uniform:
            table.whole.append(timer.whole_row(pol, b, ref, **chunk))
    return table, fit_block_model(table, candidates)


def process_cpu_ms(onnx_bytes: bytes, feeds: Mapping[str, np.ndarray], settings: Any, stat: str = "median") -> float:
    """CPU time of the whole process per call (every ORT worker summed), with the intra-op
    pool's spin-waiting off (``session.intra_op.allow_spinning=0``): at >1 thread a spinning worker
    burns CPU while it waits, and wall time counts every stall of a shared VM. Summed CPU time counts
    the work each thread did, whoever else ran on the cores. ``stat``: median or min of the samples."""
    import time

    return _time_session(onnx_bytes, feeds, settings, time.process_time_ns, stat, spin=False)


def _time_session(onnx_bytes: bytes, feeds: Mapping[str, np.ndarray], settings: Any, clock: Any, stat: str,
                  *, spin: bool = True, before: Any = None) -> float:
    """``before``: called before every timed call, outside the timed region (each call then has its
    own clock reads)."""
    from lcpaq.profiler.backends.ort import session

    sess = session(onnx_bytes, settings.threads, spin=spin)
    run, fd = sess.run, dict(feeds)
    for _ in range(settings.warmup):
        run(None, fd)
    out = []
    for _ in range(settings.repeat):
        if before is None:
            c0 = clock()
            for _ in range(settings.number):
                run(None, fd)
            out.append((clock() - c0) / 1e6 / settings.number)
            continue
        total = 0
        for _ in range(settings.number):
            before()
            c0 = clock()
            run(None, fd)
            total += clock() - c0
        out.append(total / 1e6 / settings.number)
    return float(np.min(out) if stat == "min" else np.median(out))


class OrtTimer:
    """Times block units (minus the empty-graph overhead) and whole models against a reference."""

    def __init__(self, settings: Any, x: np.ndarray, stat: str = "median", *, flush_bytes: int = 0) -> None:
        """``stat``: "median" of the samples (OrtBackend's figure) or "min": the least disturbed
        sample, for a VM whose other tenants inflate CPU time through cache pollution.
        ``flush_bytes``: cold-cache units. Before each timed call of a block unit (and of the
        empty-graph overhead), outside the timed region, read through a buffer of this many bytes,
        so the unit's weights are evicted as the rest of the whole model evicts them; a unit timed
        alone in a loop keeps them hot. The read also evicts ORT's own call path (binding, session
        run), which the whole model pays once, not per unit: an empty graph is run after it, still
        outside the timed region, to warm that path again (64 MB on the test net: the subtracted
        overhead 52 us -> 12 us, warm 4 us). Whole-model rows are always timed warm. 0: off."""
        from lcpaq.errors import ConfigError
        from lcpaq.profiler.backends.ort import OrtBackend, session
        from lcpaq.profiler.units import overhead_unit

        if isinstance(flush_bytes, bool) or not isinstance(flush_bytes, (int, np.integer)) or flush_bytes < 0:
            raise ConfigError(f"OrtTimer: flush_bytes must be an int >= 0 (0 = warm caches), got {flush_bytes!r}")
        self.st, self.x, self.be, self.stat = settings, x, OrtBackend(), stat
        self.flush_bytes = int(flush_bytes)
        self._ref_key: tuple[bytes, bool] | None = None  # whole_row's reference session, made once
        self._buf = np.ones(max(self.flush_bytes // 8, 1), np.float64) if self.flush_bytes else None
        if self._buf is not None:
            empty, self._empty_feeds = overhead_unit()
            self._empty = session(empty, settings.threads)
        self.overhead_ms = self.time(*overhead_unit(), cold=True)

    def _flush(self) -> None:
        self._sink = float(self._buf.sum())  # streams every line of the buffer through the caches
        self._empty.run(None, self._empty_feeds)  # ORT's call path warm again, as in the whole model

    def time(self, onnx_bytes: bytes, feeds: Mapping[str, np.ndarray], *, cold: bool = False) -> float:
        """Per-call time of a graph; ``cold``: flush ``flush_bytes`` before each timed call."""
        import time

        from lcpaq.errors import BackendUnavailableError
        from lcpaq.profiler.backend import Unit

        before = self._flush if cold and self._buf is not None else None
        if self.st.metric == "process_cpu":
            return _time_session(onnx_bytes, feeds, self.st, time.process_time_ns, self.stat, spin=False,
                                 before=before)
        if self.stat == "min" or before is not None:
            clock = time.thread_time_ns if self.st.metric == "thread_cpu" else time.perf_counter_ns
            return _time_session(onnx_bytes, feeds, self.st, clock, self.stat, before=before)
        m = self.be.measure(Unit("b", onnx_bytes, feeds), self.st)
        if m.error:
            raise BackendUnavailableError(f"ORT failed: {m.error}")
        return m.median_ms

    def unit(self, u: Any) -> float:
        return self.time(u.onnx, u.feeds, cold=True) - self.overhead_ms

    def whole_row(self, pol: Policy, b: bytes, ref: bytes, *, rounds: int | None = None, calls: int | None = None,
                  settle: int = 1) -> dict[str, Any]:
        """A whole model timed against the reference, interleaved in short chunks
        (:func:`lcpaq.profiler.backends.ort.time_interleaved`: both see the same interference, so
        their ratio ``rel`` holds where either time alone does not; whole measurements seconds
        apart left 9.8 % between repeats of a mobilenet_v2 row at load 2). One reference session
        per timer. Returns the policy, ``ms``, ``ref_ms`` and ``rel``."""
        import onnx

        from lcpaq.profiler.backends.ort import session, time_interleaved

        st = self.st
        spin = st.metric != "process_cpu"
        if self._ref_key != (ref, spin):
            self._ref_key = (ref, spin)
            sess = session(ref, st.threads, spin=spin)
            feed = {onnx.load_from_string(ref).graph.input[0].name: self.x}
            self._ref_call = lambda: sess.run(None, feed)
        pol_sess = session(b, st.threads, spin=spin)
        pol_feed = {onnx.load_from_string(b).graph.input[0].name: self.x}
        t = time_interleaved(self._ref_call, lambda: pol_sess.run(None, pol_feed), st, rounds=rounds, calls=calls,
                             settle=settle, stat=self.stat)
        return {"policy": {n: list(v) for n, v in pol.items()}, "ms": t["ms"], "ref_ms": t["ref_ms"], "rel": t["rel"]}


__all__ = ["BLOCK_SCHEMA", "reference_meta", "correction_features", "drift_free_ms", "smooth_drift", "block_groups", "BlockPlan", "block_plan", "design_policies", "BlockTable", "edge_features",
           "fit_correction", "fit_block_model", "profile_blocks", "profiler_export", "OrtTimer", "process_cpu_ms"]
