"""`lcpaq profile`, `lcpaq tables show|diff`, `lcpaq predict`."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()
tables_app = typer.Typer(help="Inspect and compare latency tables.", no_args_is_help=True)
app.add_typer(tables_app, name="tables")


@app.command()
def profile(
    hw: Path = typer.Option(..., help="device profile, e.g. hw_profiles/host-cpu-ort.toml"),
    model: str = typer.Option(..., help="registered model name"),
    bits: str | None = typer.Option(None, help="candidates (default: the profile's), e.g. w4a8,w8a8,fp32"),
    out: Path | None = typer.Option(None, help="table path (default latency_tables/<profile>/<model>.jsonl)"),
    repair: bool = typer.Option(False, help="drop a torn trailing line left by an interrupted run"),
    fresh: bool = typer.Option(False, help="start the table again; an existing one is kept under a "
                                           "dated name (compare them with `lcpaq tables diff`)"),
    references: bool = typer.Option(False, help="also time the uniform W8A8 and fp32 whole models before and "
                                    "after the units (rows __whole__|w8a8, __whole__|fp32): validate then also "
                                    "reports the error in the table's time, the drift since profiling divided out"),
) -> None:
    """Measure every layer of MODEL at every candidate on the device into a latency table.

    An interrupted run resumes where it stopped. A table measured on another setup (host CPU/ISA,
    runtime versions, threads, settings) is never resumed: use --out or --fresh."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from lcpaq.cli._checks import bits_text, out_path, tracker_reachable
    from lcpaq.graph import trace_named
    from lcpaq.policy import parse_bits_list
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.run import profile as run_profile
    from lcpaq.profiler.table import keep_previous, read_table

    prof = load_profile(hw)
    _, inv = trace_named(model)
    cands = parse_bits_list(bits_text(bits)) if bits is not None else prof.candidates
    path = out_path(out or Path("latency_tables") / prof.name / f"{model}.jsonl", keep_tables=False)
    tracker_reachable(prof, hw)
    not_a_table(path)
    if fresh and path.exists():
        console.print(f"kept the previous table as {keep_previous(path)}")
    before = len(read_table(path, repair=repair)) if path.exists() else 0
    with Progress(TextColumn("profiling {task.fields[layer]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=make_console(stderr=True)) as prog:
        task = prog.add_task("p", total=None, layer="")

        def units() -> None:
            run_profile(inv, prof, path, candidates=cands, repair=repair,
                        progress=lambda d, t, name: prog.update(task, completed=d, total=t, layer=name))

        try:
            if references:
                from lcpaq.models import default_input_shape, get_model
                from lcpaq.profiler.references import profile_and_references, reference_deployments

                prog.update(task, layer="whole-model references (uniform W8A8, fp32)")
                deps = reference_deployments(get_model(model), default_input_shape(model), prof)
                ref = profile_and_references(units, deps, prof, path, model_name=model)
            else:
                units()
        except KeyboardInterrupt:
            prog.stop()
            rows = len(read_table(path)) if path.exists() else 0
            console.print(f"interrupted: {rows} rows are in {path}; run the same command again to "
                          "resume (finished rows are not measured again)")
            raise typer.Exit(130) from None
    t = read_table(path)
    if len(t) == before:
        console.print(f"nothing to measure: every unit is already in {path} (measured "
                      f"{t.header.get('date')}); pass --fresh to measure again")
    else:
        console.print(f"wrote {path} ({len(t) - before} new rows, {len(t)} in all)")
    if references:
        a, b = ref["start"], ref["end"]
        console.print(f"whole-model references: W8A8 {a['w8a8']:.4g} -> {b['w8a8']:.4g} ms, fp32 {a['fp32']:.4g} -> "
                      f"{b['fp32']:.4g} ms (before -> after the units)")


def not_a_table(path: Path) -> None:
    """``--out`` names an existing file that is not a latency table (a policy, a report): refuse it
    rather than call it a damaged table (whose advice, regenerate or --fresh, would move it away)."""
    import json

    from lcpaq.errors import ConfigError
    from lcpaq.profiler.table import TABLE_SCHEMA

    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        first = f.readline()
    try:
        schema = json.loads(first).get("schema")
    except (ValueError, AttributeError):
        schema = None
    if schema != TABLE_SCHEMA:
        raise ConfigError(f"--out {path} exists and is not a latency table"
                          f"{f' (it is {schema})' if isinstance(schema, str) else ''}; choose another path")


def checked_rows(t) -> list[dict]:
    """The table's rows; a measured row whose timing fields are not numbers is a TableError that
    names it (a hand-edited or damaged table), not a traceback."""
    from lcpaq.errors import TableError

    rows = list(t)
    for r in rows:
        if r.get("error"):
            continue
        for f in ("median_ms", "p10_ms", "p90_ms"):
            v = r.get(f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TableError(f"latency table {t.path}: row {r.get('key')!r} has {f}={v!r}, not a "
                                 "time in ms; delete that line and re-run `lcpaq profile` with the same "
                                 "--out to measure it again")
        if not isinstance(r.get("w_bits"), int) or not isinstance(r.get("a_bits"), int):
            raise TableError(f"latency table {t.path}: row {r.get('key')!r} lacks integer w_bits/a_bits; "
                             "delete that line and re-run `lcpaq profile` with the same --out")
    return rows


def read_checked(path: Path):
    """A latency table for a command that only reads it: rows checked; a torn last line (an
    interrupted profiling run) says which command repairs it, since this one cannot."""
    from lcpaq.errors import TableError
    from lcpaq.profiler.table import read_table

    try:
        t = read_table(path)
    except TableError as e:
        if "--repair" not in str(e):
            raise
        raise TableError(f"latency table {path}: its last line is torn (an interrupted write); "
                         f"`lcpaq profile --hw PROFILE --model MODEL --out {path} --repair` drops it and "
                         "resumes, or delete that line") from None
    checked_rows(t)
    return t


def load_latency(table: Path):
    """A latency table for prediction, its rows checked (a block table, .json, passes through)."""
    return table if table.suffix == ".json" else read_checked(table)


@tables_app.command("show")
def tables_show(path: Path, json_out: bool = typer.Option(False, "--json")) -> None:
    """Summary of a latency table."""
    t = read_checked(path)
    rows = list(t)
    errors = [r for r in rows if r.get("error")]
    if json_out:
        emit_json({"header": t.header, "records": len(rows), "errors": len(errors)})
        return
    from rich.table import Table

    h = t.header
    versions = h.get("versions") or (rows[0].get("runtime") if rows else None) or {}
    runtime = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else versions
    console.print(f"[bold]{path}[/]: profile {h.get('profile')} ({h.get('backend')}, {h.get('threads')} thread(s)), "
                  f"{h.get('host_cpu')}, {h.get('date')}, {runtime or 'runtime unknown'}")
    tab = Table("workload", "bits", "input", "median ms", "p10-p90 ms", "n", "kernel")
    for r in rows:
        bits = "fp32" if (r["w_bits"], r["a_bits"]) == (32, 32) else f"w{r['w_bits']}a{r['a_bits']}"
        tab.add_row(r["workload"], bits, r.get("in_class", ""),
                    "ERROR" if r.get("error") else f"{r['median_ms']:.4f}",
                    "" if r.get("error") else f"{r['p10_ms']:.4f}-{r['p90_ms']:.4f}", str(r.get("n")),
                    r.get("error") or r.get("kernel", ""))
    console.print(tab)
    console.print(f"{len(rows)} records, {len(errors)} errors")


@tables_app.command("diff")
def tables_diff(old: Path, new: Path, band: float = typer.Option(
        0.0, help="noise band (fraction); default: from each row's p10-p90 spread"),
        json_out: bool = typer.Option(False, "--json")) -> None:
    """Per-workload new/old ratio; flags changes beyond the noise band (e.g. after a runtime upgrade)."""
    from lcpaq.errors import ConfigError
    from lcpaq.profiler.table import header_changes

    if not (math.isfinite(band) and 0 <= band < 1):
        raise ConfigError(f"--band {band:g}: give a fraction in [0, 1), e.g. 0.05 for ±5 %, or 0 for "
                          "each row's own p10-p90 spread")
    a, b = read_checked(old), read_checked(new)
    setup = header_changes(a.header, b.header)
    out = []
    for key in sorted(set(a.rows) & set(b.rows)):
        ra, rb = a.rows[key], b.rows[key]
        if ra.get("error") or rb.get("error") or ra["median_ms"] <= 0 or rb["median_ms"] <= 0:
            continue
        ratio = rb["median_ms"] / ra["median_ms"]
        noise = band or max((ra["p90_ms"] - ra["p10_ms"]) / ra["median_ms"], (rb["p90_ms"] - rb["p10_ms"]) / rb["median_ms"], 0.02)
        flag = "regression" if ratio > 1 + noise else "improvement" if ratio < 1 - noise else ""
        out.append({"key": key, "old_ms": ra["median_ms"], "new_ms": rb["median_ms"], "ratio": ratio,
                    "noise": noise, "flag": flag})
    if json_out:
        emit_json({"setup_changes": [{"field": k, "old": x, "new": y} for k, x, y in setup], "rows": out})
        return
    from rich.table import Table

    for k, x, y in setup:
        console.print(f"setup changed: {k}: {x} -> {y}")
    tab = Table("key", "old ms", "new ms", "new/old", "band", "flag")
    for r in out:
        tab.add_row(r["key"], f"{r['old_ms']:.4f}", f"{r['new_ms']:.4f}", f"{r['ratio']:.3f}",
                    f"±{100 * r['noise']:.1f}%", r["flag"])
    console.print(tab)
    geo = math.exp(sum(math.log(r["ratio"]) for r in out) / len(out)) if out else float("nan")
    console.print(f"{len(out)} common workloads; geometric-mean ratio {geo:.3f}; "
                  f"{sum(r['flag'] == 'regression' for r in out)} regressions, "
                  f"{sum(r['flag'] == 'improvement' for r in out)} improvements, "
                  f"{len(set(a.rows) ^ set(b.rows))} keys only in one table")
    if not any(r["key"] != "__overhead__" for r in out):
        console.print("no layer workload in common: were the two tables profiled for the same model "
                      "and candidates?")


@app.command()
def predict(
    table: Path = typer.Option(..., help="latency table"),
    model: str = typer.Option(..., help="registered model name"),
    policy: Path = typer.Option(..., help="policy JSON"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Predicted latency of a policy from a measured table, with a per-layer breakdown."""
    from lcpaq.graph import trace_named
    from lcpaq.policy import Policy
    from lcpaq.profiler.predict import latency_model

    _, inv = trace_named(model)
    pol = Policy.load(policy, layer_names=inv.names)
    lm = latency_model(load_latency(table), inv, sorted(set(pol.bits.values())))
    br = lm.breakdown(pol)
    total = lm.predict(pol)
    if json_out:
        emit_json({"predicted_ms": total, "breakdown_ms": br, "constant_ms": lm.constant_ms})
        return
    from rich.table import Table

    from lcpaq.policy import format_bits

    tab = Table("layer / edge", "bits", "ms", "share")
    for k, v in br.items():
        tab.add_row(k, format_bits(pol[k]) if k in pol else "transition", f"{v:.4f}", f"{100 * v / total:.1f}%")
    console.print(tab)
    console.print(f"predicted {total:.3f} ms ({model}, {pol.summary()})")
