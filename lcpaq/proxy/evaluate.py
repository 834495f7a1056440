"""Cheap policy scores on the proxy subset: PTQ (calibration only), then one forward pass.

Three scores, all "higher is better", chosen with ``metric``:

* ``"margin"`` (SEAM-style large-margin criterion) on the penultimate features f_i (the input of
  the last Linear) of the quantized model. With class centroids mu_c, the global mean mu and the
  RMS spread s = sqrt(mean_i ||f_i - mu||^2)::

      margin = mean_i [ min_{c != y_i} ||f_i - mu_c||  -  ||f_i - mu_{y_i}|| ] / s

  The first term is inter-class separation (distance to the nearest wrong centroid), the second
  intra-class compactness; dividing by s makes it invariant to the feature scale, which
  quantization changes.
* ``"kl"``: minus the mean KL(p_fp32 || p_quant) of the softmax outputs (fidelity to fp32).
* ``"acc"``: top-1 accuracy (%) on the proxy samples.

>>> # ev = ProxyEvaluator(get_model("mnist_resnet"), *proxy_subset(ds, fraction=0.04).tensors())
>>> # ev.evaluate(policy).margin
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lcpaq.errors import ConfigError
from lcpaq.policy import FLOAT_BITS as FP32_BITS
from lcpaq.policy import Policy
from lcpaq.proxy.ranges import Observed, refit_weight
from lcpaq.quant.quantizers import act_range, qparams_from_range

PROXY_METRICS = ("margin", "kl", "acc")
PROXY_WEIGHTS = ("maxabs", "refit")


def margin_score(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Scale-free class margin of ``features`` [N, D] (see module doc); needs >= 2 classes.

    >>> f = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> margin_score(f, torch.tensor([0, 0, 1, 1])) > 1.0
    True
    """
    return float(_margins(features.unsqueeze(0), *_label_masks(labels))[0])


def _label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the margin needs of the labels alone: own-class mask [N, C], its index [N, 1] and the
    centroid weights [C, N] (one-hot over class counts)."""
    classes = torch.unique(labels)
    if len(classes) < 2:
        raise ConfigError("margin score needs samples of at least two classes in the proxy data")
    own = labels.unsqueeze(1) == classes.unsqueeze(0)  # [N, C]
    hot = own.double()
    return own, own.int().argmax(1, keepdim=True), hot.T / hot.sum(0).unsqueeze(1)


def _margins(features: torch.Tensor, own: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The margin of each of P feature sets [P, N, D] (in float64), the centroids by one matmul."""
    f = features.detach().double().flatten(2)
    d = torch.cdist(f, w @ f)  # [P, N, C] distances to the class centroids
    d_in = d.gather(2, idx.expand(len(f), -1, -1)).squeeze(2)
    d_out = d.masked_fill(own, float("inf")).amin(2)
    spread = (f - f.mean(1, keepdim=True)).pow(2).sum(2).mean(1).sqrt().clamp_min(1e-12)
    return ((d_out - d_in) / spread.unsqueeze(1)).mean(1)


def _last_linear_name(layers: dict[str, nn.Module]) -> str | None:
    """Name of the last Linear among the quantizable layers (its input = the features)."""
    return next((n for n, m in reversed(layers.items()) if isinstance(m, nn.Linear)), None)


@dataclass(frozen=True)
class ProxyScore:
    margin: float
    kl: float  # minus the mean KL to fp32 (higher = closer)
    acc: float
    n: int  # proxy samples used
    seconds: float

    def get(self, metric: str) -> float:
        if metric not in PROXY_METRICS:
            raise ConfigError(f"unknown proxy metric '{metric}'; use one of {PROXY_METRICS}")
        return float(getattr(self, metric))


