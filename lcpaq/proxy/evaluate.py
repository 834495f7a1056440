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
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lcpaq.errors import ConfigError
from lcpaq.policy import FLOAT_BITS as FP32_BITS
from lcpaq.policy import Policy
from lcpaq.quant.quantizers import act_range, fake_quant_weight, qparams_from_range

PROXY_METRICS = ("margin", "kl", "acc")
PROXY_WEIGHTS = ("maxabs", "refit")


def margin_score(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Scale-free class margin of ``features`` [N, D] (see module doc); needs >= 2 classes.

    >>> f = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> margin_score(f, torch.tensor([0, 0, 1, 1])) > 1.0
    True
    """
    f = features.detach().double().flatten(1)
    classes = torch.unique(labels)
    if len(classes) < 2:
        raise ConfigError("margin score needs samples of at least two classes in the proxy data")
    own = labels.unsqueeze(1) == classes.unsqueeze(0)  # [N, C]
    hot = own.double()
    cent = (hot.T @ f) / hot.sum(0).unsqueeze(1)  # [C, D] class centroids
    d = torch.cdist(f, cent)  # [N, C]
    d_in = d[own]
    d_out = d.masked_fill(own, float("inf")).amin(1)
    spread = (f - f.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
    return float(((d_out - d_in) / spread).mean())


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

    ``weights="refit"`` (fp32 calibration only) quantizes each layer's weight with per-channel
    clipping chosen for its output on the proxy inputs (:func:`refit_weight`) instead of max|w|:
    a cheap look at what fine-tuning could recover, shared across trials like the layers.

    The last ``cache_models`` quantized models are kept, keyed by (policy, calibration method), so
    successive-halving rungs that re-score a surviving policy on more samples pay only the forward
    pass (the quantized model does not depend on ``n``). :meth:`clear_cache` drops them (a benchmark
    timing cold evaluations calls it).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, calib_samples: int = 128,
                 batch_size: int = 256, calibration: str = "sequential", cache_models: int = 16,
                 weights: str = "maxabs", range_samples: int = 8192) -> None:
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
        self._observed: dict[str, _Observed] = {}
        self._inputs: dict[str, torch.Tensor] | None = None
        self.cache_models = max(0, cache_models)
        self._models: dict[tuple[Policy, str], nn.Module] = {}
        self._layers: dict[tuple[str, int, int, str], nn.Module] = {}
        self._qweights: dict[tuple[str, int], torch.Tensor] = {}
        from lcpaq.quant import quantizable_names

        self._float_layers = {n: self.model.get_submodule(n) for n in quantizable_names(self.model)}
        # with fp32 ranges, the one fp32 pass also records every quantizable layer's input
        self.fp32_logits, self.fp32_features = self._forward(self.model, len(self.y),
                                                             record=calibration == "fp32")

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
                obs = self._observed[layer] = _Observed(self._inputs[layer], 4 * self.range_samples)
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
    def _forward(self, model: nn.Module, n: int, *, record: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate features of the first ``n`` samples; ``record`` also keeps the
        inputs of every quantizable layer on the first ``calib_samples`` (fp32 model only)."""
        feats: list[torch.Tensor] = []
        hooks = [_last_linear(model).register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))]
        store: dict[str, list[torch.Tensor]] = {name: [] for name in self._float_layers} if record else {}
        hooks += [self._float_layers[name].register_forward_hook(lambda m, i, o, name=name: store[name].append(i[0]))
                  for name in store]
        try:
            x = self.x[:n]
            logits = torch.cat([model(x[i:i + self.batch_size]) for i in range(0, n, self.batch_size)])
        finally:
            for h in hooks:
                h.remove()
        if record:
            self._inputs = {name: torch.cat(v)[: self.calib_samples] for name, v in store.items()}
        return logits, torch.cat(feats)

    def quantized(self, policy: Policy, *, calib_method: str = "minmax") -> nn.Module:
        """A PTQ copy of the fp32 model under ``policy``, calibrated on the proxy samples."""
        from lcpaq.quant import apply_policy

        m = _structural_clone(self.model)
        if self.calibration == "sequential":
            calib = [(self.x[i:i + self.batch_size],) for i in range(0, self.calib_samples, self.batch_size)]
            return apply_policy(m, policy, calib_loader=calib, calib_batches=len(calib), method=calib_method).eval()
        # "fp32": a layer's quantized twin depends only on (layer, bits, method), never on the rest
        # of the policy, so it is built once and shared by every policy's model (frozen, eval only)
        policy.validate(list(self._float_layers))
        for name, (w, a) in policy.items():
            if (w, a) == (FP32_BITS, FP32_BITS):
                continue
            parent, _, child = name.rpartition(".")
            owner = m
            for part in parent.split(".") if parent else ():
                owner = owner._modules[part]  # type: ignore[assignment]
            owner._modules[child] = self._frozen_layer(name, w, a, calib_method)  # the clone's own dict
        return m  # eval mode: the private copy and the frozen layers are

    def _frozen_layer(self, name: str, w_bits: int, a_bits: int, method: str) -> nn.Module:
        key = (name, w_bits, a_bits, method)
        q = self._layers.get(key)
        if q is None:
            from lcpaq.quant import CALIB_METHODS

            if method not in CALIB_METHODS:
                raise ConfigError(f"unknown calibration method '{method}'; use one of {', '.join(CALIB_METHODS)}")
            mod = self._float_layers[name]
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
                        qw = fake_quant_weight(mod.weight, w_bits).detach()
                self._qweights[(name, w_bits)] = qw
            q = _frozen(mod, qw, aq, w_bits, a_bits)
            self._layers[key] = q
        return q

    def evaluate(self, policy: Policy, *, calib_method: str = "minmax", n: int | None = None) -> ProxyScore:
        """PTQ under ``policy`` and all three scores on the first ``n`` proxy samples (default all)."""
        t0 = time.perf_counter()
        n = len(self.y) if n is None else max(2, min(n, len(self.y)))
        key = (policy, calib_method)
        qm = self._models.pop(key, None)  # re-inserted last: the dict is kept in LRU order
        if qm is None:
            qm = self.quantized(policy, calib_method=calib_method)
        if self.cache_models:
            self._models[key] = qm
            while len(self._models) > self.cache_models:
                self._models.pop(next(iter(self._models)))
        logits, feats = self._forward(qm, n)
        y = self.y[:n]
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(self.fp32_logits[:n], 1),
                      reduction="batchmean", log_target=True)
        return ProxyScore(margin=margin_score(feats, y), kl=-float(kl),
                          acc=100.0 * float((logits.argmax(1) == y).float().mean()), n=n,
                          seconds=time.perf_counter() - t0)


