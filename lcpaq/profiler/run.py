"""``profile(...)``: measure every unit variant of a model on a device into a latency table.

Each unit is timed in a worker process with a timeout: a crash or hang becomes an error row and
the run goes on (the worker is restarted). Rows are appended as they finish, so an interrupted run
(Ctrl-C, kill -9) resumes where it stopped; finished keys are never measured twice.
"""

from __future__ import annotations

import datetime as _dt
import logging
import select
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lcpaq.errors import BackendUnavailableError
from lcpaq.inventory import Inventory
from lcpaq.policy import BitPair
from lcpaq.profiler import worker
from lcpaq.profiler.backend import Measurement, MeasureSettings, Unit, get_backend, wants_prepare
from lcpaq.profiler.hwprofile import HwProfile
from lcpaq.profiler.table import TableWriter, host_cpu, host_isa, read_table
from lcpaq.profiler.units import (
    build_unit,
    kernel_name,
    layer_spec,
    overhead_unit,
    precision_class,
    unit_key,
)

log = logging.getLogger(__name__)
OVERHEAD_KEY = "__overhead__"


class IsolatedRunner:
    """Runs ``backend.measure`` in a child process (``python -m lcpaq.profiler.worker``) with a
    per-unit timeout; a crash or hang is returned as an error Measurement and the child restarts."""

    def __init__(self, backend_name: str, profile: Any) -> None:
        self.backend_name, self.profile = backend_name, profile
        self._proc: subprocess.Popen | None = None
        self.versions: dict[str, str] = {}

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "lcpaq.profiler.worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        worker.send(self._proc.stdin, (self.backend_name, self.profile))
        msg = self._recv(180.0)
        if msg is None:
            self.close(kill=True)
            raise BackendUnavailableError(f"the '{self.backend_name}' profiling worker did not start")
        self.versions = msg[1]

    def _recv(self, timeout: float):
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        return worker.recv(self._proc.stdout)

    def _ask(self, msg: Any, timeout_s: float) -> tuple[Any, str | None]:
        """One request to the child: (reply, None), or (None, why not) after killing the child
        (a timeout or a crash; the next request starts a fresh one)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            worker.send(self._proc.stdin, msg)  # type: ignore[union-attr,arg-type]
            reply = self._recv(timeout_s)
            if reply is not None:
                return reply[1], None
            err = f"timeout after {timeout_s:.0f} s"
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
            err = f"worker crashed ({type(e).__name__}, exit code {self._proc.poll() if self._proc else '?'})"
        self.close(kill=True)
        return None, err

    def measure(self, unit: Unit, settings: MeasureSettings) -> Measurement:
        m, err = self._ask((unit, settings), settings.timeout_s)
        if err is None:
            return m
        nan = float("nan")
        return Measurement(nan, nan, nan, 0, error=err)

    def prepare(self, units: list[Unit], timeout_s: float) -> dict[str, Any]:
        """The backend's optional ``prepare`` in the child; a crash or timeout is reported in the
        returned dict (the child restarts and ``measure`` works unit by unit as before)."""
        info, err = self._ask(("prepare", units), timeout_s)
        return info if err is None else {"error": err}

    def close(self, kill: bool = False) -> None:
        if self._proc is not None:
            if not kill:
                try:
                    worker.send(self._proc.stdin, None)  # type: ignore[arg-type]
                    self._proc.stdin.close()  # type: ignore[union-attr]
                    self._proc.wait(5)
                except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                    pass
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def plan_units(inventory: Inventory, candidates: Sequence[BitPair]) -> list[tuple[str, Any, BitPair, str]]:
    """Unique (key, layer, bits, input class) to measure; shared workloads are measured once."""
    seen, out = set(), []
    for ly in inventory:
        for pair in candidates:
            precision_class(pair)  # validates the pair for this backend
            for in_class in ("fp32", "int8"):
                key = unit_key(ly, pair, in_class)
                if key not in seen:
                    seen.add(key)
                    out.append((key, ly, tuple(pair), in_class))
    return out


def profile(
    inventory: Inventory, hw: HwProfile, out: str | Path, *, candidates: Sequence[BitPair] | None = None,
    repair: bool = False, isolate: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Measure every unit variant of ``inventory`` on ``hw`` and append them to the table ``out``.

    >>> # from lcpaq.graph import trace_named; _, inv = trace_named("resnet18")
    >>> # profile(inv, load_profile("hw_profiles/host-cpu-ort.toml"), "latency_tables/x.jsonl")
    """
    cands = tuple(candidates or hw.candidates)
    plan = plan_units(inventory, cands)
    # Nothing left to measure (a finished table run again): no worker, whose start costs seconds
    # (the runtime's import in a fresh interpreter). The header still gets the runtime versions,
    # from the backend in-process, so a table measured with another runtime is still refused.
    finished = set(read_table(out, repair=repair).rows) if Path(out).is_file() and Path(out).stat().st_size else set()
    left = OVERHEAD_KEY not in finished or any(p[0] not in finished for p in plan)
    runner: Any = IsolatedRunner(hw.backend, hw) if isolate and left else None
    backend = None if runner is not None else get_backend(hw.backend, hw)
    if runner is not None:
        runner._start()
    header = {
        "profile": hw.name, "profile_version": hw.version, "backend": hw.backend, "target": hw.target,
        "threads": hw.threads, "settings": hw.settings.__dict__, "host_cpu": host_cpu(),
        "host_isa": host_isa(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": runner.versions if runner is not None else backend.versions(),  # type: ignore[union-attr]
    }
    try:
        with TableWriter(out, header, repair=repair) as tw:
            todo = [p for p in plan if p[0] not in tw.done]
            total = len(plan) + 1
            done = total - len(todo) - (0 if OVERHEAD_KEY in tw.done else 1)
            measure = runner.measure if runner is not None else backend.measure  # type: ignore[union-attr]
            if OVERHEAD_KEY not in tw.done:
                ob, of = overhead_unit()
                m = measure(Unit(OVERHEAD_KEY, ob, of, {"kind": "overhead"}, (32, 32)), hw.settings)
                tw.append(_record(OVERHEAD_KEY, None, (32, 32), "fp32", m, "ort:overhead", runner, backend))
                done += 1
                if progress:
                    progress(done, total, OVERHEAD_KEY)
            def make(key: str, ly: Any, pair: BitPair, in_class: str) -> Unit:
                onnx_bytes, feeds = build_unit(ly, pair, in_class)
                spec = dict(layer_spec(ly))
                spec["kernel"] = kernel_name(ly, precision_class(pair))
                return Unit(key, onnx_bytes, feeds, spec, pair)

            built: dict[str, Unit] = {}
            if todo and wants_prepare(hw.backend):  # e.g. TVM: tune every task in one run first
                built = {p[0]: make(*p) for p in todo}
                if progress:
                    progress(done, total, f"preparing {len(built)} units ({hw.backend})")
                units = list(built.values())
                info = (runner.prepare(units, hw.settings.timeout_s * len(units)) if runner is not None
                        else backend.prepare(units))  # type: ignore[union-attr]
                if info.get("error"):
                    log.warning("prepare step failed (%s); measuring unit by unit", info["error"])
            for key, ly, pair, in_class in todo:
                unit = built.pop(key, None) or make(key, ly, pair, in_class)
                spec = unit.layer
                m = measure(unit, hw.settings)
                if m.error:
                    log.warning("unit %s failed: %s", key, m.error)
                tw.append(_record(key, ly, pair, in_class, m, spec["kernel"], runner, backend))
                done += 1
                if progress:
                    progress(done, total, ly.name)
    finally:
        if runner is not None:
            runner.close()
    return Path(out)


def _record(key, ly, pair, in_class, m: Measurement, kernel, runner, backend) -> dict[str, Any]:
    versions = runner.versions if runner is not None else backend.versions()
    return {
        "key": key, "workload": key.split("|")[0], "layer_example": ly.name if ly else None,
        "w_bits": pair[0], "a_bits": pair[1], "unit_class": precision_class(pair), "in_class": in_class,
        "median_ms": m.median_ms, "p10_ms": m.p10_ms, "p90_ms": m.p90_ms, "n": m.n,
        "wall_median_ms": m.wall_median_ms, "kernel": m.kernel or kernel, "error": m.error,
        "runtime": versions,
    }
