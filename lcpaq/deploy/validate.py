"""``validate(...)``: deploy a policy on a device profile's runtime and check the latency prediction.

Measured latency follows the profile's :class:`~lcpaq.profiler.backend.MeasureSettings` (calling
thread CPU time at 1 thread as the primary figure, wall time beside it). In each of ``rounds``
rounds the deployed policy is timed against a whole-model reference, interleaved in short chunks
(:func:`lcpaq.profiler.backends.ort.time_interleaved`): the fastest round's median is reported with
the spread across rounds, and ``relative`` = policy / reference. The VM drifts 10-25 % within an
hour, and a ratio to a model timed alongside holds where either time alone does not.

The reference is the one the table was fitted against when the table says so (block and kernels
segment tables: uniform W8A8, its median time when the table was made, and how the table's whole
rows were timed, ``meta["reference"]``); then the report also gives the measurement in the table's
time (``relative x`` that time) and the error against it, with the machine's drift since profiling
divided out. Otherwise the reference is the fp32 model. ``whole``: "warm" (chunks of ``number``
calls after one untimed call: the warm-loop latency of a model served alone) or "stream" (call by
call, each right after the reference: a stream of alternating models), default the table's.
The prediction is :meth:`lcpaq.latency.LatencyModel.predict` from the profiler's table.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcpaq.errors import ConfigError
from lcpaq.policy import Policy, atomic_write_text, format_bits

log = logging.getLogger(__name__)
REPORT_SCHEMA = "lcpaq.validation/2"  # /2: reference_fp32_ms -> reference, reference_ms; relative, drift-free


@dataclass(frozen=True)
class ValidationReport:
    model: str
    profile: str
    backend: str
    threads: int
    metric: str
    predicted_ms: float
    measured_ms: float  # fastest round's median, primary metric
    measured_wall_ms: float
    round_medians_ms: tuple[float, ...]
    spread_pct: float  # (max - min) / min over rounds
    reference: str  # the whole model timed interleaved with the policy: "fp32" or the table's ("w8a8")
    reference_ms: float  # its time in the same rounds (fastest round's median)
    relative: float  # policy / reference: median over the rounds of the median per-chunk ratio
    error_pct: float  # (predicted - measured) / measured * 100
    threshold_pct: float
    flagged: bool  # |error_pct| > threshold_pct
    whole_mode: str = "warm"  # how the two were interleaved (lcpaq.profiler.backends.ort.WHOLE_MODES)
    table_reference_ms: float = float("nan")  # the reference's time when the table was made
    measured_table_ms: float = float("nan")  # relative x table_reference_ms: measured, in the table's time
    error_drift_free_pct: float = float("nan")  # (predicted - measured_table_ms) / measured_table_ms * 100
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> predicted/measured ms
    output_check: dict[str, float] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"schema": REPORT_SCHEMA, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=float) + "\n")

    def plot(self, path: str | Path) -> Path:
        """Predicted-vs-measured PNG: whole model, plus per-layer bars where measured."""
        return plot_validation([self], path)


def _timed_rounds(dep: Any, ref: Any, settings: Any, rounds: int, chunk: dict[str, int]) -> list[dict[str, float]]:
    """Per round: the policy (``dep``) timed against the reference (``ref``), {ms, wall_ms, ref_ms,
    ref_wall_ms, rel}. Interleaved in chunks (``time_interleaved``, ``repeat`` chunks per round,
    ``chunk``: the whole mode's keywords) where both are timed through ``call``; a runtime's own
    timer (TVM's time_evaluator on a board, wall) times whole loops, reference then policy."""
    from lcpaq.profiler.backends.ort import time_interleaved

    out = []
    for _ in range(rounds):
        if dep.timer is None and ref.timer is None:
            out.append(time_interleaved(ref.call, dep.call, settings, rounds=settings.repeat, **chunk))
            continue
        r, q = (_own_timer(d, settings) for d in (ref, dep))
        out.append({"ms": q[0], "wall_ms": q[1], "ref_ms": r[0], "ref_wall_ms": r[1], "rel": q[0] / r[0]})
    return out


def _own_timer(dep: Any, settings: Any) -> tuple[float, float]:
    """(median primary ms, median wall ms): the runtime's own timer, else ``call`` in a loop."""
    from lcpaq.profiler.backends.ort import time_callable

    if dep.timer is not None:
        primary, wall = dep.timer(settings)
    else:
        cpu, wall = time_callable(dep.call, settings)
        primary = cpu if settings.metric == "thread_cpu" else wall
    return float(np.median(primary)), float(np.median(wall))


def _is_deployed(model: Any, policy: Policy) -> bool:
    from lcpaq.quant.api import policy_of

    try:
        return policy_of(model) == policy and any(
            hasattr(m, "act_quant") for m in model.modules())
    except Exception:  # noqa: BLE001 - any mismatch means "quantize it here"
        return False


def validate(
    model: Any,
    policy: Policy,
    hw_profile: Any,
    table: Any,
    *,
    threads: int | None = None,
    strict_threshold_pct: float = 5.0,
    input_shape: Sequence[int] | None = None,
    calib: Sequence[np.ndarray] = (),
    check_inputs: np.ndarray | None = None,
    check_labels: np.ndarray | None = None,
    rounds: int = 3,
    per_layer: bool = True,
    model_name: str = "",
    whole: str | None = None,
) -> ValidationReport:
    """Deploy ``model`` under ``policy`` on ``hw_profile``'s backend; predicted vs measured latency.

    ``model``: a registered name or an nn.Module (fp32, or already quantized at ``policy`` and
    calibrated, e.g. after fine-tuning). ``table``: latency table path, LatencyTable, or a ready
    LatencyModel (e.g. one calibrated to whole-model references). ``whole``: "warm" or "stream" (module
    doc; default the table's, else "warm").

    >>> # rep = validate("mnist_resnet", pol, "hw_profiles/host-cpu-ort.toml", "latency_tables/t.jsonl")
    >>> # rep.predicted_ms, rep.measured_ms, rep.error_pct
    """
    import dataclasses

    from lcpaq.deploy.runtime import check_outputs, deploy
    from lcpaq.graph import trace
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.profiler.hwprofile import HwProfile, load_profile
    from lcpaq.profiler.predict import latency_model
    from lcpaq.quant import apply_policy, quantizable_names

    hw: HwProfile = hw_profile if isinstance(hw_profile, HwProfile) else load_profile(hw_profile)
    if isinstance(model, str):
        model_name = model_name or model
        input_shape = input_shape or default_input_shape(model)
        model = get_model(model)
    if input_shape is None:
        shp = getattr(model, "input_shape", None)
        if shp is None:
            raise ConfigError("validate: pass input_shape for a model that is not registered by name")
        input_shape = tuple(shp)
    input_shape = (1, *tuple(input_shape)[1:])
    threads = int(threads or hw.threads)
    settings = dataclasses.replace(hw.settings, threads=threads,
                                   metric=hw.settings.metric if threads == 1 else "wall")
    names = quantizable_names(model)
    policy.validate(names)
    calib = list(calib) or [np.random.default_rng(1).standard_normal((8, *input_shape[1:])).astype(np.float32)]
    import torch

    if _is_deployed(model, policy):
        fq = model.eval()
        fp32 = copy.deepcopy(model)
        apply_policy(fp32, Policy.uniform(names, 32, 32))
    else:
        fp32 = model.eval()
        fq = apply_policy(copy.deepcopy(model), policy,
                          calib_loader=[torch.from_numpy(c) for c in calib], calib_batches=len(calib))
    fq.eval()
    inventory = trace(fp32, tuple(input_shape), name=model_name)
    pairs = tuple(dict.fromkeys(policy[n] for n in inventory.names))
    from lcpaq.latency import LatencyModel

    lm = table if isinstance(table, LatencyModel) else latency_model(table, inventory, pairs)
    predicted = lm.predict(policy)
    breakdown = lm.breakdown(policy)
    table_ref = dict(lm.meta.get("reference") or {})  # {"bits", "ms", "whole"}: block / segment tables
    whole = whole or str(table_ref.get("whole", "warm"))
    from lcpaq.profiler.backends.ort import whole_mode_kwargs

    chunk = whole_mode_kwargs(whole)  # an unknown mode fails before anything is deployed

    dep = deploy(fq, hw.backend, input_shape, threads=threads, calib_inputs=calib, hw=hw)
    if table_ref:
        ref_bits = (int(table_ref["bits"][0]), int(table_ref["bits"][1]))
        ref_label = format_bits(ref_bits)
        ref_fq = apply_policy(copy.deepcopy(fp32), Policy.uniform(names, *ref_bits),
                              calib_loader=[torch.from_numpy(c) for c in calib], calib_batches=len(calib)).eval()
        ref = deploy(ref_fq, hw.backend, input_shape, threads=threads, calib_inputs=calib, hw=hw)
    else:
        ref_label = "fp32"
        ref = deploy(fp32, hw.backend, input_shape, threads=threads, calib_inputs=calib, hw=hw) \
            if hw.backend != "lcpaq-kernels" else _torch_fp32(fp32, input_shape, threads)
    xs = check_inputs if check_inputs is not None else calib[0]
    out_check = check_outputs(dep, fq, xs, check_labels)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timed = _timed_rounds(dep, ref, settings, rounds, chunk)
    finally:
        torch.set_num_threads(old)
    med = [t["ms"] for t in timed]
    best = int(np.argmin(med))
    measured, wall = timed[best]["ms"], timed[best]["wall_ms"]
    ref_ms = min(t["ref_ms"] for t in timed)
    rel = float(np.median([t["rel"] for t in timed]))
    err = (predicted - measured) / measured * 100.0
    nan = float("nan")
    table_ref_ms = float(table_ref["ms"]) if table_ref else nan
    measured_table = rel * table_ref_ms
    err_df = (predicted - measured_table) / measured_table * 100.0 if table_ref else nan
    layers: dict[str, dict[str, float]] = {
        k: {"predicted_ms": float(v)} for k, v in breakdown.items()}
    if per_layer and dep.profile_layers is not None:
        try:
            for k, v in dep.profile_layers(max(settings.number * 2, 10)).items():
                layers.setdefault(k, {})["measured_ms"] = float(v)
        except Exception as e:  # noqa: BLE001 - the breakdown is a bonus, never fatal
            log.warning("per-layer profiling failed: %s", e)
    notes = list(dep.notes)
    if threads > 1:
        notes.append("threads > 1: wall time is the primary metric")
    if table_ref and whole != table_ref.get("whole", "warm"):
        notes.append(f"timed {whole} against a table whose whole rows were timed {table_ref.get('whole', 'warm')}: "
                     f"the error in the table's time compares two latency definitions")
    if table_ref:
        notes.append(f"reference {ref_label}: {ref_ms:.4g} ms now, {table_ref_ms:.4g} ms when the table was made "
                     f"({100 * (ref_ms / table_ref_ms - 1):+.1f} %); measured in the table's time "
                     f"{measured_table:.4g} ms, error {err_df:+.2f} % with that drift divided out")
    return ValidationReport(
        model=model_name or type(model).__name__, profile=hw.name, backend=hw.backend, threads=threads,
        metric=settings.metric, predicted_ms=float(predicted), measured_ms=float(measured),
        measured_wall_ms=float(wall), round_medians_ms=tuple(med),
        spread_pct=float((max(med) - min(med)) / min(med) * 100.0), reference=ref_label, reference_ms=float(ref_ms),
        relative=rel, error_pct=float(err), threshold_pct=float(strict_threshold_pct),
        flagged=bool(abs(err) > strict_threshold_pct), whole_mode=whole, table_reference_ms=table_ref_ms,
        measured_table_ms=float(measured_table), error_drift_free_pct=float(err_df), layers=layers, output_check=out_check,
        policy=policy.to_dict(), notes=tuple(notes),
    )


def _torch_fp32(model: Any, input_shape: Sequence[int], threads: int) -> Any:
    import torch

    from lcpaq.deploy.runtime import Deployment

    x = torch.randn(*input_shape).contiguous(memory_format=torch.channels_last)

    def call() -> Any:
        with torch.inference_mode():
            return model(x)

    def run(a: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()

    return Deployment("torch-fp32", run, call)


def plot_validation(reports: Sequence[ValidationReport], path: str | Path, *,
                    labels: Sequence[str] | None = None) -> Path:
    """One PNG: predicted vs measured whole-model latency per report (and per layer for the last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels or [r.model for r in reports])
    rep = reports[-1]
    lay = {k: v for k, v in rep.layers.items() if "measured_ms" in v and "predicted_ms" in v}
    fig, axes = plt.subplots(1, 2 if lay else 1, figsize=(12 if lay else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    pred = [r.predicted_ms for r in reports]
    meas = [r.measured_ms for r in reports]
    ax.scatter(meas, pred, zorder=3)
    for lab, mx, py, r in zip(labels, meas, pred, reports, strict=True):
        ax.annotate(f"{lab} ({r.error_pct:+.1f}%)", (mx, py), fontsize=8)
    hi = max(pred + meas) * 1.15
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="predicted = measured")
    ax.fill_between([0, hi], [0, hi * (1 - rep.threshold_pct / 100)], [0, hi * (1 + rep.threshold_pct / 100)],
                    alpha=0.12, label=f"±{rep.threshold_pct:g} %")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel(f"measured ms ({rep.metric}, {rep.threads} thread(s))")
    ax.set_ylabel("predicted ms")
    ax.set_title(f"{rep.profile}: whole model")
    ax.legend(fontsize=8)
    if lay:
        ax2 = axes[0][1]
        ks = list(lay)
        xs = np.arange(len(ks))
        ax2.bar(xs - 0.2, [lay[k]["predicted_ms"] for k in ks], 0.4, label="predicted (table)")
        ax2.bar(xs + 0.2, [lay[k]["measured_ms"] for k in ks], 0.4, label="measured (runtime profiler, wall)")
        ax2.set_xticks(xs, ks, rotation=60, ha="right", fontsize=7)
        ax2.set_ylabel("ms")
        ax2.set_title(f"per layer: {labels[-1]}")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def calibrated_latency_model(model: Any, hw_profile: Any, table: Any, *, input_shape: Sequence[int],
                             calib: Sequence[np.ndarray] = (), rounds: int = 2, model_name: str = "",
                             refs: Sequence[tuple[int, int]] = ((32, 32), (8, 8))) -> Any:
    """The table's LatencyModel calibrated to uniform whole-model references measured right now.

    Each uniform policy in ``refs`` is deployed and measured on the profile's backend; the per-class
    difference to the table's prediction is spread over the units
    (:func:`lcpaq.profiler.fidelity.calibrate_to_references`). Validate mixed policies with it:
    they stay out of sample.

    >>> # lm = calibrated_latency_model(get_model("mnist_resnet"), hw, "t.jsonl", input_shape=(1, 1, 28, 28))
    """
    from lcpaq.graph import trace
    from lcpaq.profiler.fidelity import calibrate_to_references
    from lcpaq.profiler.hwprofile import HwProfile, load_profile
    from lcpaq.profiler.predict import latency_model
    from lcpaq.quant import quantizable_names

    hw = hw_profile if isinstance(hw_profile, HwProfile) else load_profile(hw_profile)
    names = quantizable_names(model)
    inventory = trace(model, (1, *tuple(input_shape)[1:]), name=model_name)
    cands = tuple(dict.fromkeys([*hw.candidates, *refs]))
    lm = latency_model(table, inventory, cands)
    measured = {}
    for pair in refs:
        rep = validate(model, Policy.uniform(names, *pair), hw, lm, calib=calib, rounds=rounds, per_layer=False,
                       input_shape=input_shape, model_name=model_name)
        measured[tuple(pair)] = rep.measured_ms
    return calibrate_to_references(lm, measured)
