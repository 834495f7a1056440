"""`lcpaq models`, `lcpaq inspect`, `lcpaq cost`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    """'1x3x64x64' -> (1, 3, 64, 64); None stays None."""
    if not text:
        return None
    from lcpaq.errors import ConfigError

    try:
        shape = tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--input-size '{text}' is not like 1x3x224x224") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"--input-size '{text}' is not like 1x3x224x224")
    return shape


def trace_model(model: str, input_size: str | None = None, weights: Path | str | None = None):
    """``trace_named`` for a command; a --input-size the model cannot run is a ConfigError (checked
    with one forward pass first, so the tracer does not print its own traceback)."""
    from lcpaq.graph import trace_named

    shape = parse_input_size(input_size)
    w = str(weights) if weights else None
    if shape is None:
        return trace_named(model, weights=w)
    import torch

    from lcpaq.errors import ConfigError
    from lcpaq.graph import trace
    from lcpaq.models import default_input_shape, get_model

    m = get_model(model, weights=w)
    try:
        with torch.no_grad():
            m.eval()(torch.zeros(shape))
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--input-size {input_size} does not fit {model} ({first}); its default is "
                          f"{'x'.join(map(str, default_input_shape(model)))}") from None
    return m, trace(m, shape, name=model)


@app.command()
def models(json_out: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List the registered models."""
    from lcpaq.models import EMBEDDED, default_input_shape, list_models

    rows = [{"name": n, "input_shape": list(default_input_shape(n)), "embedded": n == EMBEDDED}
            for n in list_models()]
    if json_out:
        emit_json(rows)
        return
    t = Table("model", "input", "note")
    for r in rows:
        t.add_row(r["name"], "x".join(map(str, r["input_shape"])), "embedded default (trained on mnist5k)" if r["embedded"] else "random init")
    console.print(t)


@app.command()
def inspect(
    model: str = typer.Option(..., help="registered model name (see `lcpaq models`)"),
    weights: Path | None = typer.Option(None, help="state_dict to load"),
    input_size: str | None = typer.Option(None, help="e.g. 1x3x224x224 (default: the model's)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Quantizable layers, MACs, params and tie groups of a model."""
    _, inv = trace_model(model, input_size, weights)
    if json_out:
        emit_json(inv.to_dict())
        return
    tie_of = {n: i for i, g in enumerate(inv.tie_groups) for n in g}
    t = Table("#", "layer", "kind", "in", "out", "k/s/g", "params", "MMACs", "fused", "tie",
              title=f"{model} at {'x'.join(map(str, inv.input_shape))}")
    for i, ly in enumerate(inv):
        ksg = f"{ly.kernel_size[0]}x{ly.kernel_size[1]}/{ly.stride[0]}/{ly.groups}" if ly.kind == "conv" else "-"
        t.add_row(str(i), ly.name, ly.kind, "x".join(map(str, ly.in_shape)), "x".join(map(str, ly.out_shape)),
                  ksg, f"{ly.params:,}", f"{ly.macs / 1e6:.2f}", "+".join(ly.fused),
                  str(tie_of[ly.name]) if ly.name in tie_of else "")
    console.print(t)
    console.print(f"{len(inv)} quantizable layers, {inv.total_macs / 1e9:.3f} GMACs, "
                  f"{sum(ly.params for ly in inv):,} params, {len(inv.tie_groups)} tie groups")
    for i, g in enumerate(inv.tie_groups):
        console.print(f"  tie {i}: {', '.join(g)}")


@app.command()
def cost(
    model: str = typer.Option(..., help="registered model name"),
    policy: Path = typer.Option(..., help="policy JSON (lcpaq.policy/1)"),
    input_size: str | None = typer.Option(None, help="e.g. 1x3x224x224"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Model size and BOPs of a policy, per layer and total."""
    from lcpaq.costs import policy_costs
    from lcpaq.policy import Policy, format_bits

    _, inv = trace_model(model, input_size)
    pol = Policy.load(policy, layer_names=inv.names)
    rep = policy_costs(inv, pol)
    if json_out:
        emit_json({"size_bytes": rep.size_bytes, "bops": rep.bops,
                   "total_size_mb": rep.total_size_mb, "total_gbops": rep.total_gbops})
        return
    t = Table("layer", "bits", "size KB", "GBOPs", title=f"{model} under {policy}")
    for ly in inv:
        t.add_row(ly.name, format_bits(pol[ly.name]), f"{rep.size_bytes[ly.name] / 1e3:.1f}",
                  f"{rep.bops[ly.name] / 1e9:.3f}")
    t.add_row("total", pol.summary(), f"{rep.total_size_bytes / 1e3:.1f}", f"{rep.total_gbops:.3f}")
    console.print(t)
