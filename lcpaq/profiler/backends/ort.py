"""ONNX Runtime latency backend (CPU EP). onnxruntime is imported only when a backend is made.

Timing: after ``warmup`` runs, ``repeat`` samples of ``number`` back-to-back runs each; the
primary metric is the calling thread's CPU time (at 1 intra-op thread ORT computes on the calling
thread, and thread CPU time is far less noisy than wall time on a shared VM); wall time is kept
beside it. At >1 thread use metric "wall".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lcpaq.errors import BackendUnavailableError
from lcpaq.profiler.backend import Measurement, MeasureSettings, Unit, register_backend


def session(onnx_bytes: bytes, threads: int, *, spin: bool = True):
    """A CPU session as the profiler times it; ``spin=False`` turns off the intra-op workers'
    spin-waiting (so summed process CPU time counts work, not waiting)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])


def time_callable(fn, settings: MeasureSettings) -> tuple[np.ndarray, np.ndarray]:
    """(thread-CPU ms, wall ms) per call for ``repeat`` samples of ``number`` calls."""
    for _ in range(settings.warmup):
        fn()
    cpu, wall = [], []
    number = settings.number
    for _ in range(settings.repeat):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(number):
            fn()
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        cpu.append((c1 - c0) / 1e6 / number)
        wall.append((w1 - w0) / 1e6 / number)
        if settings.min_repeat_ms and (w1 - w0) / 1e6 < settings.min_repeat_ms:
            number = max(number, int(number * settings.min_repeat_ms / max((w1 - w0) / 1e6, 1e-3)) + 1)
    return np.asarray(cpu), np.asarray(wall)


# How a whole model is timed against its reference (``time_interleaved`` keywords): "warm" = chunks
# of ``number`` calls after one untimed call (the warm-loop latency of a model served alone);
# "stream" = call by call, each right after a call of the reference (the latency inside a stream
# that alternates models; repeats to ~1 % where the warm loop repeats to 2-7 % on this busy VM).
WHOLE_MODES: dict[str, dict[str, int]] = {"warm": {}, "stream": {"calls": 1, "settle": 0}}


def whole_mode_kwargs(mode: str) -> dict[str, int]:
    """``time_interleaved`` keywords of a whole-model timing mode; ConfigError names the modes."""
    from lcpaq.errors import ConfigError

    if mode not in WHOLE_MODES:
        raise ConfigError(f"whole-model timing mode {mode!r} is unknown; use one of {', '.join(WHOLE_MODES)}")
    return dict(WHOLE_MODES[mode])


def time_interleaved(ref: Callable[[], Any], pol: Callable[[], Any], settings: MeasureSettings, *,
                     rounds: int | None = None, calls: int | None = None, settle: int = 1,
                     stat: str = "median") -> dict[str, float]:
    """A model timed against a reference model, interleaved in short chunks: ``rounds`` (default
    ``3 * repeat``) rounds of (``settle`` untimed calls of ``ref``, ``calls`` (default ``number``)
    timed calls of it, the same for ``pol``), after ``warmup`` calls of each.

    Both models then see the same interference from the machine's other tenants, so their ratio
    holds where either time alone does not: mobilenet_v2 on ORT at load 2, eight runs spread
    12-14 % in ms and 1.4 % in ratio. The untimed call after each switch absorbs the other model's
    eviction of the caches (a mobilenet_v2 call timed straight after the reference ran 6 % slower,
    after one untimed call as in a loop), so each chunk measures the warm-loop latency;
    ``calls=1, settle=0`` alternates call by call ("in-stream": each call just after the other
    model's, which repeats to ~1 % where the warm loop repeats to 2-7 % on a busy VM).
    Primary clock from ``settings.metric``: the calling thread's CPU time ("thread_cpu", 1 thread;
    wall at more threads), the process's CPU time ("process_cpu"), else wall.
    Returns ``ms``/``ref_ms`` (median, or min with ``stat="min"``, of the rounds' per-call primary
    times), ``wall_ms``/``ref_wall_ms`` beside them, and ``rel`` = median of the per-round ratios
    (min / min with ``stat="min"``)."""
    clock = {"thread_cpu": time.thread_time_ns, "process_cpu": time.process_time_ns}.get(settings.metric,
                                                                                        time.perf_counter_ns)
    if settings.metric == "thread_cpu" and settings.threads > 1:
        clock = time.perf_counter_ns  # the calling thread's CPU time misses the other workers
    n = max(settings.number if calls is None else calls, 1)

    def chunk(fn: Callable[[], Any]) -> tuple[int, int]:
        for _ in range(settle):  # untimed: the switch from the other model
            fn()
        c0, w0 = clock(), time.perf_counter_ns()
        for _ in range(n):
            fn()
        return clock() - c0, time.perf_counter_ns() - w0

    for _ in range(settings.warmup):
        ref()
        pol()
    r, p = [], []
    for _ in range(max(3 * settings.repeat if rounds is None else rounds, 1)):
        r.append(chunk(ref))
        p.append(chunk(pol))
    ra, pa = np.asarray(r, float) / 1e6 / n, np.asarray(p, float) / 1e6 / n
    pick = np.min if stat == "min" else np.median
    rel = float(pa[:, 0].min() / ra[:, 0].min()) if stat == "min" else float(np.median(pa[:, 0] / np.maximum(ra[:, 0], 1e-12)))
    return {"ms": float(pick(pa[:, 0])), "ref_ms": float(pick(ra[:, 0])), "rel": rel,
            "wall_ms": float(pick(pa[:, 1])), "ref_wall_ms": float(pick(ra[:, 1]))}


def summarize(cpu: np.ndarray, wall: np.ndarray, settings: MeasureSettings, kernel: str) -> Measurement:
    primary = cpu if settings.metric == "thread_cpu" else wall
    return Measurement(
        median_ms=float(np.median(primary)), p10_ms=float(np.percentile(primary, 10)),
        p90_ms=float(np.percentile(primary, 90)), n=int(primary.size),
        wall_median_ms=float(np.median(wall)), kernel=kernel,
        extra={"cpu_median_ms": float(np.median(cpu))},
    )


class OrtBackend:
    name = "ort"

    def __init__(self, profile: Any = None) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
            raise BackendUnavailableError(f"onnxruntime is not installed: {e}") from None
        self.threads = getattr(profile, "threads", 1) if profile is not None else 1

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def measure(self, unit: Unit, settings: MeasureSettings) -> Measurement:
        try:
            sess = session(unit.onnx, settings.threads or self.threads)
            feeds = dict(unit.inputs)
            run = sess.run
            cpu, wall = time_callable(lambda: run(None, feeds), settings)
            kernel = str(unit.layer.get("kernel", "")) if unit.layer else ""
            return summarize(cpu, wall, settings, kernel)
        except Exception as e:  # noqa: BLE001 - failures are data
            nan = float("nan")
            return Measurement(nan, nan, nan, 0, error=f"{type(e).__name__}: {e}"[:500])


register_backend("ort", OrtBackend)