def _last_linear(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ConfigError("proxy margin score needs a final nn.Linear classifier (its input = features)")
    return last


class ProxyEvaluator:
    """Scores policies on fixed proxy samples; the fp32 outputs are computed once.

    Samples are reordered class-round-robin so any prefix (``n=``, used by successive halving)
    stays class-balanced. Calibration uses the first ``calib_samples`` of them.

    ``calibration="fp32"`` sets each layer's activation range from the *fp32* model's
    activations (the rule of :class:`lcpaq.quant.ActQuantizer`, on at most ``range_samples`` values
    per layer), and builds each (layer, w_bits, a_bits, method) quantized layer once, frozen (its
    fake-quantized weight computed once) and shared by every policy's model: scoring a policy costs
    a structural clone and one forward pass. ``"sequential"`` (default) calibrates every policy's
    quantized model from scratch (activations seen through the upstream quantizers, as
    :func:`lcpaq.quant.calibrate` does).

    With fp32 calibration and the model's ``inventory`` (:func:`lcpaq.graph.trace`), each eval
    BatchNorm2d that is the single consumer of a conv (the fx graph's word, matched to the module
    by the fp32 pass's hooks) is folded into that conv's frozen twins and skipped: the same
    function up to float rounding, one module call fewer per layer and policy. Each layer's
    activation statistics (min/max, the sample, its percentile range) are reduced once and shared
    by every (bits, method) asking for a range.

    ``weights="refit"`` (fp32 calibration only) quantizes each layer's weight with per-channel
    clipping chosen for its output on the proxy inputs (:func:`refit_weight`) instead of max|w|:
    a cheap look at what fine-tuning could recover, shared across trials like the layers.

    The last ``cache_models`` quantized models (their per-layer twins, with fp32 calibration) are
    kept, keyed by (policy, calibration method), so successive-halving rungs that re-score a
    surviving policy on more samples pay only the forward pass (the quantized model does not depend
    on ``n``). :meth:`clear_cache` drops them (a benchmark timing cold evaluations calls it).
    :meth:`evaluate_many` scores several policies in one call (what :func:`lcpaq.proxy.tune` uses
    per rung).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, calib_samples: int = 128,
                 batch_size: int = 256, calibration: str = "sequential", cache_models: int = 16,
                 weights: str = "maxabs", range_samples: int = 8192, inventory: Any = None) -> None:
        if calibration not in ("fp32", "sequential"):
            raise ConfigError(f"unknown calibration '{calibration}'; use 'fp32' or 'sequential'")
        if weights not in PROXY_WEIGHTS or (weights != "maxabs" and calibration != "fp32"):
            raise ConfigError(f"unknown proxy weights '{weights}'; use one of {PROXY_WEIGHTS} "
                              "('refit' needs calibration='fp32')")
        self.weights, self.range_samples = weights, range_samples
        order = _round_robin(y)
        # a private fp32 copy: per-policy models share its parameters (see _structural_clone), so
        # later changes to the caller's model cannot leak into cached scores
        self.model, self.x, self.y = _private_copy(model), x[order], y[order]
        self.calib_samples, self.batch_size = min(calib_samples, len(y)), batch_size
        self.calibration = calibration
        self._ranges: dict[tuple[str, int, str, bool], tuple[float, int]] = {}
        self._observed: dict[str, Observed] = {}
        self._inputs: dict[str, torch.Tensor] | None = None
        self.cache_models = max(0, cache_models)
        self._models: dict[tuple[Policy, str], Any] = {}  # per-layer twins (fp32) or the PTQ model
        self._layers: dict[tuple[str, int, int, str], nn.Module] = {}
        self._qweights: dict[tuple[str, int], torch.Tensor] = {}
        from lcpaq.quant import quantizable_names

        self._float_layers = {n: self.model.get_submodule(n) for n in quantizable_names(self.model)}
        self._last = _last_linear_name(self._float_layers)
        # BN folding (fp32 ranges only): convs whose one consumer in the fx graph is a BatchNorm
        # (the inventory's fused ops), matched to that BN module by the fp32 pass's hooks
        self._fusable = set() if inventory is None else {
            ly.name for ly in inventory.layers if ly.kind == "conv" and tuple(ly.fused[:1]) == ("bn",)}
        self._bn_pairs: dict[str, str] = {}  # conv -> the BatchNorm2d folded into its twins
        self._bn_fold: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # conv -> (g, folded bias)
        self._skip = _Skip().eval()  # stands in for every folded BN (stateless)
        # with fp32 ranges, the one fp32 pass also records every quantizable layer's input
        logits, feats = self._forward(self.model, len(self.y), record=calibration == "fp32")
        self.fp32_logits, self.fp32_features = logits[0], feats[0]
        self._fp32_logp = F.log_softmax(self.fp32_logits, 1)
        self._label_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _fp32_qparams(self, layer: str, bits: int, method: str, symmetric: bool) -> tuple[float, int]:
        """(scale, zero point) of ``layer``'s input from the fp32 activations, cached per key."""
        if self._inputs is None:  # recorded by the fp32 pass in __init__ when calibration="fp32"
            self._forward(self.model, self.calib_samples, record=True)
        assert self._inputs is not None
        key = (layer, bits, method, symmetric)
        if key not in self._ranges:
            obs = self._observed.get(layer)
            if obs is None:  # reduced once per layer: min/max, the sample, its percentile range
                obs = self._observed[layer] = Observed(self._inputs[layer], 4 * self.range_samples)
            lo, hi = obs.clip_range(bits, method, symmetric, 99.99)
            self._ranges[key] = qparams_from_range(lo, hi, bits, symmetric)
        return self._ranges[key]

    def clear_cache(self, *, layers: bool = False) -> None:
        """Drop the cached quantized models (the fp32 outputs and activation ranges stay);
        ``layers=True`` also drops the shared frozen quantized layers (a fully cold evaluator)."""
        self._models.clear()
        if layers:
            self._layers.clear()
            self._qweights.clear()

    @torch.inference_mode()
    def _forward(self, model: nn.Module, n: int, *, record: bool = False,
                 features: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [1, n, C] and penultimate features [1, n, D] of the first ``n`` samples;
        ``features``: the module whose input is the features (default: the last Linear).
        ``record`` (fp32 model) also keeps every quantizable layer's input on the first
        ``calib_samples`` and finds the conv -> BatchNorm pairs to fold."""
        feats: list[torch.Tensor] = []
        feat_mod = features if features is not None else _last_linear(model)
        hooks = [feat_mod.register_forward_hook(lambda m, i, o: feats.append(i[0]))]
        store: dict[str, list[torch.Tensor]] = {name: [] for name in self._float_layers} if record else {}
        outs: dict[str, torch.Tensor] = {}  # each fusable conv's last output (BN folding, below)
        bn_src: dict[str, list[str | None]] = {}  # per BatchNorm2d call: the conv whose output it read

        def rec(m: nn.Module, i: tuple, o: torch.Tensor, name: str) -> None:
            store[name].append(i[0])
            if name in self._fusable:
                outs[name] = o

        def bn_hook(m: nn.Module, i: tuple, o: torch.Tensor, name: str) -> None:
            bn_src.setdefault(name, []).append(next((c for c, t in outs.items() if t is i[0]), None))

        hooks += [self._float_layers[name].register_forward_hook(partial(rec, name=name)) for name in store]
        if record and self._fusable:
            hooks += [mod.register_forward_hook(partial(bn_hook, name=bn)) for bn, mod in self.model.named_modules()
                      if isinstance(mod, nn.BatchNorm2d) and mod.running_mean is not None and not mod.training]
        chunks = []
        try:
            for i in range(0, n, self.batch_size):
                chunks.append(model(self.x[i:min(i + self.batch_size, n)]))
        finally:
            for h in hooks:
                h.remove()
        if record:
            self._inputs = {name: torch.cat(v)[: self.calib_samples] for name, v in store.items()}
            self._fold(_fold_pairs(bn_src, {k: len(v) for k, v in store.items()}, len(chunks)))
        return torch.cat(chunks).unsqueeze(0), torch.cat(feats).flatten(1).unsqueeze(0)

    def _fold(self, pairs: dict[str, str]) -> None:
        """Fold each eval BatchNorm2d into the conv before it, in that conv's twins (``w * g``,
        bias ``g * (b - mean) + beta``, g = gamma / sqrt(var + eps)): one BN call fewer per layer
        and policy, the same function up to float rounding. Only for convs whose single consumer
        is that BN (the inventory's fx graph: one consumer, a BN; the hooks: which BN module)."""
        for conv, bn_name in pairs.items():
            bn, mod = self.model.get_submodule(bn_name), self._float_layers[conv]
            g = bn.running_var.add(bn.eps).rsqrt()
            if bn.weight is not None:
                g = g * bn.weight
            b = -bn.running_mean * g if mod.bias is None else (mod.bias - bn.running_mean) * g
            self._bn_fold[conv] = (g, b if bn.bias is None else b + bn.bias)
        self._bn_pairs = dict(pairs)

    def _twins(self, policy: Policy, calib_method: str) -> dict[str, nn.Module]:
        """Per quantizable layer, the module computing it under ``policy`` (fp32 calibration): a
        frozen twin shared with every other policy using the same (layer, bits, method)."""
        key = (policy, calib_method)
        tw = self._models.pop(key, None)  # re-inserted last: the dict is kept in LRU order
        if tw is None:
            policy.validate(list(self._float_layers))
            tw = {name: self._frozen_layer(name, *(policy[name] if name in policy else (FP32_BITS, FP32_BITS)),
                                           calib_method) for name in self._float_layers}
        self._remember(key, tw)
        return tw

    def _remember(self, key: tuple[Policy, str], value: Any) -> None:
        if self.cache_models:
            self._models[key] = value
            while len(self._models) > self.cache_models:
                self._models.pop(next(iter(self._models)))

    def _assemble(self, twins: dict[str, nn.Module]) -> nn.Module:
        """A structural clone of the fp32 model with ``twins`` in place of its quantizable layers
        and its folded BatchNorms skipped."""
        m = _structural_clone(self.model)
        for name, t in twins.items():
            if t is not self._float_layers[name]:
                _put(m, name, t)
        for bn in self._bn_pairs.values():
            _put(m, bn, self._skip)
        return m

    def quantized(self, policy: Policy, *, calib_method: str = "minmax") -> nn.Module:
        """A PTQ copy of the fp32 model under ``policy``, calibrated on the proxy samples."""
        if self.calibration == "sequential":
            from lcpaq.quant import apply_policy

            m = _structural_clone(self.model)
            calib = [(self.x[i:i + self.batch_size],) for i in range(0, self.calib_samples, self.batch_size)]
            return apply_policy(m, policy, calib_loader=calib, calib_batches=len(calib), method=calib_method).eval()
        # "fp32": a layer's quantized twin depends only on (layer, bits, method), never on the rest
        # of the policy, so it is built once and shared by every policy's model (frozen, eval only)
        return self._assemble(self._twins(policy, calib_method))

    def _frozen_layer(self, name: str, w_bits: int, a_bits: int, method: str) -> nn.Module:
        mod = self._float_layers[name]
        if (w_bits, a_bits) == (FP32_BITS, FP32_BITS):
            if name not in self._bn_fold:
                return mod
            method = ""  # a float twin with the BN folded in: the method plays no part
        key = (name, w_bits, a_bits, method)
        q = self._layers.get(key)
        if q is None:
            from lcpaq.quant import CALIB_METHODS

            if method and method not in CALIB_METHODS:
                raise ConfigError(f"unknown calibration method '{method}'; use one of {', '.join(CALIB_METHODS)}")
            aq = None
            if a_bits != FP32_BITS:  # asymmetric activations, as apply_policy's default
                sc, zp = self._fp32_qparams(name, a_bits, method, False)
                aq = (torch.tensor(sc).abs().clamp_min(1e-8), zp, act_range(a_bits, False))
            qw = self._qweights.get((name, w_bits))  # shared by every a_bits and method
            if qw is None:
                with torch.no_grad():
                    if self.weights == "refit" and w_bits != FP32_BITS:
                        assert self._inputs is not None  # refit implies fp32 ranges: recorded in __init__
                        qw = refit_weight(mod, self._inputs[name], w_bits)
                    else:
                        qw = _fq_weight(mod.weight.detach(), w_bits)
                    if name in self._bn_fold:  # quantize first, then fold: BN(conv(x, q(w)))
                        qw = qw * self._bn_fold[name][0].view(-1, 1, 1, 1)
                self._qweights[(name, w_bits)] = qw
            q = _frozen(mod, qw, aq, w_bits, a_bits,
                        bias=self._bn_fold[name][1] if name in self._bn_fold else mod.bias)
            self._layers[key] = q
        return q

    def evaluate(self, policy: Policy, *, calib_method: str = "minmax", n: int | None = None) -> ProxyScore:
        """PTQ under ``policy`` and all three scores on the first ``n`` proxy samples (default all)."""
        return self.evaluate_many([(policy, calib_method)], n=n)[0]

    def evaluate_many(self, items: Sequence[tuple[Policy, str]], *, n: int | None = None) -> list[ProxyScore]:
        """:meth:`evaluate` for several (policy, calibration method) pairs, with the same scores:
        one forward per policy, then the three scores of all of them in one set of batched tensor
        ops (per policy, they cost a third of a small model's forward). ``seconds`` of each score
        is the call's time over the number of distinct pairs.

        (Stacking the policies into one batch, one row block per policy, so that BN/ReLU/pooling
        run once, was measured slower on digits: the stacked activations leave the L2 cache.)
        """
        t0 = time.perf_counter()
        n = len(self.y) if n is None else max(2, min(n, len(self.y)))
        uniq = list(dict.fromkeys(items))
        if not uniq:
            return []
        outs = []
        for key in uniq:
            if self.calibration == "sequential" or self._last is None:
                qm = self._models.pop(key, None)  # re-inserted last (LRU)
                qm = qm if qm is not None else self.quantized(key[0], calib_method=key[1])
                self._remember(key, qm)
                outs.append(self._forward(qm, n))
            else:
                qm = self._assemble(self._twins(*key))
                outs.append(self._forward(qm, n, features=qm.get_submodule(self._last)))
        scores = self._scores(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), n)
        dt = (time.perf_counter() - t0) / max(1, len(uniq))
        done = {key: ProxyScore(*sc, n=n, seconds=dt) for key, sc in zip(uniq, scores, strict=True)}
        return [done[k] for k in items]

    def _scores(self, logits: torch.Tensor, feats: torch.Tensor, n: int) -> list[tuple[float, float, float]]:
        """(margin, -KL, acc) per row block of [P, n, C] logits and [P, n, D] features."""
        y = self.y[:n]
        if n not in self._label_masks:
            self._label_masks[n] = _label_masks(y)
        ref = self._fp32_logp[:n]
        logp = F.log_softmax(logits, 2)
        kl = (ref.exp() * (ref - logp)).sum((1, 2)) / n  # F.kl_div(logp, ref, "batchmean", log_target=True)
        acc = (logits.argmax(2) == y).double().mean(1) * 100.0
        mg = _margins(feats, *self._label_masks[n])
        return [(float(a), -float(b), float(c)) for a, b, c in zip(mg, kl, acc, strict=True)]


def _fq_act(x: torch.Tensor, aq: tuple) -> torch.Tensor:
    """:func:`lcpaq.quant.fake_quant_act` for inference, in 3 tensor ops instead of 6 and the same
    values: its straight-through ``(round(v) - v) + v`` is exactly ``round(v)`` in floating point
    (|round(v) - v| <= 1/2 makes the difference exact, Sterbenz, and the sum is representable)."""
    scale, zp, lo_hi = aq
    return torch.clamp(x / scale, lo_hi[0] - zp, lo_hi[1] - zp).round_().mul_(scale)


def _fq_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`lcpaq.quant.quantizers.fake_quant_weight` for inference, same values in 3 ops
    instead of 6 (the straight-through sum ``x + (round(x) - x)`` is exactly ``round(x)``, as in
    :func:`_fq_act`)."""
    if bits == FP32_BITS:
        return w
    from lcpaq.quant.quantizers import weight_qmax, weight_scale

    q = weight_qmax(bits)
    s = weight_scale(w, bits).view(-1, *([1] * (w.dim() - 1)))
    return torch.div(w, s).round_().clamp_(-q, q).mul_(s)


class _FrozenConv2d(nn.Conv2d):
    """A calibrated fake-quant conv for inference only: the quantized weight and the activation
    grid are fixed once, not recomputed every forward (values as :class:`lcpaq.quant.QuantConv2d`
    with the same weight bits and activation range; a folded BN is in ``_qw`` and ``_b``)."""

    _qw: torch.Tensor
    _b: torch.Tensor | None
    _aq: tuple | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x if self._aq is None else _fq_act(x, self._aq), self._qw, self._b)


class _FrozenLinear(nn.Linear):
    """:class:`_FrozenConv2d` for Linear layers."""

    _qw: torch.Tensor
    _b: torch.Tensor | None
    _aq: tuple | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x if self._aq is None else _fq_act(x, self._aq), self._qw, self._b)


def _frozen(mod: nn.Module, qw: torch.Tensor, aq: tuple | None, w_bits: int, a_bits: int, *,
            bias: torch.Tensor | None) -> nn.Module:
    """A frozen twin of float layer ``mod`` (own hook dicts, like the clone)."""
    cls = _FrozenConv2d if isinstance(mod, nn.Conv2d) else _FrozenLinear
    q = cls.__new__(cls)
    q.__dict__ = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in mod.__dict__.items()}
    q.__dict__.update(_qw=qw, _b=bias, _aq=aq, w_bits=w_bits, a_bits=a_bits)
    return q


class _Skip(nn.Module):
    """Stands in for a BatchNorm folded into the conv before it (returns its input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _put(root: nn.Module, path: str, mod: nn.Module) -> None:
    """Set submodule ``path`` of a structural clone, in the clone's own ``_modules`` dicts (no
    ``nn.Module.__setattr__``)."""
    parent, _, child = path.rpartition(".")
    owner = root
    for part in parent.split(".") if parent else ():
        owner = owner._modules[part]  # type: ignore[assignment]
    owner._modules[child] = mod


def _fold_pairs(bn_src: dict[str, list[str | None]], conv_calls: dict[str, int], batches: int) -> dict[str, str]:
    """conv -> BN for every BatchNorm2d that, on every call, read the output of one conv that is
    called once per batch and read by no other BN (the fx graph's single consumer is checked by the caller)."""
    pairs: dict[str, str] = {}
    claimed: dict[str, int] = {}
    for bn, srcs in bn_src.items():
        conv = srcs[0]
        if conv is not None and len(srcs) == batches and srcs.count(conv) == batches and conv_calls[conv] == batches:
            pairs[conv] = bn
        for c in set(srcs):
            if c is not None:
                claimed[c] = claimed.get(c, 0) + 1
    return {c: bn for c, bn in pairs.items() if claimed[c] == 1}


def _structural_clone(m: nn.Module) -> nn.Module:
    """A copy of the module tree that *shares* parameters and buffers with ``m``.

    Enough for PTQ scoring: :func:`lcpaq.quant.apply_policy` only swaps submodules (its quantized
    layers share the float weights and quantize them on the fly), calibration writes only the new
    activation quantizers' buffers, and eval-mode BatchNorm does not update its statistics. Each
    container gets its own ``_modules`` dict, so swapping a child on the clone leaves ``m``
    untouched; every other attribute (parameter, buffer and hook dicts) is shared with ``m``, and
    leaves (modules without children: convs, BN, ReLU) are the same objects as in ``m``, so a hook
    put on the clone is a hook on ``m`` and must be removed after use (as
    :meth:`ProxyEvaluator._forward` does). Built without ``nn.Module.__setattr__``: about 20x
    cheaper than deepcopy on the small models here.
    """
    if not m._modules:
        return m
    c = m.__class__.__new__(m.__class__)
    d = m.__dict__.copy()
    d["_modules"] = {k: (None if v is None else _structural_clone(v)) for k, v in m._modules.items()}
    object.__setattr__(c, "__dict__", d)
    return c


def _private_copy(m: nn.Module) -> nn.Module:
    """The module tree in eval mode with its own copies of every parameter and buffer (frozen: no
    grad) and of every dict attribute (hooks included).

    What the evaluator needs of ``copy.deepcopy`` (later in-place changes to the caller's weights
    or module swaps cannot reach it) at a tenth of its cost on the small models here; plain
    tensor attributes that are neither parameters nor buffers stay shared.
    """
    c = m.__class__.__new__(m.__class__)
    d = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in m.__dict__.items()}
    d["_parameters"] = {k: None if v is None else nn.Parameter(v.detach().clone(), requires_grad=False)
                        for k, v in m._parameters.items()}
    d["_buffers"] = {k: None if v is None else v.detach().clone() for k, v in m._buffers.items()}
    d["_modules"] = {k: (None if v is None else _private_copy(v)) for k, v in m._modules.items()}
    d["training"] = False
    object.__setattr__(c, "__dict__", d)
    return c


def _round_robin(y: torch.Tensor) -> torch.Tensor:
    pools = [torch.nonzero(y == c).flatten().tolist() for c in torch.unique(y)]
    out: list[int] = []
    for k in range(max(len(p) for p in pools)):
        out.extend(p[k] for p in pools if k < len(p))
    return torch.as_tensor(out)
