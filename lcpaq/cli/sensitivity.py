"""`lcpaq sensitivity`: per-layer Hessian traces and Ω for every candidate bit pair -> sens.json."""

from __future__ import annotations

from pathlib import Path

import typer

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()
DEFAULT_BITS = "w2a8,w4a8,w6a8,w8a8,w4a4,w8a4,fp32"


@app.command()
def sensitivity(
    model: str = typer.Option(..., help="registered model name (see `lcpaq models`)"),
    data: str = typer.Option(..., help="calibration data: mnist5k | digits | imagefolder:PATH"),
    out: Path = typer.Option(..., help="where to write the report (lcpaq.sensitivity/1 JSON)"),
    weights: Path | None = typer.Option(None, help="state_dict to load into the model"),
    bits: str = typer.Option(DEFAULT_BITS, help="candidate bit pairs, e.g. w4a8,w8a8,fp32"),
    probes: int = typer.Option(200, min=2, help="maximum Hutchinson probes"),
    tol: float = typer.Option(0.05, help="stop when every layer's stderr < tol x max(|trace|, 0.25 x the largest |trace| of its kind)"),
    seed: int = typer.Option(0, help="seed of the Rademacher probes"),
    batch_size: int = typer.Option(32, min=1, help="calibration batch size"),
    batches: int = typer.Option(2, min=1, help="calibration batches (loss = mean over all their samples)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Per-layer Hessian traces (Hutchinson, weights and inputs) and Ω for every candidate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lcpaq.cli._checks import data_fits, out_path, positive
    from lcpaq.data import get_loader
    from lcpaq.models import get_model
    from lcpaq.policy import format_bits, parse_bits_list
    from lcpaq.sensitivity import SensitivityConfig, estimate_sensitivity

    cands = parse_bits_list(bits)
    positive(tol, "--tol")
    out_path(out)
    loader = get_loader(data, "train", batch_size=batch_size)
    data_fits(model, data, loader.dataset)  # before building the model: a mismatch fails fast
    m = get_model(model, weights=weights)
    cfg = SensitivityConfig(batches=batches, model_name=model, data_name=data)
    with Progress(TextColumn("[bold]Hessian traces"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("probes  stop value {task.fields[rse]} (target {task.fields[tol]})"),
                  TimeElapsedColumn(), console=make_console(stderr=True), transient=json_out) as prog:
        task = prog.add_task("probes", total=probes, rse="-", tol=f"{tol:g}")
        rep = estimate_sensitivity(
            m, loader, candidates=cands, probes=probes, tol=tol, seed=seed, config=cfg,
            progress=lambda i, r: prog.update(task, completed=i, rse=f"{r:.3f}"),
        )
        prog.update(task, total=rep.probes)
    rep.save(out)
    if json_out:
        emit_json(rep.to_dict())
        return
    from rich.table import Table

    t = Table("layer", "Tr(H_w) ± se", "Tr(H_a) ± se", *[f"Ω {format_bits(p)}" for p in cands],
              title=f"{model} on {data}: {rep.method}, {rep.probes} probes, seed {seed}, "
                    f"max rel. stderr {rep.max_rel_stderr():.3f}")
    for ly in rep.layers:
        w = rep.weight_trace[ly]
        a = rep.act_trace.get(ly)
        t.add_row(ly, f"{w.mean:.3g} ± {w.stderr:.2g}", "-" if a is None else f"{a.mean:.3g} ± {a.stderr:.2g}",
                  *[f"{rep.omega(ly, p):.3g}" for p in cands])
    console.print(t)
    if rep.meta.get("fallback"):
        console.print(f"[yellow]warning:[/] {rep.meta['fallback']}")
    console.print(f"wrote {out}")