def _fq_act(x: torch.Tensor, aq: tuple) -> torch.Tensor:
    """:func:`lcpaq.quant.fake_quant_act` for inference, in 3 tensor ops instead of 6 and the same
    values: its straight-through ``(round(v) - v) + v`` is exactly ``round(v)`` in floating point
    (|round(v) - v| <= 1/2 makes the difference exact, Sterbenz, and the sum is representable)."""
    scale, zp, lo_hi = aq
    return torch.clamp(x / scale, lo_hi[0] - zp, lo_hi[1] - zp).round_().mul_(scale)


class _FrozenConv2d(nn.Conv2d):
    """A calibrated fake-quant conv for inference only: the quantized weight and the activation
    grid are fixed once, not recomputed every forward (values as :class:`lcpaq.quant.QuantConv2d`
    with the same weight bits and activation range)."""

    _qw: torch.Tensor
    _aq: tuple | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x if self._aq is None else _fq_act(x, self._aq), self._qw, self.bias)


class _FrozenLinear(nn.Linear):
    """:class:`_FrozenConv2d` for Linear layers."""

    _qw: torch.Tensor
    _aq: tuple | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x if self._aq is None else _fq_act(x, self._aq), self._qw, self.bias)


def _frozen(mod: nn.Module, qw: torch.Tensor, aq: tuple | None, w_bits: int, a_bits: int) -> nn.Module:
    """A frozen twin of float layer ``mod`` sharing its bias (own hook dicts, like the clone)."""
    cls = _FrozenConv2d if isinstance(mod, nn.Conv2d) else _FrozenLinear
    q = cls.__new__(cls)
    q.__dict__ = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in mod.__dict__.items()}
    q.__dict__.update(_qw=qw, _aq=aq, w_bits=w_bits, a_bits=a_bits)
    return q


