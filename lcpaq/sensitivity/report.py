"""Versioned sensitivity report (``lcpaq.sensitivity/1``) and Ω per (layer, bit pair).

Ω(l, (w, a)) = Tr(H_w,l) / n_w,l * ||Q_w(W_l) - W_l||^2  +  Tr(H_a,l) / n_a,l * ||Q_a(x_l) - x_l||^2
(the second-order Taylor term of the loss change with the trace spread evenly over elements,
as in HAWQ-V2/LCPAQ). An operand kept in fp32 (bits 32) contributes 0. Variant ``"plain"`` drops
the traces (Ω = sum of squared perturbations), for the proxy's hyperparameter search.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcpaq.errors import SensitivityError
from lcpaq.policy import FLOAT_BITS, BitPair, atomic_write_text, format_bits, parse_bits

SENSITIVITY_SCHEMA = "lcpaq.sensitivity/1"
OMEGA_VARIANTS = ("trace", "plain")


@dataclass(frozen=True)
class SensitivityReport:
    model: str
    data: str
    seed: int
    probes: int
    method: str
    weight_trace: Mapping[str, tuple[float, float]]  # layer -> (mean, stderr)
    act_trace: Mapping[str, tuple[float, float]]
    numel: Mapping[str, tuple[int, int]]  # layer -> (n_weights, n_activation elements)
    w_pert: Mapping[str, Mapping[int, float]]  # layer -> bits -> ||Q(W) - W||^2
    a_pert: Mapping[str, Mapping[int, float]]
    candidates: tuple[BitPair, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.weight_trace)

    def omega(self, layer: str, pair: BitPair, *, variant: str = "trace") -> float:
        if variant not in OMEGA_VARIANTS:
            raise SensitivityError(f"unknown Ω variant '{variant}'; use one of {OMEGA_VARIANTS}")
        w, a = pair
        nw, na = self.numel[layer]
        out = 0.0
        if w != FLOAT_BITS:
            tw = max(self.weight_trace[layer][0], 0.0) / nw if variant == "trace" else 1.0
            out += tw * self._pert(self.w_pert, layer, w, "weight")
        if a != FLOAT_BITS and self.act_trace:
            ta = max(self.act_trace[layer][0], 0.0) / na if variant == "trace" else 1.0
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

    def omega_table(self, candidates=None, *, variant: str = "trace") -> dict[str, dict[BitPair, float]]:
        cands = tuple(candidates) if candidates is not None else self.candidates
        return {ly: {p: self.omega(ly, p, variant=variant) for p in cands} for ly in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SENSITIVITY_SCHEMA, "model": self.model, "data": self.data, "seed": self.seed,
            "probes": self.probes, "method": self.method,
            "candidates": [format_bits(p) for p in self.candidates],
            "layers": {
                ly: {
                    "weight_trace": list(self.weight_trace[ly]),
                    "act_trace": list(self.act_trace[ly]) if ly in self.act_trace else None,
                    "numel": list(self.numel[ly]),
                    "w_pert": {str(b): v for b, v in self.w_pert[ly].items()},
                    "a_pert": {str(b): v for b, v in self.a_pert.get(ly, {}).items()},
                    "omega": {format_bits(p): self.omega(ly, p) for p in self.candidates},
                } for ly in self.layers
            },
            "meta": dict(self.meta),
        }

    @staticmethod
    def from_dict(d: Any, *, source: str = "report") -> SensitivityReport:
        try:
            if d.get("schema") != SENSITIVITY_SCHEMA:
                raise SensitivityError(f"{source}: schema {d.get('schema')!r}, expected '{SENSITIVITY_SCHEMA}'")
            L = d["layers"]
            return SensitivityReport(
                model=d["model"], data=d["data"], seed=int(d["seed"]), probes=int(d["probes"]),
                method=d["method"],
                weight_trace={k: tuple(v["weight_trace"]) for k, v in L.items()},
                act_trace={k: tuple(v["act_trace"]) for k, v in L.items() if v.get("act_trace")},
                numel={k: tuple(v["numel"]) for k, v in L.items()},
                w_pert={k: {int(b): float(x) for b, x in v["w_pert"].items()} for k, v in L.items()},
                a_pert={k: {int(b): float(x) for b, x in v["a_pert"].items()} for k, v in L.items()},
                candidates=tuple(parse_bits(c) for c in d["candidates"]),
                meta=d.get("meta", {}),
            )
        except SensitivityError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SensitivityError(f"{source}: malformed sensitivity report ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> SensitivityReport:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise SensitivityError(f"sensitivity report {p} does not exist; create it with `lcpaq sensitivity`") from None
        except json.JSONDecodeError as e:
            raise SensitivityError(f"sensitivity report {p} is not valid JSON: {e}") from None
        return SensitivityReport.from_dict(d, source=str(p))

    def check_layers(self, names) -> None:
        missing = [n for n in names if n not in self.weight_trace]
        if missing:
            raise SensitivityError(
                f"sensitivity report for '{self.model}' has no layer '{missing[0]}'; "
                "re-run `lcpaq sensitivity` for this model"
            )
