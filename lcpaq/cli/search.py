"""`lcpaq search`: best mixed-precision policy under size / BOPs / measured-latency budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()


def load_omega(path: Path, candidates: tuple | None) -> tuple[dict, tuple]:
    """Ω table and candidate pairs from a sensitivity report (lcpaq.sensitivity/1) or a plain
    ``{layer: {"w4a8": Ω}}`` JSON."""
    from lcpaq.errors import SensitivityError
    from lcpaq.search.problem import omega_from_mapping

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SensitivityError(f"{path} does not exist; create it with `lcpaq sensitivity`") from None
    except json.JSONDecodeError as e:
        raise SensitivityError(f"{path} is not valid JSON: {e}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if isinstance(schema, str) and not schema.startswith("lcpaq.sensitivity/"):
        raise SensitivityError(f"{path} is a {schema} file, not a sensitivity report; make one with "
                               "`lcpaq sensitivity`")
    if isinstance(schema, str):
        from lcpaq.sensitivity.report import SensitivityReport

        rep = SensitivityReport.from_dict(data, source=str(path))
        cands = tuple(candidates or rep.candidates)
        return rep.omega_table(cands), cands
    omega = omega_from_mapping(data)
    first = next(iter(omega.values()), {})
    return omega, tuple(candidates or first)


def _row_costs(problem: Any, name: str, pair: tuple) -> list[str]:
    out = []
    for cost in ("size_mb", "gbops", "latency_ms"):
        if cost in problem.costs:
            out.append(f"{problem.costs[cost][name][pair]:.4g}")
    return out


@app.command()
def search(
    model: str = typer.Option(..., help="registered model name (see `lcpaq models`)"),
    sensitivity: Path = typer.Option(..., help="sensitivity report JSON (or a plain {layer: {w4a8: Ω}} map)"),
    out: Path = typer.Option(..., help="where to write the policy JSON (lcpaq.policy/1)"),
    table: Path | None = typer.Option(None, help="measured latency table (needed for --max-latency-ms)"),
    max_latency_ms: float | None = typer.Option(None, help="latency budget (ms, predicted from --table)"),
    max_size_mb: float | None = typer.Option(None, help="model size budget (MB)"),
    max_gbops: float | None = typer.Option(None, help="BOPs budget (GBOPs)"),
    bits: str | None = typer.Option(None, help="candidate pairs, e.g. w2a8,w4a8,w8a8 (default: the report's)"),
    solver: str = typer.Option("ilp", help="ilp (exact) or mckp (greedy)"),
    ilp_solver: str | None = typer.Option(None, help="cbc or highs (default: auto)"),
    time_limit: float = typer.Option(60.0, min=0.001, help="ILP time limit (s)"),
    pin: str = typer.Option("", help="layers fixed to --pin-bits: first,last or names"),
    pin_bits: str = typer.Option("w8a8", help="bit pair for --pin layers"),
    pareto: Path | None = typer.Option(None, help="also sweep a budget and save the frontier PNG (+ .csv)"),
    pareto_points: int = typer.Option(10, min=2, help="frontier points"),
    input_size: str | None = typer.Option(None, help="e.g. 1x3x224x224 (default: the model's)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Minimise total sensitivity Ω under every budget given; write the policy."""
    from lcpaq.cli._checks import bits_text, out_path, positive, stdout_to_stderr
    from lcpaq.cli.foundation import trace_model
    from lcpaq.policy import format_bits, parse_bits, parse_bits_list
    from lcpaq.search import Budgets, build_problem, pareto_frontier
    from lcpaq.search import search as run_search
    from lcpaq.search.problem import resolve_pins

    for value, option in ((max_latency_ms, "--max-latency-ms"), (max_size_mb, "--max-size-mb"),
                          (max_gbops, "--max-gbops")):
        positive(value, option)
    out_path(out)
    if pareto is not None:
        out_path(pareto, "--pareto", suffixes=(".png", ".svg", ".pdf"))
    _, inv = trace_model(model, input_size)
    omega, cands = load_omega(sensitivity, parse_bits_list(bits_text(bits)) if bits is not None else None)
    latency = None
    if table is not None:
        from lcpaq.cli.profiler import load_latency
        from lcpaq.profiler.predict import latency_model

        latency = latency_model(load_latency(table), inv, cands)
    budgets = Budgets(max_size_mb=max_size_mb, max_gbops=max_gbops, max_latency_ms=max_latency_ms)
    pins = resolve_pins(inv.names, pin, parse_bits(pin_bits))
    problem = build_problem(inv, omega, candidates=cands, budgets=budgets, latency=latency, pinned=pins)
    with stdout_to_stderr():  # the HiGHS banner is printed from C++ on stdout; keep --json clean
        res = run_search(problem, solver=solver, ilp_solver=ilp_solver, time_limit_s=time_limit)
    frontier_info = None
    if pareto is not None:
        sweep = ("max_latency_ms" if latency is not None else
                 next((k for k, _ in budgets.items()), "max_gbops"))
        with stdout_to_stderr():
            fr = pareto_frontier(problem, sweep, points=pareto_points, solver=ilp_solver)
        fr.plot(pareto, chosen=res)
        csv = fr.to_csv(pareto.with_suffix(".csv"))
        knee = fr.knee()
        frontier_info = {"png": str(pareto), "csv": str(csv), "sweep": sweep, "points": len(fr.points),
                         "knee_omega": knee.objective, "knee_cost": knee.costs[fr.cost_name]}
    pol = res.policy
    pol = type(pol)(pol.bits, meta={**pol.meta, "model": model, "status": res.status,
                                     "costs": dict(res.costs), "budgets": dict(res.budgets)})
    pol.save(out)
    if json_out:
        emit_json({"policy": pol.to_dict(), "policy_path": str(out), "status": res.status, "solver": res.solver, "objective": res.objective,
                   "costs": dict(res.costs), "budgets": dict(res.budgets), "solve_time_s": res.solve_time_s,
                   "bits": {k: format_bits(v) for k, v in pol.items()}, "pareto": frontier_info})
        return
    heads = [c for c in ("size_mb", "gbops", "latency_ms") if c in problem.costs]
    t = Table("layer", "bits", "Ω", *heads, title=f"{model}: {res.solver} ({res.status}, {res.solve_time_s:.3f} s)")
    for name in inv.names:
        p = pol[name]
        t.add_row(name, format_bits(p), f"{problem.omega[name][p]:.4g}", *_row_costs(problem, name, p))
    console.print(t)
    u = Table("cost", "value", "budget", "used")
    for cost, value, lim in res.usage():
        u.add_row(cost, f"{value:.4g}", "-" if lim is None else f"{lim:.4g}",
                  "-" if lim is None else f"{100 * value / lim:.1f} %")
    console.print(u)
    console.print(f"total Ω {res.objective:.5g}; {pol.summary()}; policy written to {out}")
    if not any(lim is not None for _, _, lim in res.usage()):
        console.print("no budget given (--max-latency-ms, --max-size-mb, --max-gbops): every layer "
                      "took its lowest-Ω candidate")
    if frontier_info:
        console.print(f"Pareto frontier ({frontier_info['points']} points over {frontier_info['sweep']}) "
                      f"-> {frontier_info['png']}, {frontier_info['csv']}; knee at "
                      f"{frontier_info['knee_cost']:.4g}, Ω {frontier_info['knee_omega']:.4g}")