@torch.no_grad()
def refit_weight(layer: nn.Module, x: torch.Tensor, bits: int, *, grid: int = 16) -> torch.Tensor:
    """``bits``-bit fake-quantized weight of ``layer`` with per-channel clipping chosen to keep its
    *output* on inputs ``x``: for each output channel c the scale alpha * max|w_c| / qmax, alpha in
    [0.25, 1], minimising sum_d E[x_d^2] dw_cd^2 (the output error with the inputs' second moments,
    the diagonal of their Gram matrix: the full matrix cost 5x the whole tune on digits).

    A cheap stand-in for what fine-tuning can recover: max|w| scaling is far from the best
    low-bit grid (at 2 bits it keeps only {-max, 0, max}), a gap QAT closes by moving the weights.
    """
    from lcpaq.quant.quantizers import weight_qmax

    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple):
            return fake_quant_weight(w, bits).detach()
        # E[x^2] per unfolded input position: per input channel, shifted by the kernel offsets
        cols = F.unfold(x.pow(2), layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # [N, D, L]
        h = cols.mean((0, 2))
    else:
        h = x.reshape(-1, x.shape[-1]).pow(2).mean(0)
    wf = w.reshape(w.shape[0], -1)  # [C, D]
    qmax = weight_qmax(bits)
    amax = wf.abs().amax(1).clamp_min(1e-8)
    alphas = torch.linspace(0.25, 1.0, grid)
    sc = (alphas[:, None] * amax[None, :] / qmax)[..., None]  # [A, C, 1]
    err = ((torch.clamp(torch.round(wf[None] / sc), -qmax, qmax) * sc - wf[None]).pow(2) * h).sum(2)  # [A, C]
    best = sc[err.argmin(0), torch.arange(wf.shape[0])]  # [C, 1]
    return (torch.clamp(torch.round(wf / best), -qmax, qmax) * best).reshape(w.shape)


class _Observed:
    """One layer's observed activations, reduced once and shared by every (bits, method) asking for
    a range: min/max of all values, the sample the clipping methods read (as ActQuantizer draws it),
    its nonzero values (mse) and the percentile range (bits-independent)."""

    __slots__ = ("lo", "hi", "sample", "_nonzero", "_pct")

    def __init__(self, x: torch.Tensor, max_samples: int) -> None:
        flat = x.detach().reshape(-1).float()
        self.lo, self.hi = flat.min().item(), flat.max().item()
        k = max_samples // 4
        self.sample = flat if flat.numel() <= k else flat[
            torch.randint(flat.numel(), (k,), generator=torch.Generator().manual_seed(0))]
        self._nonzero: torch.Tensor | None = None
        self._pct: dict[float, tuple[float, float]] = {}

    def nonzero(self) -> torch.Tensor:
        if self._nonzero is None:
            self._nonzero = self.sample[self.sample != 0]
        return self._nonzero

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        if percentile not in self._pct:
            p = percentile / 100.0
            s = self.sample
            lo = torch.quantile(s, 1 - p).item() if self.lo < 0 else self.lo
            self._pct[percentile] = (lo, torch.quantile(s, p).item())
        return self._pct[percentile]

    def clip_range(self, bits: int, method: str, symmetric: bool, percentile: float) -> tuple[float, float]:
        """(lo, hi) of the ``bits``-bit grid by ``method`` (ActQuantizer.compute_qparams' rule)."""
        if method == "minmax":
            return self.lo, self.hi
        if method == "percentile":
            return self.percentile_range(percentile)
        # mse: the 48 clipping ratios' (scale, zero point) in float64 tensor ops (the same IEEE
        # operations as qparams_from_range on Python floats, so the same values), then every
        # ratio's error in one op; zeros (half of a post-ReLU input) quantize exactly to zero on
        # every grid (the zero point is an integer in range): they add nothing and are left out
        ratios = torch.logspace(-2, 0, 48).double()
        qmin, qmax = act_range(bits, symmetric)
        lo_r, hi_r = (self.lo * ratios).clamp(max=0.0), (self.hi * ratios).clamp(min=0.0)
        if symmetric:
            sc64 = torch.maximum(lo_r.abs(), hi_r.abs()).clamp(min=1e-8) / qmax
            zp64 = torch.zeros_like(sc64)
        else:
            sc64 = (hi_r - lo_r).clamp(min=1e-8) / (qmax - qmin)
            zp64 = (qmin - lo_r / sc64).round().clamp(qmin, qmax)
        sc, zp = sc64.float().unsqueeze(1), zp64.float().unsqueeze(1)
        nz = self.nonzero().unsqueeze(0)
        d = torch.div(nz, sc)
        if bool((zp == zp[0]).all()):  # one zero point (always for inputs >= 0): scalar bounds, 3x faster
            d.clamp_(qmin - float(zp[0]), qmax - float(zp[0]))
        else:
            d.clamp_(qmin - zp, qmax - zp)
        d.round_().mul_(sc).sub_(nz)
        r = float(ratios[int(torch.argmin(d.mul_(d).sum(1)))])
        return self.lo * r, self.hi * r


def act_qparams(x: torch.Tensor, bits: int, *, method: str = "minmax", symmetric: bool = False,
                percentile: float = 99.99, max_samples: int = 1 << 18) -> tuple[float, int]:
    """(scale, zero_point) of ``bits``-bit activations seen as ``x``, by ``method``.

    The rule of :class:`lcpaq.quant.ActQuantizer` (one observed batch, then ``compute_qparams``)
    with the ``mse`` clipping grid evaluated in one tensor op instead of 48 passes (the costly
    part of a proxy tune's first trials); checked against ActQuantizer in the tests.
    """
    lo, hi = _Observed(x, max_samples).clip_range(bits, method, symmetric, percentile)
    return qparams_from_range(lo, hi, bits, symmetric)


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
