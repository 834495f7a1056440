"""Versioned sensitivity report (``lcpaq.sensitivity/1``) and Ω per (layer, bit pair).

Ω(l, (w, a)) = T_w,l / n_w,l · ||Q_w(W_l) − W_l||²  +  T_a,l / n_a,l · ||Q_a(x_l) − x_l||²

where T_w,l = max(Tr(∇²_W L), 0) over layer l's weight (n_w,l elements) and T_a,l the same over
its input activation x_l on the calibration samples (n_a,l elements). It is the second-order
Taylor estimate of the loss increase with the curvature spread evenly over the block's elements
(HAWQ-V2, LCPAQ), up to the common factor 1/2. An operand kept in fp32 (bits 32) adds 0, so
Ω(l, fp32) = 0. A negative trace estimate (non-convex block) is clamped to 0 rather than
rewarding quantization. Variant ``"plain"`` drops the traces (Ω = sum of squared perturbations).

>>> # rep = SensitivityReport.load("sens.json"); rep.omega("layer1.0.conv1", (4, 8))
>>> # rep.omega_table()  ->  {"conv1": {(4, 8): 0.012, (8, 8): 0.0007, (32, 32): 0.0}, ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcpaq.errors import SensitivityError
from lcpaq.policy import FLOAT_BITS, BitPair, atomic_write_text, format_bits, parse_bits
from lcpaq.sensitivity.stats import TraceEstimate

SENSITIVITY_SCHEMA = "lcpaq.sensitivity/1"
OMEGA_VARIANTS = ("trace", "plain")
METHODS = ("hutchinson", "fisher")


@dataclass(frozen=True)
class SensitivityReport:
    """Per-layer traces ± stderr, quantization perturbations and the Ω table they give."""

    model: str
    data: str
    seed: int
    probes: int  # probes (Hutchinson) or samples (Fisher) taken
    method: str  # "hutchinson" or "fisher" (fallback)
    weight_trace: Mapping[str, TraceEstimate]
    act_trace: Mapping[str, TraceEstimate]  # empty when activations were not estimated
    numel: Mapping[str, tuple[int, int]]  # layer -> (n_w, n_a)
    w_pert: Mapping[str, Mapping[int, float]]  # layer -> w_bits -> ||Q(W) - W||²
    a_pert: Mapping[str, Mapping[int, float]]  # layer -> a_bits -> ||Q(x) - x||²
    candidates: tuple[BitPair, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.weight_trace)

    def max_rel_stderr(self) -> float:
        """Largest |stderr / mean| over every estimated block."""
        ests = [*self.weight_trace.values(), *self.act_trace.values()]
        return max((e.rel_stderr for e in ests), default=0.0)

    def omega(self, layer: str, pair: BitPair, *, variant: str = "trace") -> float:
        """Ω of quantizing ``layer`` at ``pair`` = (w_bits, a_bits); 0 for fp32."""
        if variant not in OMEGA_VARIANTS:
            raise SensitivityError(f"unknown Ω variant '{variant}'; use one of {OMEGA_VARIANTS}")
        if layer not in self.weight_trace:
            raise SensitivityError(f"sensitivity report for '{self.model}' has no layer '{layer}'; "
                                   "re-run `lcpaq sensitivity` for this model")
        w, a = pair
        nw, na = self.numel[layer]
        out = 0.0
        if w != FLOAT_BITS:
            tw = max(self.weight_trace[layer].mean, 0.0) / nw if variant == "trace" else 1.0
            out += tw * self._pert(self.w_pert, layer, w, "weight")
        if a != FLOAT_BITS and (self.act_trace or variant == "plain"):
            est = self.act_trace.get(layer)
            ta = (max(est.mean, 0.0) / na if est else 0.0) if variant == "trace" else 1.0
            out += ta * self._pert(self.a_pert, layer, a, "activation")
        return out

    @staticmethod
    def _pert(table: Mapping[str, Mapping[int, float]], layer: str, bits: int, what: str) -> float:
        try:
            return table[layer][bits]
        except KeyError:
            raise SensitivityError(
                f"report has no {what} perturbation for '{layer}' at {bits} bits; "
                f"re-run `lcpaq sensitivity` with --bits including it"
            ) from None

    def omega_table(self, candidates: Iterable[BitPair] | None = None, *,
                    variant: str = "trace") -> dict[str, dict[BitPair, float]]:
        """layer -> {(w_bits, a_bits): Ω} for ``candidates`` (default: the report's)."""
        cands = tuple(candidates) if candidates is not None else self.candidates
        return {ly: {p: self.omega(ly, p, variant=variant) for p in cands} for ly in self.layers}

    def check_layers(self, names: Iterable[str]) -> None:
        """Raise SensitivityError unless every name in ``names`` has an estimate here."""
        missing = [n for n in names if n not in self.weight_trace]
        if missing:
            raise SensitivityError(
                f"sensitivity report for '{self.model}' has no layer '{missing[0]}' "
                f"({len(missing)} missing); re-run `lcpaq sensitivity` for this model"
            )

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def est(e: TraceEstimate | None) -> dict[str, Any] | None:
            return None if e is None else {"mean": e.mean, "stderr": _num(e.stderr), "probes": e.probes}

        return {
            "schema": SENSITIVITY_SCHEMA, "model": self.model, "data": self.data, "seed": self.seed,
            "probes": self.probes, "method": self.method,
            "candidates": [format_bits(p) for p in self.candidates],
            "layers": {
                ly: {
                    "weight_trace": est(self.weight_trace[ly]),
                    "act_trace": est(self.act_trace.get(ly)),
                    "numel_w": self.numel[ly][0], "numel_a": self.numel[ly][1],
                    "w_pert": {str(b): v for b, v in sorted(self.w_pert[ly].items())},
                    "a_pert": {str(b): v for b, v in sorted(self.a_pert.get(ly, {}).items())},
                    "omega": {format_bits(p): self.omega(ly, p) for p in self.candidates},
                } for ly in self.layers
            },
            "meta": dict(self.meta),
        }

    @staticmethod
    def from_dict(d: Any, *, source: str = "report") -> SensitivityReport:
        """Validate and build; SensitivityError says which field is wrong."""
        from lcpaq.sensitivity.validate import report_from_dict

        return report_from_dict(d, source)

    def save(self, path: str | Path) -> Path:
        """Write the report atomically (write-then-rename)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @staticmethod
    def load(path: str | Path) -> SensitivityReport:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise SensitivityError(f"sensitivity report {p} does not exist; create it with `lcpaq sensitivity`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SensitivityError(f"sensitivity report {p} is not valid JSON ({e}); re-create it "
                                   "with `lcpaq sensitivity`") from None
        return SensitivityReport.from_dict(d, source=str(p))


def _num(x: float) -> float | None:
    """JSON has no inf: an undefined stderr (fewer than 2 probes) is written as null."""
    return x if math.isfinite(x) else None


def parse_candidates(items: Any, source: str) -> tuple[BitPair, ...]:
    if not isinstance(items, list) or not items:
        raise SensitivityError(f"{source}: 'candidates' must be a non-empty list like ['w4a8', 'fp32']")
    try:
        return tuple(parse_bits(c) for c in items)
    except Exception as e:  # PolicyError / ConfigError / TypeError from parse_bits
        raise SensitivityError(f"{source}: bad candidate in {items!r} ({e})") from None
