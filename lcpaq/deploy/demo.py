"""``lcpaq demo``: the whole loop on the embedded model, each stage one function over library verbs.

profile this host (lcpaq kernels if built: segment units cut from the converted model,
lcpaq.profiler.backends.kernels_check; else ONNX Runtime fp32-vs-int8 with the block model of
lcpaq.profiler.blocks, cut from the graphs validate deploys) -> sensitivity ->
search under a latency budget between the fastest and slowest uniform policy plus a size budget
-> brief KD fine-tune -> export (ONNX QDQ, checked) and validate (fp32, W8A8, chosen) -> one
summary table and a report folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from lcpaq.errors import InfeasibleBudgetError
from lcpaq.policy import Policy, atomic_write_text, format_bits, parse_bits_list

MODEL = "mnist_resnet"
DATA = "mnist5k"
CANDIDATES = {"lcpaq-kernels": "w2a8,w4a8,w8a8,fp32", "ort": "w4a8,w8a8,fp32"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    quick: bool = False
    probes: int = 60
    finetune_epochs: int = 1
    finetune_steps: int | None = None
    pareto_points: int = 8
    rounds: int = 3
    measure: dict[str, int] = dataclasses.field(default_factory=dict)  # MeasureSettings overrides
    whole_rows: int | None = None  # ORT block model: designed policies also timed whole (None: all)
    extra_policies: int = 12  # kernels segment model: random policies profiled beyond the designed ones

    @staticmethod
    def make(quick: bool) -> DemoSettings:
        if quick:
            return DemoSettings(True, probes=6, finetune_epochs=1, finetune_steps=6, pareto_points=3,
                                rounds=2, measure={"warmup": 2, "number": 3, "repeat": 5}, whole_rows=24,
                                extra_policies=6)
        return DemoSettings(False, probes=30, finetune_epochs=1, finetune_steps=40, pareto_points=8,
                            rounds=3, measure={})


def _progress(console: Any):
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


def choose_backend(requested: str | None) -> str:
    """lcpaq kernels where built (bit-width changes the compute), else ORT fp32-vs-int8."""
    if requested:
        return requested
    try:
        from lcpaq.kernels import status

        return "lcpaq-kernels" if status().loaded else "ort"
    except Exception:  # noqa: BLE001 - any import/build problem means "no kernels"
        return "ort"


def stage_hw_profile(backend: str, st: DemoSettings) -> Any:
    """The device profile for this host and backend (hw_profiles/*.toml when present)."""
    from lcpaq.profiler.backend import MeasureSettings
    from lcpaq.profiler.hwprofile import HwProfile, load_profile

    fname = {"lcpaq-kernels": "host-cpu-kernels.toml", "ort": "host-cpu-ort.toml"}[backend]
    path = Path(__file__).resolve().parents[2] / "hw_profiles" / fname
    cands = parse_bits_list(CANDIDATES[backend])
    if path.is_file():
        hw = load_profile(path)
    else:
        hw = HwProfile(name=fname[:-5], version="1", backend=backend, target="", threads=1, candidates=cands,
                       settings=MeasureSettings())
    settings = dataclasses.replace(hw.settings, threads=1, **st.measure)
    return dataclasses.replace(hw, candidates=cands, settings=settings)


def stage_profile(inventory: Any, hw: Any, out: Path, prog: Any) -> Path:
    """Measure every unit of the embedded model on this host into ``out/latency_table.jsonl``."""
    from lcpaq.errors import TableSetupError
    from lcpaq.profiler.run import profile

    task = prog.add_task(f"profile ({hw.backend})", total=None, info="")

    def cb(done: int, total: int, name: str) -> None:
        prog.update(task, completed=done, total=total, info=name)

    path = out / "latency_table.jsonl"
    try:  # an interrupted demo resumes its table ...
        table = profile(inventory, hw, path, candidates=hw.candidates, progress=cb)
    except TableSetupError:  # ... unless it was measured on another setup: keep it aside, start again
        from lcpaq.profiler.table import keep_previous

        prog.update(task, info=f"previous table (another setup) kept as {keep_previous(path).name}")
        table = profile(inventory, hw, path, candidates=hw.candidates, progress=cb)
    prog.update(task, info="done")
    return table


def stage_profile_blocks(fp32: Any, hw: Any, st: DemoSettings, out: Path, prog: Any) -> Any:
    """ORT: time every block of the embedded model in every context of the designed policies, and
    those policies whole (isolation correction), all cut from :func:`lcpaq.deploy.qdq.export_policy`
    graphs, i.e. what validate measures; the table goes to ``out/latency_blocks.json``. The block
    model predicted mnist_resnet's 20 benchmark policies within 0.7 % median / 2.9 % max (session 5),
    the per-layer table calibrated to uniform references within ~4-12 %."""
    import dataclasses
    import functools

    from lcpaq.deploy.qdq import export_policy, torch_to_onnx
    from lcpaq.profiler.blocks import profile_blocks

    task = prog.add_task("profile blocks (ort)", total=None, info="")
    cal, _, _ = _calib_check(8)
    # a 0.1 ms model: 40 calls per sample (bench_predict's setting for it), whatever the profile says
    settings = dataclasses.replace(hw.settings, number=max(hw.settings.number, 20 if st.quick else 40))
    table, lm = profile_blocks(fp32, (1, 1, 28, 28), hw.candidates, settings=settings, calib=[cal[0][:16]],
                               export=functools.partial(export_policy, float_onnx=torch_to_onnx(fp32, (1, 1, 28, 28))),
                               n_whole=st.whole_rows,
                               progress=lambda i, n: prog.update(task, completed=i, total=n, info="designed policies"))
    table.save(out / "latency_blocks.json")
    prog.update(task, info=f"{len(table.ms)} units, {len(table.whole)} whole, correction "
                           f"{lm.meta['correction_features']}")
    return lm


def stage_profile_segments(fp32: Any, hw: Any, st: DemoSettings, out: Path, prog: Any) -> tuple[Any, Any]:
    """lcpaq kernels: time the segments of the converted model (each layer's module call with its
    quantize, kernel, epilogue, unfolded BN/ReLU/add, keyed by its fusion partners' class and the class
    of the layer run before it) inside whole runs of designed + random policies, and those policies
    whole (A B against uniform W8A8);
    fit the additive model + correction (:func:`lcpaq.profiler.backends.kernels_check.profile_segments`).
    Returns (model, uncorrected sum of segments); the table goes to ``out/latency_segments.json``.
    Session 7: 20 random mixed policies of the embedded model within ~1-2 % median (notes/deploy.md);
    the per-layer table calibrated to fp32/W8A8 missed by up to -12 % before."""
    from lcpaq.profiler.backends.kernels_check import fit_segment_model, profile_segments
    from lcpaq.profiler.predict import with_segment_reference

    task = prog.add_task("profile segments (kernels)", total=None, info="")
    cal, _, _ = _calib_check(8)
    table, lm = profile_segments(fp32, (1, 1, 28, 28), hw.candidates, settings=hw.settings, calib=[cal[0][:16]],
                                 extra=st.extra_policies,
                                 progress=lambda i, n: prog.update(task, completed=i, total=n, info="policies"))
    table.save(out / "latency_segments.json")
    prog.update(task, info=f"{lm.meta['units']} units, {len(table.rows)} policies whole, correction "
                           f"{lm.meta['correction']}")
    return with_segment_reference(lm, table), fit_segment_model(table, hw.candidates, correction="none")


def stage_reference(fp32: Any, lm: Any, hw: Any, st: DemoSettings, out: Path, prog: Any) -> Any:
    """Measure uniform fp32 and W8A8 whole models now; calibrate the table's model to them.

    The VM drifts 10-25 % within an hour and isolated units miss what the whole model runs between
    layers (lcpaq.profiler.fidelity.calibrate_to_references spreads the per-class difference over
    the units). Mixed policies stay out of sample: they are the real test of the prediction.
    """
    from lcpaq.deploy.validate import validate
    from lcpaq.profiler.fidelity import calibrate_to_references
    from lcpaq.quant import quantizable_names

    task = prog.add_task("whole-model references", total=2, info="")
    names = quantizable_names(fp32)
    cal, _, _ = _calib_check(8)
    refs, raw = {}, {}
    for pair in ((32, 32), (8, 8)):
        rep = validate(fp32, Policy.uniform(names, *pair), hw, lm, calib=cal, rounds=st.rounds, per_layer=False,
                       model_name=MODEL, input_shape=(1, 1, 28, 28))
        refs[pair], raw[format_bits(pair)] = rep.measured_ms, rep.to_dict()
        prog.update(task, advance=1, info=f"{format_bits(pair)} {rep.measured_ms:.3f} ms")
    atomic_write_text(out / "references.json", json.dumps(raw, indent=2, default=float))
    return calibrate_to_references(lm, refs)


def stage_sensitivity(model: Any, cands: tuple, st: DemoSettings, out: Path, prog: Any) -> Any:
    """Hutchinson sensitivity on two training batches; saved as sensitivity.json."""
    from lcpaq.data import get_loader
    from lcpaq.sensitivity import SensitivityConfig, estimate_sensitivity

    task = prog.add_task("sensitivity (Hutchinson)", total=st.probes, info="")
    cfg = SensitivityConfig(batches=2, min_probes=min(10, st.probes), model_name=MODEL, data_name=DATA)
    rep = estimate_sensitivity(
        model, get_loader(DATA, "train", batch_size=32), candidates=cands, probes=st.probes, tol=0.1,
        seed=0, config=cfg, progress=lambda i, r: prog.update(task, completed=i, info=f"rel.se {r:.3f}"))
    prog.update(task, completed=st.probes)
    rep.save(out / "sensitivity.json")
    return rep


def uniform_latencies(lm: Any, names: list[str], cands: tuple) -> dict[tuple, float]:
    return {p: lm.predict(Policy.uniform(names, *p)) for p in cands}


def stage_search(inventory: Any, sens: Any, lm: Any, cands: tuple, st: DemoSettings, out: Path,
                 prog: Any) -> tuple[Any, dict[str, float]]:
    """ILP under a latency budget midway between the fastest and slowest uniform policy + a size budget."""
    from lcpaq.costs import policy_costs
    from lcpaq.search import Budgets, build_problem, pareto_frontier, search

    task = prog.add_task("search (ILP + Pareto)", total=2, info="")
    names = list(inventory.names)
    unif = uniform_latencies(lm, names, cands)
    fast, slow = min(unif.values()), max(unif.values())
    sizes = {p: policy_costs(inventory, Policy.uniform(names, *p)).total_size_mb for p in cands}
    q = [p for p in cands if 32 not in p]
    size_budget = min(sizes[p] for p in q) + 0.6 * (max(sizes[p] for p in q) - min(sizes[p] for p in q))
    budgets = {"max_latency_ms": fast + 0.5 * (slow - fast), "max_size_mb": size_budget}
    omega = sens.omega_table(cands)
    res = None
    for relax in (1.0, 1.25, 1.6, 2.5):
        b = Budgets(max_latency_ms=budgets["max_latency_ms"] * relax, max_size_mb=budgets["max_size_mb"] * relax)
        prob = build_problem(inventory, omega, candidates=cands, budgets=b, latency=lm)
        try:
            res = search(prob, solver="ilp", time_limit_s=30.0)
            budgets = {"max_latency_ms": b.max_latency_ms, "max_size_mb": b.max_size_mb, "relaxed_by": relax}
            res = _within_full_model(res, inventory, omega, cands, b, lm)
            break
        except InfeasibleBudgetError:
            continue
    if res is None:
        raise InfeasibleBudgetError("demo: no policy meets even 2.5x the budgets; check the latency table")
    prog.update(task, advance=1, info=res.status)
    try:
        fr = pareto_frontier(prob, "max_latency_ms", points=st.pareto_points)
        fr.plot(out / "pareto.png", chosen=res)
        fr.to_csv(out / "pareto.csv")
    except Exception as e:  # noqa: BLE001 - the frontier is a figure, the chosen policy stands
        (out / "pareto.txt").write_text(f"Pareto frontier failed: {type(e).__name__}: {e}\n")
    res.policy.save(out / "policy.json")
    atomic_write_text(out / "search.json", json.dumps({
        "status": res.status, "objective": res.objective, "costs": res.costs, "budgets": budgets,
        "uniform_predicted_ms": {format_bits(p): v for p, v in unif.items()},
        "solve_time_s": res.solve_time_s}, indent=2, default=float))
    prog.update(task, advance=1, info=f"{res.costs.get('latency_ms', 0):.3f} ms")
    return res, budgets


def _within_full_model(res: Any, inventory: Any, omega: Any, cands: tuple, b: Any, lm: Any) -> Any:
    """The ILP reads the additive part of the latency model; a block model's joint (group) terms are
    outside it. Tighten the ILP's latency budget by the excess until the full prediction of the
    chosen policy meets the budget too (a few rounds; the joint terms are small)."""
    import dataclasses

    from lcpaq.search import build_problem, search

    ilp_b = b
    for _ in range(6):
        over = lm.predict(res.policy) - b.max_latency_ms
        if over <= 1e-9 * b.max_latency_ms or not lm.groups:
            return res
        ilp_b = dataclasses.replace(ilp_b, max_latency_ms=ilp_b.max_latency_ms - over - 1e-6)
        res = search(build_problem(inventory, omega, candidates=cands, budgets=ilp_b, latency=lm), solver="ilp",
                     time_limit_s=30.0)
    if lm.predict(res.policy) > b.max_latency_ms * (1 + 1e-9):
        raise InfeasibleBudgetError(f"demo: no policy found whose full predicted latency meets "
                                    f"{b.max_latency_ms:.4f} ms; raise the budget")
    return res


def stage_finetune(policy: Policy, st: DemoSettings, out: Path, prog: Any) -> tuple[Any, Any]:
    """Brief KD fine-tune of the chosen policy; returns (fine-tuned fake-quant model, result)."""
    from lcpaq.data import get_loader
    from lcpaq.finetune import finetune
    from lcpaq.models import get_model

    model = get_model(MODEL)
    train = get_loader(DATA, "train", batch_size=64, shuffle=True, seed=0)
    val = get_loader(DATA, "val", batch_size=250)
    steps = st.finetune_steps or len(train)
    task = prog.add_task("KD fine-tune", total=steps * st.finetune_epochs, info="")

    def cb(ev: dict[str, Any]) -> None:
        if ev["event"] == "step":
            prog.update(task, completed=(ev["epoch"] - 1) * steps + ev["step"],
                        info=f"loss {ev['loss']:.3f}")
        else:
            prog.update(task, info=f"val {ev['val_acc']:.2f} %")

    res = finetune(model, policy, train, val, epochs=st.finetune_epochs, max_steps_per_epoch=st.finetune_steps,
                   checkpoint_dir=None, seed=0, progress=cb)
    atomic_write_text(out / "finetune.json", json.dumps(res.to_dict(), indent=2, default=float))
    return model.eval(), res


def _calib_check(n_check: int) -> tuple[list, Any, Any]:
    from lcpaq.data import get_loader

    cal = [x.numpy() for _, (x, _) in zip(range(2), get_loader(DATA, "train", batch_size=64), strict=False)]
    xs, ys = next(iter(get_loader(DATA, "val", batch_size=n_check)))
    return cal, xs.numpy(), ys.numpy()


def stage_validate(fp32: Any, tuned: Any, policy: Policy, hw: Any, table: Any, st: DemoSettings, out: Path,
                   prog: Any) -> dict[str, Any]:
    """Export the chosen model to ONNX QDQ (checked) and validate fp32, W8A8 and the chosen policy."""
    import numpy as np

    from lcpaq.deploy.runtime import check_outputs, deploy
    from lcpaq.deploy.validate import plot_validation, validate
    from lcpaq.quant import quantizable_names

    task = prog.add_task("export + validate", total=4, info="")
    cal, xs, ys = _calib_check(256 if st.quick else 1000)
    dep = deploy(tuned, "ort", (1, 1, 28, 28), calib_inputs=cal)
    (out / "model_qdq.onnx").write_bytes(dep.artifact or b"")
    onnx_check = check_outputs(dep, tuned, xs, ys)
    prog.update(task, advance=1, info="onnx exported")
    names = quantizable_names(fp32)
    runs = {"fp32": (fp32, Policy.uniform(names, 32, 32)), "W8A8": (fp32, Policy.uniform(names, 8, 8)),
            "mixed": (tuned, policy)}
    reports = {}
    for label, (m, pol) in runs.items():
        rep = validate(m, pol, hw, table, calib=cal, check_inputs=xs, check_labels=ys, rounds=st.rounds,
                       model_name=MODEL, per_layer=label == "mixed", input_shape=(1, 1, 28, 28))
        rep.save(out / f"validation_{label}.json")
        reports[label] = rep
        prog.update(task, advance=1, info=f"{label}: {rep.error_pct:+.1f} % ({_pct(rep.error_drift_free_pct)} "
                                          f"drift-free)")
    plot_validation(list(reports.values()), out / "predicted_vs_measured.png", labels=list(reports))
    del np
    return {"reports": reports, "onnx_check": onnx_check}


def run_demo(out: str | Path = "lcpaq-demo-report", *, quick: bool = False, backend: str | None = None,
             console: Any = None) -> dict[str, Any]:
    """Run every stage and write the report folder; returns the summary (also in summary.json).

    >>> # run_demo("lcpaq-demo-report", quick=True)
    """
    import warnings

    import torch

    from lcpaq.costs import policy_costs
    from lcpaq.graph import trace
    from lcpaq.models import accuracy, get_model
    from lcpaq.profiler.predict import latency_model

    # lcpaq.quant's act_qparams reads a learnable scale with float(); harmless, but it floods the bars
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = DemoSettings.make(quick)
    backend = choose_backend(backend)
    if console is None:
        from lcpaq.cli._app import make_console

        console = make_console()
    torch.manual_seed(0)
    fp32 = get_model(MODEL)
    inventory = trace(fp32, (1, 1, 28, 28), name=MODEL)
    hw = stage_hw_profile(backend, st)
    stages: dict[str, str] = {}
    with _progress(console) as prog:
        if hw.backend == "ort":  # block units: the whole model within a few %, no calibration step
            lm = lm_raw = stage_profile_blocks(fp32, hw, st, out, prog)
            stages["profile"] = "real: ort block units + whole-model correction (lcpaq.profiler.blocks)"
        elif hw.backend == "lcpaq-kernels":  # segment units: what convert() runs, timed in sequence
            lm, lm_raw = stage_profile_segments(fp32, hw, st, out, prog)
            stages["profile"] = ("real: lcpaq-kernels segment units (converted model, in sequence) + whole-model "
                                 "correction (lcpaq.profiler.backends.kernels_check)")
        else:
            table = stage_profile(inventory, hw, out, prog)
            stages["profile"] = f"real: {hw.backend} on this host"
            lm_raw = latency_model(table, inventory, hw.candidates)
            lm = stage_reference(fp32, lm_raw, hw, st, out, prog)
            stages["reference"] = "real: uniform fp32 + W8A8 measured, table calibrated to them"
        sens = stage_sensitivity(fp32, hw.candidates, st, out, prog)
        stages["sensitivity"] = f"real: {sens.method}, {sens.probes} probes"
        res, budgets = stage_search(inventory, sens, lm, hw.candidates, st, out, prog)
        stages["search"] = f"real: ILP {res.status}"
        tuned, ft = stage_finetune(res.policy, st, out, prog)
        stages["finetune"] = f"real: KD {ft.epochs} epoch(s)"
        val = stage_validate(get_model(MODEL), tuned, res.policy, hw, lm, st, out, prog)
        stages["validate"] = f"real: {hw.backend}"
    reports = val["reports"]
    from lcpaq.data import get_loader
    from lcpaq.quant import apply_policy, quantizable_names

    vl = get_loader(DATA, "val", batch_size=250)
    w8 = apply_policy(get_model(MODEL), Policy.uniform(quantizable_names(fp32), 8, 8),
                      calib_loader=get_loader(DATA, "train", batch_size=64), calib_batches=2)
    acc = {"fp32": accuracy(fp32, vl), "W8A8": accuracy(w8, vl), "mixed": ft.qat_acc}
    rows = []
    for label, rep in reports.items():
        pol = Policy.from_dict(rep.policy)
        c = policy_costs(inventory, pol)
        rows.append({"policy": label, "accuracy_pct": acc[label], "size_kb": c.total_size_bytes / 1e3,
                     "gbops": c.total_gbops, "predicted_ms": rep.predicted_ms, "measured_ms": rep.measured_ms,
                     "error_pct": rep.error_pct, "error_drift_free_pct": rep.error_drift_free_pct,
                     "deployed_acc_pct": rep.output_check.get("deployed_acc"),
                     "raw_table_predicted_ms": lm_raw.predict(pol),
                     "in_sample": label != "mixed"})
    summary = {"model": MODEL, "backend": hw.backend, "profile": hw.name, "quick": quick, "budgets": budgets,
               "chosen_policy": {k: format_bits(v) for k, v in res.policy.items()}, "rows": rows,
               "finetune": {"ptq_acc": ft.ptq_acc, "qat_acc": ft.qat_acc}, "onnx_check": val["onnx_check"],
               "stages": stages, "wall_s": time.perf_counter() - t0, "report_dir": str(out)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    _print_summary(console, summary)
    _write_markdown(out / "summary.md", summary)
    return summary


def _print_summary(console: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table("policy", "accuracy %", "size KB", "GBOPs", "predicted ms", "measured ms", "error %",
              "drift-free %", "raw table ms",
              title=f"lcpaq demo: {s['model']} on {s['profile']} ({s['backend']}), {s['wall_s']:.0f} s")
    for r in s["rows"]:
        t.add_row(r["policy"], f"{r['accuracy_pct']:.2f}", f"{r['size_kb']:.1f}", f"{r['gbops']:.4f}",
                  f"{r['predicted_ms']:.4f}", f"{r['measured_ms']:.4f}",
                  f"{r['error_pct']:+.1f}" + (" (ref)" if r["in_sample"] else ""), _pct(r["error_drift_free_pct"]),
                  f"{r['raw_table_predicted_ms']:.4f}")
    console.print(t)
    if any(r["error_drift_free_pct"] == r["error_drift_free_pct"] for r in s["rows"]):
        console.print("drift-free = the prediction against the measurement in the table's time: each policy timed "
                      "interleaved with the uniform W8A8 model the table was fitted against, their ratio x that "
                      "model's time when the table was made (the machine's drift since profiling divided out)")
    if s["backend"] == "ort":
        console.print("predicted = block model (every block timed in its context + isolation correction fitted on "
                      "whole-model times of the designed policies and of uniform fp32/W8A8, measured earlier in this "
                      "run: ref rows are in its training rows, mixed is out of sample); raw table ms = the same model")
    elif s["backend"] == "lcpaq-kernels":
        console.print("predicted = segment units of the converted model (timed in sequence, keyed by the fusion "
                      "partners' class and the class of the layer run before) + a correction fitted on whole-model "
                      "times of the profiled policies, uniform ones included (ref rows: in its training rows; mixed: "
                      "out of sample); raw table ms = the sum of the segments without the correction")
    else:
        console.print("predicted = table calibrated to fp32/W8A8 whole-model references measured earlier in this run "
                      "(ref rows: re-measured references; mixed: out of sample); raw table ms = uncalibrated sum of "
                      "units")
    oc = s["onnx_check"]
    console.print(f"chosen: {' '.join(f'{k}={v}' for k, v in s['chosen_policy'].items())}")
    console.print(f"ONNX QDQ vs fake-quant: max abs err {oc['max_abs_err']:.3g}, top-1 agreement "
                  f"{100 * oc['top1_agreement']:.2f} %; report in {s['report_dir']}/")


def _pct(v: float) -> str:
    return "-" if v != v else f"{v:+.1f}"  # nan: the table names no reference


def _write_markdown(path: Path, s: dict[str, Any]) -> None:
    lines = [f"# lcpaq demo: {s['model']} on {s['profile']} ({s['backend']})", "",
             "| policy | accuracy % | size KB | GBOPs | predicted ms | measured ms | error % | drift-free % | raw table ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['policy']} | {r['accuracy_pct']:.2f} | {r['size_kb']:.1f} | {r['gbops']:.4f} | "
                     f"{r['predicted_ms']:.4f} | {r['measured_ms']:.4f} | {r['error_pct']:+.1f} | "
                     f"{_pct(r['error_drift_free_pct'])} | {r['raw_table_predicted_ms']:.4f} |")
    lines += ["", f"budgets: {s['budgets']}", f"stages: {s['stages']}", f"wall: {s['wall_s']:.0f} s", ""]
    atomic_write_text(path, "\n".join(lines))
