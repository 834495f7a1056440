"""`lcpaq validate`, `lcpaq export` and `lcpaq demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()


def _calib_and_check(model: str, n_check: int = 256):
    """Calibration batches and a labelled check batch from the model's own data, if it has any."""
    import numpy as np

    from lcpaq.models import default_data, default_input_shape

    spec = default_data(model)
    if spec is None:  # torchvision architectures: random inputs (latency work, no labels)
        shp = default_input_shape(model)
        rng = np.random.default_rng(0)
        return [rng.standard_normal((8, *shp[1:])).astype(np.float32)], None, None
    from lcpaq.data import get_loader

    cal = [x.numpy() for i, (x, _) in zip(range(2), get_loader(spec, "train", batch_size=64), strict=False)]
    xs, ys = next(iter(get_loader(spec, "val", batch_size=n_check)))
    return cal, xs.numpy(), ys.numpy()


@app.command()
def validate(
    model: str = typer.Option(..., help="registered model name"),
    policy: Path = typer.Option(..., help="policy JSON"),
    hw: Path = typer.Option(..., help="device profile, e.g. hw_profiles/host-cpu-ort.toml"),
    table: Path = typer.Option(..., help="latency table made by `lcpaq profile` for this model"),
    weights: Path | None = typer.Option(None, help="state_dict to load"),
    threads: int | None = typer.Option(None, min=1, help="intra-op threads (default: the profile's)"),
    strict: bool = typer.Option(False, help="exit 1 when |error| exceeds --threshold-pct"),
    threshold_pct: float = typer.Option(5.0, min=0.0, help="flag threshold, %"),
    rounds: int = typer.Option(3, min=1, help="interleaved measurement rounds"),
    whole: str | None = typer.Option(None, help="how the policy is timed against the reference: warm "
                                     "(chunks after one untimed call: a model served alone) or stream (call "
                                     "by call after the reference); default the table's, else warm"),
    calibrate: bool = typer.Option(False, help="first measure uniform fp32/W8A8 whole models now and "
                                   "calibrate the table to them (absorbs drift and inter-layer ops)"),
    out: Path = typer.Option(Path("lcpaq-validate"), help="folder for validation.json and PNG"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Deploy a policy on the profile's runtime; measured vs predicted latency (and output check)."""
    from lcpaq.cli._checks import out_path, tracker_reachable
    from lcpaq.deploy.validate import calibrated_latency_model
    from lcpaq.deploy.validate import validate as run_validate
    from lcpaq.errors import ConfigError
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.profiler.backends.ort import WHOLE_MODES
    from lcpaq.profiler.hwprofile import load_profile

    hwp = load_profile(hw)  # bad profile -> ProfileError (exit 2) before any heavy work
    if whole is not None and whole not in WHOLE_MODES:
        raise ConfigError(f"--whole {whole}: use one of {', '.join(WHOLE_MODES)}")
    out_path(out, folder=True)
    m = get_model(model, weights=weights)
    pol = Policy_load(policy, m)
    if table.suffix != ".json":  # a block table (.json) names no profile
        from lcpaq.cli.profiler import read_checked

        t = read_checked(table)
        made_on = t.header.get("profile")
        if made_on and made_on != hwp.name:
            raise ConfigError(f"--table {table} was measured with profile '{made_on}', not '{hwp.name}' "
                              f"(--hw {hw}); pass the table profiled with --hw {hw}, or make one with "
                              f"`lcpaq profile --hw {hw} --model {model}`")
    tracker_reachable(hwp, hw)
    cal, xs, ys = _calib_and_check(model)
    lm = table
    if calibrate:
        with console.status("measuring uniform fp32 / W8A8 whole-model references..."):
            lm = calibrated_latency_model(m, hwp, table, input_shape=default_input_shape(model), calib=cal,
                                          rounds=rounds, model_name=model)
    with console.status(f"deploying on {hwp.backend} and measuring ({rounds} rounds)..."):
        rep = run_validate(m, pol, hwp, lm, threads=threads, strict_threshold_pct=threshold_pct,
                           calib=cal, check_inputs=xs, check_labels=ys, rounds=rounds, model_name=model,
                           input_shape=default_input_shape(model), whole=whole)
    out.mkdir(parents=True, exist_ok=True)
    rep.save(out / "validation.json")
    rep.plot(out / "predicted_vs_measured.png")
    if json_out:
        emit_json(rep.to_dict())
    else:
        print_report(rep)
        console.print(f"wrote {out / 'validation.json'} and {out / 'predicted_vs_measured.png'}")
    if strict and rep.flagged:
        raise typer.Exit(1)


def print_report(rep) -> None:
    from rich.table import Table

    t = Table("layer / edge", "predicted ms", "measured ms (profiler, wall)",
              title=f"{rep.model} on {rep.profile} ({rep.backend}, {rep.threads} thread(s), {rep.metric})")
    for k, v in rep.layers.items():
        p, m = v.get("predicted_ms"), v.get("measured_ms")
        t.add_row(k, "-" if p is None else f"{p:.4f}", "-" if m is None else f"{m:.4f}")
    console.print(t)
    flag = "[red]ABOVE THRESHOLD[/red]" if rep.flagged else "[green]within threshold[/green]"
    oc = rep.output_check
    console.print(
        f"whole model: predicted {rep.predicted_ms:.4f} ms, measured {rep.measured_ms:.4f} ms "
        f"(wall {rep.measured_wall_ms:.4f}, spread {rep.spread_pct:.1f} % over {len(rep.round_medians_ms)} "
        f"rounds, {rep.whole_mode}, {rep.reference} reference {rep.reference_ms:.4f} ms, ratio "
        f"{rep.relative:.4f}): error {rep.error_pct:+.2f} % (threshold ±{rep.threshold_pct:g} %) {flag}")
    if rep.table_reference_ms == rep.table_reference_ms:  # the table carries its reference's time
        console.print(
            f"in the table's time (reference {rep.table_reference_ms:.4f} ms then, {rep.reference_ms:.4f} ms now): "
            f"measured {rep.measured_table_ms:.4f} ms, error {rep.error_drift_free_pct:+.2f} % with the drift "
            f"divided out")
    if oc:
        console.print(f"outputs vs fake-quant: max abs err {oc['max_abs_err']:.4g} (|logit| max "
                      f"{oc['ref_abs_max']:.3g}), top-1 agreement {100 * oc['top1_agreement']:.2f} % on {oc['n']}")


@app.command()
def export(
    model: str = typer.Option(..., help="registered model name"),
    policy: Path = typer.Option(..., help="policy JSON"),
    format: str = typer.Option("onnx", "--format", help="onnx (QDQ) | kernels (torch state with int kernels)"),
    out: Path = typer.Option(..., help="output file (.onnx or .pt)"),
    weights: Path | None = typer.Option(None, help="state_dict to load"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Export a model under a policy and check the exported outputs against the fake-quant model."""
    from lcpaq.cli._checks import out_path
    from lcpaq.deploy.export import FORMATS, export_model
    from lcpaq.errors import ConfigError
    from lcpaq.models import get_model

    if format not in FORMATS:
        raise ConfigError(f"--format {format}: use one of {', '.join(FORMATS)}")
    out_path(out)
    pol = Policy_load(policy, get_model(model, weights=weights))
    res = export_model(model, pol, format, out, weights=weights, calib_check=_calib_and_check(model))
    if json_out:
        emit_json(res)
        return
    console.print(f"wrote {res['path']} ({res['bytes']} bytes, {format}); outputs vs fake-quant: "
                  f"max abs err {res['check']['max_abs_err']:.4g}, top-1 agreement "
                  f"{100 * res['check']['top1_agreement']:.2f} %")


def Policy_load(path: Path, model=None):  # noqa: N802 - tiny indirection keeps imports lazy
    """The policy at ``path``, checked against ``model``'s quantizable layers when given (so an
    error names the file)."""
    from lcpaq.policy import Policy

    if model is None:
        return Policy.load(path)
    from lcpaq.quant import quantizable_names

    return Policy.load(path, layer_names=quantizable_names(model))


@app.command()
def demo(
    out: Path = typer.Option(Path("lcpaq-demo-report"), help="report folder"),
    quick: bool = typer.Option(False, help="small settings (for tests, ~1 min)"),
    backend: str | None = typer.Option(None, help="ort | lcpaq-kernels (default: kernels if built)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The main job on the embedded model: profile -> sensitivity -> search -> KD -> export -> validate."""
    import contextlib

    from lcpaq.cli._checks import out_path, stdout_to_stderr
    from lcpaq.deploy.demo import run_demo
    from lcpaq.errors import ConfigError

    if backend is not None and backend not in ("ort", "lcpaq-kernels"):
        raise ConfigError(f"--backend {backend}: use ort or lcpaq-kernels (or leave it out)")
    out_path(out, folder=True)
    with stdout_to_stderr() if json_out else contextlib.nullcontext():  # progress and banners
        summary = run_demo(out, quick=quick, backend=backend, console=console)
    if json_out:
        emit_json(summary)
