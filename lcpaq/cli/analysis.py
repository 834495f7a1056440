"""`lcpaq search` (superseded by lcpaq/cli/search.py, registered after it)."""

from __future__ import annotations

from pathlib import Path

import typer

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()

# `lcpaq sensitivity` lives in lcpaq/cli/sensitivity.py.


@app.command()
def search(
    model: str = typer.Option(..., help="registered model name"),
    sensitivity: Path = typer.Option(..., "--sensitivity", help="report from `lcpaq sensitivity`"),
    table: Path | None = typer.Option(None, help="latency table (for --max-latency-ms)"),
    max_latency_ms: float | None = typer.Option(None),
    max_size_mb: float | None = typer.Option(None),
    max_gbops: float | None = typer.Option(None),
    bits: str | None = typer.Option(None, help="candidates (default: the report's)"),
    solver: str = typer.Option("ilp", help="ilp | mckp"),
    ilp_solver: str | None = typer.Option(None, help="highs | cbc (default: highs if installed)"),
    time_limit: float = typer.Option(60.0, help="ILP time limit, s"),
    pin: str = typer.Option("", help="comma list of layers kept at w8a8; 'first' and 'last' allowed"),
    pareto: Path | None = typer.Option(None, help="write the Pareto frontier PNG (and CSV beside it)"),
    out: Path = typer.Option(..., help="policy JSON to write"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Best mixed-precision policy under size, BOPs and measured-latency budgets."""
    from lcpaq.workflow import run_search

    res, frontier, prob = run_search(
        model, sensitivity, table=table, max_latency_ms=max_latency_ms, max_size_mb=max_size_mb,
        max_gbops=max_gbops, bits=bits, solver=solver, ilp_solver=ilp_solver, time_limit_s=time_limit,
        pin=pin, pareto=pareto,
    )
    res.policy.save(out)
    if json_out:
        emit_json({"policy": res.policy.to_dict(), "status": res.status, "objective": res.objective,
                   "costs": res.costs, "budgets": res.budgets, "solve_time_s": res.solve_time_s})
        return
    print_search_result(res, prob)
    console.print(f"wrote {out}" + (f" and {pareto}" if pareto else ""))


def print_search_result(res, prob) -> None:
    from rich.table import Table

    from lcpaq.policy import format_bits

    t = Table("layer", "bits", "Ω", *[k for k in prob.costs], title=f"{res.solver}: {res.status}, "
              f"Ω={res.objective:.4g}, {res.solve_time_s * 1e3:.0f} ms")
    for ly in prob.layers:
        p = res.policy[ly]
        t.add_row(ly, format_bits(p), f"{prob.omega[ly][p]:.3g}", *[f"{prob.costs[k][ly][p]:.4g}" for k in prob.costs])
    console.print(t)
    u = Table("cost", "value", "budget", "used")
    for k, v, lim in res.usage():
        u.add_row(k, f"{v:.4g}", "-" if lim is None else f"{lim:.4g}", "-" if lim is None else f"{100 * v / lim:.1f}%")
    console.print(u)
