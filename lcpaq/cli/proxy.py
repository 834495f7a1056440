"""`lcpaq finetune` (KD QAT of a policy) and `lcpaq tune` (low-cost proxy hyperparameter search)."""

from __future__ import annotations

from pathlib import Path

import typer

from lcpaq.cli._app import app, emit_json, make_console

console = make_console()


@app.command()
def finetune(
    model: str = typer.Option(..., help="registered model name"),
    policy: Path = typer.Option(..., help="policy JSON (from `lcpaq search` or `lcpaq tune`)"),
    data: str = typer.Option(..., help="mnist5k | digits | imagefolder:PATH"),
    weights: Path | None = typer.Option(None, help="fp32 state_dict to start from"),
    epochs: int = typer.Option(3, min=0),
    kd_temp: float = typer.Option(4.0, help="distillation temperature T"),
    kd_alpha: float = typer.Option(0.7, min=0.0, max=1.0, help="weight of the KD term (1 - alpha on cross-entropy)"),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(64, min=1),
    calib: str = typer.Option("minmax", help="activation calibration: minmax | percentile | mse"),
    checkpoint_dir: Path | None = typer.Option(None, help="per-epoch checkpoints (default: OUT.ckpt/)"),
    resume: bool = typer.Option(True, help="continue from the checkpoint if one exists"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., help="fine-tuned quantized model (.pt)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """QAT with knowledge distillation from the fp32 model; reports fp32, PTQ and QAT accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lcpaq.cli._checks import data_fits, out_path, positive
    from lcpaq.data import get_loader
    from lcpaq.errors import ConfigError
    from lcpaq.finetune import finetune as run
    from lcpaq.finetune import save_quantized
    from lcpaq.models import get_model
    from lcpaq.policy import Policy
    from lcpaq.quant import CALIB_METHODS, quantizable_names

    positive(kd_temp, "--kd-temp")
    positive(lr, "--lr")
    if calib not in CALIB_METHODS:
        raise ConfigError(f"--calib {calib}: use one of {', '.join(CALIB_METHODS)}")
    out_path(out)
    ckpt = out_path(checkpoint_dir or out.with_name(out.name + ".ckpt"), "--checkpoint-dir", folder=True)
    train = get_loader(data, "train", batch_size=batch_size, shuffle=True, seed=seed)
    data_fits(model, data, train.dataset)
    m = get_model(model, weights=weights)
    pol = Policy.load(policy, layer_names=quantizable_names(m))
    val = get_loader(data, "val", batch_size=256)
    with Progress(TextColumn("epoch {task.fields[ep]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]} train {task.fields[acc]} val {task.fields[val]}"),
                  TimeElapsedColumn(), console=make_console(stderr=True), transient=json_out) as prog:
        task = prog.add_task("kd", total=None, ep="-", loss="-", acc="-", val="-")

        def on(ev: dict) -> None:
            if ev["event"] == "step":
                prog.update(task, total=ev["steps"], completed=ev["step"], ep=f"{ev['epoch']}/{ev['epochs']}",
                            loss=f"{ev['loss']:.4f}", acc=f"{ev['train_acc']:.2f}%")
            else:
                prog.update(task, val=f"{ev['val_acc']:.2f}%")
        try:
            res = run(m, pol, train, val, epochs=epochs, kd_temp=kd_temp, kd_alpha=kd_alpha, lr=lr,
                      checkpoint_dir=ckpt, resume=resume, calib_method=calib, seed=seed, progress=on)
        except KeyboardInterrupt:
            prog.stop()
            console.print(f"interrupted: finished epochs are checkpointed in {ckpt}; run the same command "
                          "again to continue from the last one")
            raise typer.Exit(130) from None
    save_quantized(m, pol, out, meta={"model": model, "data": data} | res.to_dict())
    if json_out:
        emit_json(res.to_dict() | {"out": str(out)})
        return
    from rich.table import Table

    t = Table("fp32 %", "PTQ %", "QAT (KD) %", "epochs", "resumed from", "wall s",
              title=f"{model} on {data}: {pol.summary()}")
    t.add_row(f"{res.fp32_acc:.2f}", f"{res.ptq_acc:.2f}", f"{res.qat_acc:.2f}", str(res.epochs),
              str(res.resumed_from), f"{res.wall_s:.1f}")
    console.print(t)
    console.print(f"wrote {out} (checkpoints in {ckpt})")


@app.command()
def tune(
    model: str = typer.Option(..., help="registered model name"),
    data: str = typer.Option(..., help="mnist5k | digits | imagefolder:PATH"),
    sensitivity: Path = typer.Option(..., help="report from `lcpaq sensitivity`"),
    weights: Path | None = typer.Option(None),
    table: Path | None = typer.Option(None, help="latency table (for --max-latency-ms)"),
    max_latency_ms: float | None = typer.Option(None),
    max_size_mb: float | None = typer.Option(None),
    max_gbops: float | None = typer.Option(None),
    w_bits: str = typer.Option("2,4,8", help="weight-bit candidates"),
    a_bit_sets: str = typer.Option("8;4,8", help="activation-bit candidate sets to try, ';'-separated"),
    proxy_fraction: float = typer.Option(0.04, help="share of the training data used as proxy"),
    trials: int = typer.Option(12, min=1, help="knob settings sampled from the grid"),
    metric: str = typer.Option("margin", help="proxy score: margin | kl | acc"),
    eta: int = typer.Option(2, min=2, help="successive-halving reduction factor"),
    proxy_calibration: str = typer.Option(
        "fp32", help="activation ranges: fp32 (from the fp32 model, layers shared across trials: fast) | sequential"),
    proxy_weights: str = typer.Option("maxabs", help="proxy weight quantizer: maxabs | refit (needs fp32)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., help="best policy JSON"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Tune the search's knobs (Ω variant, a-bits, calibration, Pareto point) on a small proxy set."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lcpaq.cli._checks import data_fits, out_path, positive, stdout_to_stderr
    from lcpaq.data import get_dataset
    from lcpaq.errors import ConfigError
    from lcpaq.graph import trace_named
    from lcpaq.proxy import DEFAULT_SPACE, PROXY_METRICS, ProxyEvaluator, proxy_subset
    from lcpaq.proxy import tune as run
    from lcpaq.search import Budgets
    from lcpaq.sensitivity import SensitivityReport

    for value, option in ((max_latency_ms, "--max-latency-ms"), (max_size_mb, "--max-size-mb"),
                          (max_gbops, "--max-gbops")):
        positive(value, option)
    if metric not in PROXY_METRICS:
        raise ConfigError(f"--metric {metric}: use one of {', '.join(PROXY_METRICS)}")
    out_path(out)
    try:
        wb = tuple(int(b) for b in w_bits.split(","))
    except ValueError:
        raise ConfigError(f"--w-bits '{w_bits}': write weight bits like '2,4,8'") from None
    if not wb or not all(2 <= b <= 8 for b in wb):
        raise ConfigError(f"--w-bits '{w_bits}': each weight bit-width must be 2..8, e.g. '2,4,8'")
    train_ds = get_dataset(data, "train")
    data_fits(model, data, train_ds)
    m, inv = trace_named(model, weights=str(weights) if weights else None)
    rep = SensitivityReport.load(sensitivity)
    rep.check_layers(inv.names)
    latency = None
    try:
        a_sets = tuple(tuple(sorted(int(b) for b in grp.split(","))) for grp in a_bit_sets.split(";") if grp.strip())
    except ValueError:
        raise ConfigError(f"--a-bit-sets '{a_bit_sets}': write e.g. '8;4,8'") from None
    space = dict(DEFAULT_SPACE) | {"a_bits": a_sets}
    if table is not None:
        from lcpaq.profiler.predict import latency_model

        a_all = sorted({a for s in a_sets for a in s})
        from lcpaq.cli.profiler import load_latency

        latency = latency_model(load_latency(table), inv, [(w, a) for w in wb for a in a_all])
    elif max_latency_ms is not None:
        raise ConfigError("--max-latency-ms needs a measured latency table: pass --table PATH")
    budgets = Budgets(max_size_mb=max_size_mb, max_gbops=max_gbops, max_latency_ms=max_latency_ms)
    sub = proxy_subset(train_ds, fraction=proxy_fraction, seed=seed)
    ev = ProxyEvaluator(m, *sub.tensors(), calibration=proxy_calibration, weights=proxy_weights, inventory=inv)
    with Progress(TextColumn("proxy trials"), BarColumn(), TextColumn("{task.completed} evaluated"),
                  TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=make_console(stderr=True), transient=json_out) as prog:
        task = prog.add_task("tune", total=None, last="")
        with stdout_to_stderr():  # progress and the C++ HiGHS banner go to stderr, results to stdout
            res = run(m, inv, rep, ev, budgets=budgets, latency=latency, trials=trials, metric=metric, eta=eta,
                      space=space, seed=seed, w_bits=wb, progress=lambda t: prog.update(
                          task, advance=1, last=f"{t.knobs.label()} n={t.n} {metric}={t.scores[metric]:.4f}"))
    best = res.best
    assert best.policy is not None
    pol = type(best.policy)(best.policy.bits, meta={"tuned": best.knobs.label(), "metric": metric,
                                                   "proxy_share": sub.share})
    pol.save(out)
    if json_out:
        emit_json(res.to_dict() | {"proxy_share": sub.share, "out": str(out)})
        return
    from rich.table import Table

    t = Table("knobs", "policy", "n", "margin", "-KL", "acc %", "note",
              title=f"{model}: proxy {100 * sub.share:.1f}% of {data} ({len(sub.indices)} samples), "
                    f"{res.wall_s:.1f}s")
    for tr in sorted(res.trials, key=lambda t: (-t.n, -t.scores.get(metric, float("-inf")))):
        s = tr.scores
        t.add_row(tr.knobs.label(), tr.policy.summary() if tr.policy else "-", str(tr.n),
                  f"{s['margin']:.4f}" if s else "-", f"{s['kl']:.4g}" if s else "-",
                  f"{s['acc']:.1f}" if s else "-", "best" if tr is best else tr.error[:40])
    console.print(t)
    console.print(f"best: {best.knobs.label()} -> {out}")
