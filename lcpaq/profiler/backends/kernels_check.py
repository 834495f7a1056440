"""Whole-model latency prediction on lcpaq's kernels from *segment units*, and its check.

The per-layer units of :mod:`lcpaq.profiler.backends.kernels` time one layer alone, on random
inputs, with its BN/ReLU/add rebuilt by hand; summed, they missed the converted model by ~60 %
(notes/deploy.md). A *segment* here is cut from the converted model itself (the torch.fx graph of
:func:`lcpaq.kernels.convert`'s output): a quantizable layer's module call and every node after it
up to the next quantizable layer (its activation quantize, the kernel and epilogue live in the call;
the unfolded BN, ReLU, the residual add and pooling follow it). Its cost depends on the layer's own
bits and, through fusion, on the class of its *partners*: the layers at the other end of a uint8
edge that convert() fuses when both are integer (conv -> [BN] -> ReLU -> next int layer: the
producer's epilogue requantizes, the consumer skips its quantize pass). A segment's key is
``layer|bits|partner classes``. Segments are timed one after another inside runs of the whole
converted model (thread CPU time between consecutive segment ends, one clock read subtracted), so
each carries the cache and allocator state the whole model gives it.

* :func:`~lcpaq.kernels.segments.segment_plan`, :class:`~lcpaq.kernels.segments.SegmentRunner`
  (in :mod:`lcpaq.kernels.segments`, re-exported here): the keys, the converted model as compiled
  segments; :func:`time_segments` times them in sequence.
* :func:`design_segment_policies`: policies covering every key.
* :func:`profile_segments`: one call: time every designed policy's segments and its whole model
  (A B A B against a uniform W8A8 reference), fit :func:`fit_segment_model`: an additive
  :class:`~lcpaq.latency.LatencyModel` (unary + pairwise on the fusable edges + a correction for
  what the module structure adds), so the ILP sees all of it.
* :func:`check_policies`: measured vs predicted end to end for given policies (the benchmark).

>>> # table, lm = profile_segments(get_model("mnist_resnet"), (1, 1, 28, 28), [(4, 8), (8, 8), (32, 32)])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.kernels.segments import (
    SegmentPlan,
    SegmentRunner,
    fuse_class,
    quantized_copy,
    segment_key,
    segment_plan,
)
from lcpaq.profiler.backend import MeasureSettings
from lcpaq.profiler.backends.ort import time_interleaved
from lcpaq.profiler.blocks import drift_free_ms, smooth_drift

__all__ = [
    "SEGMENT_SCHEMA", "Deployed", "SegmentPlan", "SegmentRunner", "SegmentTable", "check_policies",
    "deploy_policy", "design_segment_policies", "fit_segment_model", "fuse_class", "profile_segments",
    "quantized_copy", "random_policies", "segment_key", "segment_plan", "summarize", "time_segments",
    "time_whole",
]

SEGMENT_SCHEMA = "lcpaq.kernel_segments/1"


def _pair(c: Sequence[int]) -> tuple[int, int]:
    return int(c[0]), int(c[1])


def clock_overhead_ns(clock: Callable[[], int], n: int = 2000) -> float:
    """Median ticks between two consecutive clock reads (what each segment's interval includes once)."""
    import statistics

    ts = [clock() for _ in range(n)]
    return float(statistics.median(b - a for a, b in zip(ts, ts[1:], strict=False)))


def _minor_faults() -> int:
    """Minor page faults of the calling thread so far (0 where the OS does not count them per thread)."""
    import resource

    who = getattr(resource, "RUSAGE_THREAD", None)
    return int(resource.getrusage(who).ru_minflt) if who is not None else 0


def _interleaved(ref: Callable[[], Any], pol: Callable[[], Any], settings: MeasureSettings, **kw: Any
                 ) -> dict[str, float]:
    """:func:`time_interleaved` plus ``faults_per_call``: the thread's minor page faults over all its
    calls (reference and policy), per call. A fresh output page costs a fault in the timed thread's
    CPU time; how many there are depends on what the allocator gave back before (benchmarks/
    bench_kernels.py, steady_malloc)."""
    f0 = _minor_faults()
    t = time_interleaved(ref, pol, settings, **kw)
    rounds = kw.get("rounds") or 3 * settings.repeat
    calls = 2 * (settings.warmup + rounds * (kw.get("settle", 1) + max(settings.number, 1)))
    return {**t, "faults_per_call": (_minor_faults() - f0) / calls}


def time_segments(runner: SegmentRunner, settings: MeasureSettings) -> dict[str, float]:
    """Median ms of every segment over ``settings.repeat * settings.number`` runs of the whole
    sequence (after ``settings.warmup``), one clock read subtracted; segments of the same name
    (a layer called twice) are summed per run."""
    import statistics

    import torch

    clock = time.thread_time_ns if settings.metric == "thread_cpu" and settings.threads == 1 else time.perf_counter_ns
    with torch.inference_mode():
        for _ in range(settings.warmup):
            runner()
        ov = clock_overhead_ns(clock)
        runs = [runner.timed(clock) for _ in range(settings.repeat * settings.number)]
    out: dict[str, float] = {}
    for i, name in enumerate(runner.names):
        out[name] = out.get(name, 0.0) + statistics.median(r[i] for r in runs) - ov
    return {k: v / 1e6 for k, v in out.items()}


def design_segment_policies(plan: SegmentPlan, candidates: Sequence[tuple[int, int]], rng: Any, *,
                            cover: int = 1) -> list[Any]:
    """Policies in which every layer appears at every candidate with every class of its partners,
    each key in at least ``cover`` policies (greedy: each policy takes as many keys still needed as
    agree with it; the rest is random with a per-policy fp32 share drawn from [0, 1])."""
    from itertools import product

    from lcpaq.policy import Policy

    cands = [_pair(c) for c in candidates]
    by_class: dict[str, list[tuple[int, int]]] = {}
    for c in cands:
        by_class.setdefault(fuse_class(c), []).append(c)
    ints = [c for c in cands if fuse_class(c) != "f"] or cands
    fp = by_class.get("f", [])
    todo = {}
    left: dict[str, int] = {}
    for n in plan.layers:
        for c in cands:
            for ctx in product(sorted(by_class), repeat=len(plan.context(n, c))):
                todo[segment_key(n, c, "".join(ctx))] = (n, c, ctx)
                left[segment_key(n, c, "".join(ctx))] = max(int(cover), 1)
    out = []
    while todo:
        q = rng.random()
        fixed: dict[str, tuple[int, int]] = {}
        items = list(todo.values())
        for k in rng.permutation(len(items)):
            n, c, ctx = items[int(k)]
            if n in fixed and fixed[n] != c:
                continue
            need = list(zip(plan.context(n, c), ctx, strict=True))
            if any(p in fixed and fuse_class(fixed[p]) != cl for p, cl in need):
                continue
            fixed[n] = c
            for p, cl in need:
                if p not in fixed:
                    fixed[p] = by_class[cl][int(rng.integers(len(by_class[cl])))]
        pol = Policy({n: fixed.get(n) or (fp[0] if fp and rng.random() < q else ints[int(rng.integers(len(ints)))])
                      for n in plan.layers})
        out.append(pol)
        for n in plan.layers:
            k = plan.key(pol, n)
            if k in left:
                left[k] -= 1
                if left[k] <= 0:
                    del left[k], todo[k]
    return out


@dataclass
class SegmentTable:
    """Profiled policies of one model: per policy its segments' ms, its whole-model ms and the
    uniform-W8A8 reference's ms measured next to it (drift), plus the header (``meta``)."""

    plan: SegmentPlan
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def drift(self) -> np.ndarray:
        return smooth_drift([r["ref_ms"] for r in self.rows])

    def samples(self) -> dict[str, list[float]]:
        """Segment key -> drift-free ms, one per profiled policy that shows it."""
        from lcpaq.policy import Policy

        out: dict[str, list[float]] = {}
        for r, d in zip(self.rows, self.drift(), strict=True):
            pol = Policy({n: tuple(p) for n, p in r["policy"].items()})
            for n in self.plan.layers:
                out.setdefault(self.plan.key(pol, n), []).append(r["segments"][n] / d)
        return out

    def unit_ms(self) -> dict[str, float]:
        return {k: float(np.median(v)) for k, v in self.samples().items()}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SEGMENT_SCHEMA, "meta": self.meta, "plan": self.plan.to_dict(), "rows": self.rows}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SegmentTable:
        from lcpaq.errors import TableError

        if d.get("schema") != SEGMENT_SCHEMA:
            raise TableError(f"segment table schema is {d.get('schema')!r}, expected {SEGMENT_SCHEMA!r}")
        return SegmentTable(SegmentPlan.from_dict(d["plan"]), list(d["rows"]), dict(d.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        from lcpaq.policy import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @staticmethod
    def load(path: str | Path) -> SegmentTable:
        return SegmentTable.from_dict(json.loads(Path(path).read_text()))


CORRECTIONS = ("const", "trans", "scale", "split")



def _projection(table: SegmentTable, candidates: Sequence[tuple[int, int]]
                ) -> tuple[dict[str, dict[tuple[int, int], float]], dict[tuple[str, str], dict[Any, float]]]:
    """Additive form of the unit table: per (layer, bits) a base cost (all context layers float) plus
    one pairwise term per context layer (fusion partner or previous layer) and its class, least
    squares over the keys seen (exact with one context layer). Missing keys raise."""
    from lcpaq.errors import MissingLatencyError

    ms = table.unit_ms()
    plan = table.plan
    classes = sorted({fuse_class(c) for c in candidates} - {"f"})
    unary: dict[str, dict[tuple[int, int], float]] = {n: {} for n in plan.layers}
    pairwise: dict[tuple[str, str], dict[Any, float]] = {e: {} for e in plan.edges()}
    pos = {n: i for i, n in enumerate(plan.layers)}
    missing = []
    for n in plan.layers:
        for c in candidates:
            c = _pair(c)
            parts = plan.context(n, c)
            if not parts:
                k = segment_key(n, c, "")
                if k not in ms:
                    missing.append(k)
                unary[n][c] = ms.get(k, 0.0)
                continue
            prefix = segment_key(n, c, "*")[:-1]
            obs = {k[len(prefix):]: v for k, v in ms.items() if k.startswith(prefix)}
            if not obs:
                missing.append(segment_key(n, c, "*"))
                continue
            cols = [(j, cl) for j in range(len(parts)) for cl in classes]
            ctxs = sorted(obs)
            A = np.array([[1.0] + [float(ctx[j] == cl) for j, cl in cols] for ctx in ctxs])
            w = np.linalg.lstsq(A, np.array([obs[x] for x in ctxs]), rcond=None)[0]
            unary[n][c] = float(w[0])
            for (j, cl), v in zip(cols, w[1:], strict=True):
                p = parts[j]
                edge = (n, p) if pos[n] < pos[p] else (p, n)
                for pc in candidates:
                    pc = _pair(pc)
                    if fuse_class(pc) == cl:
                        pair = (c, pc) if edge[0] == n else (pc, c)
                        tab = pairwise.setdefault(edge, {})
                        tab[pair] = tab.get(pair, 0.0) + float(v)
    if missing:
        raise MissingLatencyError(
            f"segment table lacks {len(missing)} key(s), e.g. {', '.join(missing[:3])}; profile the model's "
            "designed policies at these candidates (lcpaq.profiler.backends.kernels_check.profile_segments)")
    return unary, pairwise


def _additive(unary: Mapping[str, Mapping[Any, float]], pairwise: Mapping[Any, Mapping[Any, float]],
              policy: Any) -> tuple[float, float]:
    """(fp32 layers' share, integer layers' share) of the additive prediction of ``policy``."""
    f = i = 0.0
    for n, tab in unary.items():
        v = tab[tuple(policy[n])]
        f, i = (f + v, i) if 32 in tuple(policy[n]) else (f, i + v)
    for (p, c), tab in pairwise.items():
        i += tab.get((tuple(policy[p]), tuple(policy[c])), 0.0)  # fused edges: both ends integer
    return f, i


_OFFSET = ("const", "trans")  # corrections fitted on whole - sum of segments (the units' scale fixed)


def _design(rows: Sequence[tuple[float, float]], trans: Sequence[int], variant: str) -> np.ndarray:
    sf, si = (np.array(v, float) for v in zip(*rows, strict=True))
    one = np.ones_like(sf)
    return {"const": np.c_[one], "trans": np.c_[one, np.asarray(trans, float)], "scale": np.c_[one, sf + si],
            "split": np.c_[one, sf, si]}[variant]


def _with_transitions(pairwise: Mapping[tuple[str, str], Mapping[Any, float]], plan: SegmentPlan,
                      candidates: Sequence[tuple[int, int]], tau: float) -> dict[tuple[str, str], dict[Any, float]]:
    """``pairwise`` plus ``tau`` on every pair of consecutive layers (run order) of which exactly one
    is float, merged into an existing term of the same two layers (either orientation)."""
    out = {e: dict(t) for e, t in pairwise.items()}
    cands = [_pair(c) for c in candidates]
    for a, b in plan.sequence():
        flip = (b, a) in out and (a, b) not in out
        tab = out.setdefault((b, a) if flip else (a, b), {})
        for ca in cands:
            for cb in cands:
                if (fuse_class(ca) == "f") != (fuse_class(cb) == "f"):
                    k = (cb, ca) if flip else (ca, cb)
                    tab[k] = tab.get(k, 0.0) + tau
    return out


def fit_segment_model(table: SegmentTable, candidates: Sequence[tuple[int, int]], *,
                      correction: str = "trans") -> Any:
    """LatencyModel = correction applied to the additive unit table.

    What the whole converted model runs beyond its segments (the model's and each block's module
    call, Python between them) is fitted on the whole rows: ``const`` (whole = c0 + sum of
    segments), ``trans`` (c0 + sum + tau * the number of float/integer switches between consecutive
    layers in run order, :meth:`SegmentPlan.transitions`), ``scale`` (c0 + b * sum) or ``split``
    (c0 + b_fp32 * fp32 part + b_int * int part); ``auto`` picks the smallest leave-one-out relative
    error. ``trans`` is the default (session 8): a unit is the median of the profiled policies that
    show its key, most of them mixed; in a run without switches (uniform W8A8) the integer segments
    ran ~8 % below their units, so ``const`` fitted on uniform and mixed rows alike under-predicted
    the mixed test policies of resnet18 by ~2 % (signed median). tau goes on the consecutive pairs
    as pairwise terms. Slopes (``scale``/``split``) did worse held out on rows as noisy as this
    VM's (session 7). Every term is per layer or per edge, so the search sees the whole model.
    ``none``: the sum of the segments alone (c0 = 0, b = 1)."""
    from lcpaq.errors import ConfigError
    from lcpaq.latency import LatencyModel
    from lcpaq.policy import Policy

    if correction not in ("auto", "none", *CORRECTIONS):
        raise ConfigError(f"unknown correction {correction!r}; use auto, none or one of {', '.join(CORRECTIONS)}")
    unary, pairwise = _projection(table, candidates)
    pols = [Policy({n: tuple(p) for n, p in r["policy"].items()}) for r in table.rows]
    parts = [_additive(unary, pairwise, p) for p in pols]
    trans = [table.plan.transitions(p) for p in pols]
    y = drift_free_ms(table.rows, "whole_ms")
    s = np.array([a + b for a, b in parts])

    loo: dict[str, float] = {}
    for var in CORRECTIONS:
        X = _design(parts, trans, var)
        if len(y) <= X.shape[1] + 1:
            continue
        errs = []
        for i in range(len(y)):
            m = np.arange(len(y)) != i
            coef = _fit(X[m], y[m], s[m], var)
            errs.append((_apply(X[i:i + 1], s[i:i + 1], coef, var)[0] - y[i]) / y[i])
        loo[var] = float(np.sqrt(np.mean(np.square(errs))))
    var = correction if correction != "auto" else (min(loo, key=loo.__getitem__) if loo else "const")
    X = _design(parts, trans, "const" if var == "none" else var)
    coef = _fit(X, y, s, var) if len(y) and var != "none" else np.zeros(1)
    bf = bi = 1.0
    if len(y) and var == "scale":
        bf = bi = float(coef[1])
    elif len(y) and var == "split":
        bf, bi = float(coef[1]), float(coef[2])
    un = {n: {p: v * (bf if 32 in p else bi) for p, v in tab.items()} for n, tab in unary.items()}
    pw = {e: {k: v * bi for k, v in tab.items()} for e, tab in pairwise.items()}
    if len(y) and var == "trans":
        pw = _with_transitions(pw, table.plan, candidates, float(coef[1]))
    fit_rms = float(np.sqrt(np.mean(np.square((_apply(X, s, coef, var if var != "none" else "const") - y) / y)))) \
        if len(y) else float("nan")
    return LatencyModel(un, pw, float(coef[0]), meta={
        "source": "lcpaq.profiler.backends.kernels_check.fit_segment_model", "correction": var,
        "coef": [float(v) for v in coef], "loo_rel_rms": loo, "fit_rel_rms": fit_rms, "rows": len(y),
        "units": len(table.unit_ms())})


def _fit(X: np.ndarray, y: np.ndarray, s: np.ndarray, var: str) -> np.ndarray:
    if var == "const":
        return np.array([float(np.mean(y - s))])
    return np.linalg.lstsq(X, y - s if var in _OFFSET else y, rcond=None)[0]


def _apply(X: np.ndarray, s: np.ndarray, coef: np.ndarray, var: str) -> np.ndarray:
    return s + X @ coef if var in _OFFSET else X @ coef


@dataclass
class Deployed:
    """A policy converted to the kernels as validate deploys it: ``call`` is the timed inference."""

    model: Any
    call: Callable[[], Any]
    runner: SegmentRunner


def deploy_policy(model: Any, policy: Any, input_shape: Sequence[int], calib: Sequence[Any],
                  layers: Sequence[str], *, channels_last: bool = True) -> Deployed:
    """apply_policy (calibrated copy) -> convert, called on the fixed channels_last input that
    :func:`lcpaq.deploy.runtime.deploy` uses ('lcpaq-kernels': rng(0) normal, batch 1).
    ``channels_last=False``: float convs in their input's layout (convert before session 7)."""
    import torch

    from lcpaq.kernels import convert

    x1 = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    xt = torch.from_numpy(x1).contiguous(memory_format=torch.channels_last)
    m = convert(quantized_copy(model, policy, calib), inplace=True, channels_last=channels_last).eval()

    def call() -> Any:
        with torch.inference_mode():
            return m(xt)

    return Deployed(m, call, SegmentRunner(m, layers, xt))


def time_whole(fns: Sequence[Callable[[], Any]], settings: MeasureSettings, rounds: int = 2
               ) -> list[tuple[float, float]]:
    """Interleaved (A B A B ...) whole-model times: per callable (fastest round's median primary ms,
    that round's median wall ms)."""
    from lcpaq.profiler.backends.ort import time_callable

    per: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            cpu, wall = time_callable(f, settings)
            prim = cpu if settings.metric == "thread_cpu" and settings.threads == 1 else wall
            per[i].append((float(np.median(prim)), float(np.median(wall))))
    return [min(p) for p in per]


def profile_segments(
    model: Any,
    input_shape: Sequence[int],
    candidates: Sequence[tuple[int, int]],
    *,
    settings: MeasureSettings | None = None,
    calib: Sequence[Any] | None = None,
    extra: int = 12,
    cover: int = 3,
    seed: int = 1000,
    correction: str = "trans",
    channels_last: bool = True,
    settle: int = 2,
    reference: Deployed | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[SegmentTable, Any]:
    """Time the segments of the designed policies (every key) plus ``extra`` random policies and the
    uniform corners (one per candidate), each also whole, A B A B against uniform W8A8; fit.
    ``cover``: every key in at least that many designed policies (its unit is their median; with 1,
    a key seen once carried that one reading's noise: resnet18 one policy 5-7 % off in 3 of 4 runs,
    with 3 all 20 within 4.7 %).

    1 thread, the calling thread's CPU time by default (``settings``: the profile's). ``calib``:
    arrays or tensors for the activation ranges (random normal when None: kernel times do not
    depend on the values). ``channels_last``: passed to :func:`lcpaq.kernels.convert`. ``settle``:
    untimed calls after each switch between the policy and the reference in the whole rows
    (:func:`lcpaq.profiler.backends.ort.time_interleaved`): 2, because a converted resnet18 call
    timed after one untimed call following the other model still ran ~2 % above its loop time
    (session 8: resnet18 2.0 % / 3.2 % median / max with 2, 2.5 % / 4.8 % with 1, one run each).
    ``reference``: the uniform-W8A8 deployment to time against (deployed here when None); the
    benchmark passes the same one to :func:`check_policies`, so profile and test rows share it."""
    import torch

    from lcpaq.policy import Policy
    from lcpaq.profiler.backends.kernels import kernel_isa

    st = settings or MeasureSettings(warmup=3, number=5, repeat=15)
    shape = tuple(int(v) for v in input_shape)
    cal = list(calib) if calib is not None else [
        np.random.default_rng(1).standard_normal((4, *shape[1:])).astype(np.float32)]
    rng = np.random.default_rng(seed)
    cands = [_pair(c) for c in candidates]
    old = torch.get_num_threads()
    torch.set_num_threads(st.threads)
    try:
        plan = segment_plan(model, cal)
        pols = design_segment_policies(plan, cands, rng, cover=cover)
        n_design = len(pols)
        ints = [c for c in cands if fuse_class(c) != "f"]
        for _ in range(extra):
            q = rng.random()
            pols.append(Policy({n: (32, 32) if rng.random() < q or not ints else ints[int(rng.integers(len(ints)))]
                                for n in plan.layers}))
        pols += [Policy.uniform(plan.layers, *c) for c in cands]
        ref = reference or deploy_policy(model, Policy.uniform(plan.layers, 8, 8), shape, cal, plan.layers,
                                         channels_last=channels_last)
        table = SegmentTable(plan, meta={
            "model": type(model).__name__, "input_shape": list(shape), "candidates": [list(c) for c in cands],
            "settings": dict(st.__dict__), "torch": torch.__version__, "isa": kernel_isa(),
            "designed": n_design, "extra": extra, "cover": cover, "channels_last": channels_last,
            "settle": settle, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for i, pol in enumerate(pols):
            dep = deploy_policy(model, pol, shape, cal, plan.layers, channels_last=channels_last)
            segs = time_segments(dep.runner, st)
            t = _interleaved(ref.call, dep.call, st, settle=settle)
            table.rows.append({"policy": {n: list(p) for n, p in pol.items()}, "whole_ms": t["ms"],
                               "wall_ms": t["wall_ms"], "ref_ms": t["ref_ms"], "rel": t["rel"],
                               "faults_per_call": t["faults_per_call"],
                               "segments": {n: segs.get(n, 0.0) for n in plan.layers},
                               "pre_ms": segs.get("(pre)", 0.0), "designed": i < n_design})
            if progress:
                progress(i + 1, len(pols))
    finally:
        torch.set_num_threads(old)
    return table, fit_segment_model(table, cands, correction=correction)


def random_policies(layers: Sequence[str], candidates: Sequence[tuple[int, int]], n: int, *,
                    p_fp32: float = 0.5, first_seed: int = 0) -> list[Any]:
    """Test policies (the ORT benchmark's draw): seed k, each layer fp32 with probability ``p_fp32``,
    else one of the integer candidates at random."""
    from lcpaq.policy import Policy

    ints = [_pair(c) for c in candidates if 32 not in tuple(c)]
    out = []
    for s in range(first_seed, first_seed + n):
        rng = np.random.default_rng(s)
        out.append(Policy({n_: (32, 32) if rng.random() < p_fp32 else ints[int(rng.integers(len(ints)))]
                           for n_ in layers}))
    return out


def check_policies(model: Any, input_shape: Sequence[int], policies: Sequence[Any], predict: Callable[[Any], float],
                   *, settings: MeasureSettings, ref_ms: float, rounds: int = 3, channels_last: bool = True,
                   calib: Sequence[Any] | None = None, settle: int = 2, reference: Deployed | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Measure each policy converted end to end, interleaved with uniform W8A8 in short chunks
    (:func:`lcpaq.profiler.backends.ort.time_interleaved`, ``rounds * repeat`` rounds), and compare
    with ``predict(policy)``. ``ref_ms``: the reference's time when the table was made.
    ``error_pct`` compares with the measured ratio to the reference times ``ref_ms`` (the machine's
    drift since the table, exact to the moment); ``error_drift_pct`` rescales the prediction by the
    running median of 7 neighbouring policies' reference readings instead (session 7's first runs),
    ``error_row_pct`` by the policy's own reference reading, ``error_raw_pct`` not at all.
    ``settle``: untimed calls after each switch (as the profile's whole rows); ``reference``: the
    uniform-W8A8 deployment (the profile's, to share its instance; deployed here when None).
    1 thread: thread CPU time (wall beside)."""
    import torch

    from lcpaq.policy import Policy
    from lcpaq.quant import quantizable_names

    shape = tuple(int(v) for v in input_shape)
    cal = list(calib) if calib is not None else [
        np.random.default_rng(1).standard_normal((4, *shape[1:])).astype(np.float32)]
    layers = quantizable_names(model)
    old = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    rows: list[dict[str, Any]] = []
    try:
        ref = reference or deploy_policy(model, Policy.uniform(layers, 8, 8), shape, cal, layers,
                                         channels_last=channels_last)
        for i, pol in enumerate(policies):
            dep = deploy_policy(model, pol, shape, cal, layers, channels_last=channels_last)
            t = _interleaved(ref.call, dep.call, settings, rounds=rounds * settings.repeat, settle=settle)
            ms, wall, ref_now = t["ms"], t["wall_ms"], t["ref_ms"]
            pred, norm = float(predict(pol)), t["rel"] * ref_ms  # measured, at the table's reference time
            rows.append({"policy": {n: list(p) for n, p in pol.items()}, "predicted_ms": pred, "measured_ms": ms,
                         "measured_wall_ms": wall, "ref_ms": ref_now, "rel": t["rel"],
                         "faults_per_call": t["faults_per_call"],
                         "error_pct": (pred - norm) / norm * 100.0, "error_raw_pct": (pred - ms) / ms * 100.0,
                         "error_row_pct": (pred * ref_now / ref_ms - ms) / ms * 100.0,
                         "fp32_layers": sum(32 in tuple(p) for _, p in pol.items())})
            if progress:
                progress(i + 1, len(policies))
    finally:
        torch.set_num_threads(old)
    refs = [r["ref_ms"] for r in rows]
    for i, r in enumerate(rows):
        r["drift"] = float(np.median(refs[max(0, i - 3):i + 4])) / ref_ms
        r["error_drift_pct"] = (r["predicted_ms"] * r["drift"] - r["measured_ms"]) / r["measured_ms"] * 100.0
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], key: str = "error_pct") -> dict[str, float]:
    """Median and max absolute % error, and how many policies are within +-5 %."""
    e = np.abs([r[key] for r in rows])
    return {"median_abs_pct": float(np.median(e)), "max_abs_pct": float(e.max()), "within_5": int((e <= 5).sum()),
            "n": len(e), "median_signed_pct": float(np.median([r[key] for r in rows]))}
