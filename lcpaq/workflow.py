"""Glue used by the CLI and the demo: load inputs by name/path, build a Problem, run a search."""

from __future__ import annotations

from pathlib import Path

from lcpaq.errors import ConfigError
from lcpaq.policy import parse_bits_list


def resolve_pins(pin: str, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """'first,last,fc' -> {names[0]: (8, 8), names[-1]: (8, 8), 'fc': (8, 8)}."""
    out = {}
    for tok in (t.strip() for t in pin.split(",") if t.strip()):
        name = names[0] if tok == "first" else names[-1] if tok == "last" else tok
        if name not in names:
            raise ConfigError(f"--pin names unknown layer '{tok}'; see `lcpaq inspect`")
        out[name] = (8, 8)
    return out


def run_search(model: str, sensitivity: str | Path, *, table=None, max_latency_ms=None, max_size_mb=None,
               max_gbops=None, bits=None, solver="ilp", ilp_solver=None, time_limit_s=60.0, pin="",
               pareto: Path | None = None, inventory=None):
    """Load the model's inventory, the sensitivity report and the latency table; search."""
    from lcpaq.graph import trace_named
    from lcpaq.search import Budgets, build_problem, pareto_frontier, search
    from lcpaq.sensitivity import SensitivityReport

    rep = SensitivityReport.load(sensitivity)
    if inventory is None:
        _, inventory = trace_named(model)
    rep.check_layers(inventory.names)
    cands = parse_bits_list(bits) if bits else rep.candidates
    latency = None
    if table is not None:
        from lcpaq.profiler.predict import latency_model

        latency = latency_model(table, inventory, cands)
    elif max_latency_ms is not None:
        raise ConfigError("--max-latency-ms needs a measured latency table: pass --table PATH "
                          "(make one with `lcpaq profile`)")
    budgets = Budgets(max_size_mb=max_size_mb, max_gbops=max_gbops, max_latency_ms=max_latency_ms)
    prob = build_problem(inventory, rep.omega_table(cands), candidates=cands, budgets=budgets,
                         latency=latency, pinned=resolve_pins(pin, inventory.names))
    res = search(prob, solver=solver, ilp_solver=ilp_solver, time_limit_s=time_limit_s)
    frontier = None
    if pareto is not None:
        sweep = "max_latency_ms" if latency is not None else ("max_size_mb" if max_size_mb else "max_gbops")
        if sweep == "max_gbops" and max_gbops is None and max_size_mb is None:
            sweep = "max_gbops"
        frontier = pareto_frontier(prob, sweep, points=10, solver=ilp_solver)
        frontier.plot(pareto, chosen=res)
        frontier.to_csv(Path(pareto).with_suffix(".csv"))
    return res, frontier, prob
