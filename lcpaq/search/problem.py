"""The search problem as pure data (no torch): layers, candidates, Ω, cost tables, budgets, ties.

Costs are tables ``cost[name][layer][pair]``; the latency cost may carry pairwise *transition*
terms (``LatencyModel.pairwise``) and a constant.

What a *tie* constrains, exactly: every layer of a tie group gets the same **activation bits**
(a_bits). Their outputs meet at a residual add / concat (or they read one tensor), so one
quantizer with one bit-width serves that tensor. Weight bits stay free per layer.
Pinned layers are fixed to one bit pair (e.g. first/last at W8A8): their candidate set becomes
just that pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lcpaq.costs import layer_bops, layer_size_bytes
from lcpaq.errors import ConfigError
from lcpaq.inventory import Inventory
from lcpaq.latency import LatencyModel
from lcpaq.policy import BitPair, Policy, format_bits, parse_bits

BUDGET_COSTS = {"max_size_mb": "size_mb", "max_gbops": "gbops", "max_latency_ms": "latency_ms"}
COST_UNITS = {"size_mb": "MB", "gbops": "GBOPs", "latency_ms": "ms"}


@dataclass(frozen=True)
class Budgets:
    """Any subset of the three budgets; None = unconstrained."""

    max_size_mb: float | None = None
    max_gbops: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        for k, v in self.items():
            if v <= 0:
                raise ConfigError(f"budget {k}={v} must be positive")

    def items(self) -> list[tuple[str, float]]:
        return [(k, float(getattr(self, k))) for k in BUDGET_COSTS if getattr(self, k) is not None]


@dataclass(frozen=True)
class Problem:
    layers: tuple[str, ...]
    candidates: Mapping[str, tuple[BitPair, ...]]
    omega: Mapping[str, Mapping[BitPair, float]]
    costs: Mapping[str, Mapping[str, Mapping[BitPair, float]]]  # cost name -> layer -> pair -> value
    budgets: Budgets = Budgets()
    ties: tuple[tuple[str, ...], ...] = ()
    pinned: Mapping[str, BitPair] = field(default_factory=dict)
    pairwise: Mapping[tuple[str, str], Mapping[tuple[BitPair, BitPair], float]] = field(default_factory=dict)
    constants: Mapping[str, float] = field(default_factory=dict)  # cost name -> constant term

    def __post_init__(self) -> None:
        for ly in self.layers:
            if not self.candidates.get(ly):
                raise ConfigError(f"layer '{ly}' has no candidate bit pairs")
            for p in self.candidates[ly]:
                if p not in self.omega.get(ly, {}):
                    raise ConfigError(
                        f"sensitivity has no Ω for layer '{ly}' at {format_bits(p)}; "
                        "re-run `lcpaq sensitivity` with these --bits"
                    )
        for ly, p in self.pinned.items():
            if ly not in self.candidates:
                raise ConfigError(f"pinned layer '{ly}' is not in the model")
            if p not in self.candidates[ly]:
                raise ConfigError(f"pinned {format_bits(p)} for '{ly}' is not among its candidates")
        for k, _ in self.budgets.items():
            if BUDGET_COSTS[k] not in self.costs:
                raise ConfigError(f"budget {k} given but no {BUDGET_COSTS[k]} cost table; "
                                  "pass a latency table (--table) for latency budgets")

    def evaluate(self, policy: Policy | Mapping[str, BitPair]) -> dict[str, float]:
        """Ω and every cost of a full assignment (transitions and constants included)."""
        bits = dict(policy.items())
        out = {"omega": sum(self.omega[ly][bits[ly]] for ly in self.layers)}
        for name, table in self.costs.items():
            v = self.constants.get(name, 0.0) + sum(table[ly][bits[ly]] for ly in self.layers)
            if name == "latency_ms":
                v += sum(t.get((bits[p], bits[c]), 0.0) for (p, c), t in self.pairwise.items())
            out[name] = v
        return out

    def feasible(self, policy: Policy | Mapping[str, BitPair], *, tol: float = 1e-9) -> bool:
        ev = self.evaluate(policy)
        bits = dict(policy.items())
        if any(len({bits[ly][1] for ly in g}) > 1 for g in self.ties):
            return False
        if any(bits[ly] != p for ly, p in self.pinned.items()):
            return False
        return all(ev[BUDGET_COSTS[k]] <= lim * (1 + tol) + tol for k, lim in self.budgets.items())

    def with_budgets(self, budgets: Budgets) -> Problem:
        return Problem(self.layers, self.candidates, self.omega, self.costs, budgets, self.ties,
                       self.pinned, self.pairwise, self.constants)


def build_problem(
    inventory: Inventory,
    omega: Mapping[str, Mapping[BitPair, float]],
    *,
    candidates: Sequence[BitPair],
    budgets: Budgets = Budgets(),
    latency: LatencyModel | None = None,
    pinned: Mapping[str, BitPair] | None = None,
    ties: bool = True,
) -> Problem:
    """Problem over ``inventory`` with size/BOPs from :mod:`lcpaq.costs` and optional latency.

    >>> # prob = build_problem(inv, report.omega_table(), candidates=[(4, 8), (8, 8)],
    >>> #                      budgets=Budgets(max_size_mb=1.0))
    """
    names = inventory.names
    pinned = dict(pinned or {})
    cands = {ly: (pinned[ly],) if ly in pinned else tuple(candidates) for ly in names}
    candidates = tuple(dict.fromkeys([*candidates, *pinned.values()]))
    costs: dict[str, dict[str, dict[BitPair, float]]] = {
        "size_mb": {ly.name: {p: layer_size_bytes(ly, p) / 1e6 for p in candidates} for ly in inventory},
        "gbops": {ly.name: {p: layer_bops(ly, p) / 1e9 for p in candidates} for ly in inventory},
    }
    pairwise: dict = {}
    constants: dict[str, float] = {}
    if latency is not None:
        costs["latency_ms"] = {ly: {p: latency.layer_ms(ly, p) for p in candidates} for ly in names}
        pairwise = {e: dict(t) for e, t in latency.pairwise.items()}
        constants["latency_ms"] = latency.constant_ms
    unknown = [ly for ly in pinned if ly not in names]
    if unknown:
        raise ConfigError(f"pinned layer '{unknown[0]}' is not in model '{inventory.model}'")
    missing = [ly for ly in names if ly not in omega]
    if missing:
        raise ConfigError(f"sensitivity report has no layer '{missing[0]}'; was it made for this model?")
    return Problem(
        layers=names, candidates=cands, omega={ly: dict(omega[ly]) for ly in names}, costs=costs,
        budgets=budgets, ties=inventory.tie_groups if ties else (), pinned=pinned,
        pairwise=pairwise, constants=constants,
    )


@dataclass(frozen=True)
class SearchResult:
    policy: Policy
    status: str
    objective: float
    costs: Mapping[str, float]
    budgets: Mapping[str, float]
    solve_time_s: float
    solver: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, problem: Problem, bits: Mapping[str, BitPair], status: str, solve_time_s: float,
           solver: str) -> SearchResult:
        """The result for a full assignment: its Ω and every cost evaluated on ``problem``."""
        ev = problem.evaluate(bits)
        return cls(policy=Policy(dict(bits), meta={"solver": solver, "objective": ev["omega"]}), status=status,
                   objective=ev["omega"], costs={k: v for k, v in ev.items() if k != "omega"},
                   budgets=dict(problem.budgets.items()), solve_time_s=solve_time_s, solver=solver)

    def usage(self) -> list[tuple[str, float, float | None]]:
        """(cost name, value, budget or None) rows for printing."""
        lim = {BUDGET_COSTS[k]: v for k, v in self.budgets.items()}
        return [(k, v, lim.get(k)) for k, v in self.costs.items()]


def resolve_pins(names: Sequence[str], spec: str | Sequence[str] | None, pair: BitPair = (8, 8)) -> dict[str, BitPair]:
    """``"first,last"`` (or layer names) -> {layer: pair}.

    >>> resolve_pins(["conv1", "l1", "fc"], "first,last")
    {'conv1': (8, 8), 'fc': (8, 8)}
    """
    if not spec:
        return {}
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: dict[str, BitPair] = {}
    for it in filter(None, items):
        name = names[0] if it == "first" else names[-1] if it == "last" else it
        if name not in names:
            raise ConfigError(f"--pin '{it}' is not a layer; use first, last or names from `lcpaq inspect`")
        out[name] = pair
    return out


def omega_from_mapping(data: Mapping[str, Any]) -> dict[str, dict[BitPair, float]]:
    """A plain Ω table ``{layer: {"w4a8" | (4, 8): Ω}}`` (optionally under key ``"omega"``) ->
    ``{layer: {(w, a): Ω}}``. Sensitivity reports (``lcpaq.sensitivity/1``) go through
    ``SensitivityReport.omega_table()`` instead (that module imports torch)."""
    table = data.get("omega", data)
    out: dict[str, dict[BitPair, float]] = {}
    try:
        for ly, row in table.items():
            out[ly] = {(parse_bits(k) if isinstance(k, str) else (int(k[0]), int(k[1]))): float(v)
                       for k, v in row.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"Ω table is not {{layer: {{'w4a8': value}}}}: {e}") from None
    return out
