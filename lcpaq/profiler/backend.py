"""The latency backend Protocol and its registry (ORT, TVM local/RPC, lcpaq kernels, fake).

A backend measures *units*: small ONNX graphs cut so that they match what the runtime really
executes (see lcpaq.profiler.units). Runtimes are imported lazily inside each backend, never at
import time of lcpaq. Failures come back as data (``Measurement.error``), not exceptions, so one
crashing workload never aborts a table build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lcpaq.errors import BackendUnavailableError


@dataclass(frozen=True)
class MeasureSettings:
    """How to time one unit. Frozen: it is written into every table header."""

    warmup: int = 5
    number: int = 10  # calls per repeat (timed together, divided)
    repeat: int = 15  # repeats -> n samples for median/p10/p90
    min_repeat_ms: float = 0.0
    timeout_s: float = 120.0
    threads: int = 1
    # "thread_cpu": CPU time of the calling thread (stable at 1 thread, see FINDINGS.md);
    # "wall": wall clock (the only meaningful one at >1 thread).
    metric: str = "thread_cpu"


@dataclass(frozen=True)
class Unit:
    """One thing to time: an ONNX graph plus the inputs to feed it, and what it stands for."""

    key: str  # canonical workload key (model-independent), bits and neighbour precision included
    onnx: bytes  # serialized onnx.ModelProto
    inputs: Mapping[str, np.ndarray]
    layer: Mapping[str, Any] = field(default_factory=dict)  # canonical layer spec
    bits: tuple[int, int] = (32, 32)


@dataclass(frozen=True)
class Measurement:
    """Result of timing one unit. ``error`` set (and times NaN) when it failed."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    wall_median_ms: float = float("nan")
    kernel: str = ""  # which kernel actually ran, e.g. "ort:ConvInteger-int8", "tvm:conv2d-int8"
    error: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Backend(Protocol):
    """A runtime that can time units on a device (local or remote)."""

    name: str

    def versions(self) -> dict[str, str]:
        """Runtime versions for the table header, e.g. {"onnxruntime": "1.31.1"}."""
        ...

    def measure(self, unit: Unit, settings: MeasureSettings) -> Measurement:
        """Time one unit; never raise for a workload failure, return Measurement(error=...)."""
        ...


_REGISTRY: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Register a backend factory ``factory(profile) -> Backend`` under ``name``."""
    _REGISTRY[name] = factory


def wants_prepare(name: str) -> bool:
    """Whether backend ``name`` has an optional ``prepare(units) -> dict`` step that a table run
    calls once with every unit it is about to measure (TVM: tune all tasks in one run)."""
    _load_builtin()
    return callable(getattr(_REGISTRY.get(name), "prepare", None))


def backend_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def get_backend(name: str, profile: Any = None) -> Backend:
    """Instantiate the backend ``name`` for a device profile (may raise BackendUnavailableError)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown backend '{name}'; available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name](profile)


_BUILTIN_MODULES = (
    # Each module calls register_backend(...) at import; the runtime itself is imported lazily
    # inside the backend, so importing these never loads onnxruntime/tvm.
    "lcpaq.profiler.backends.fake",
    "lcpaq.profiler.backends.ort",
    "lcpaq.profiler.backends.tvm",
    "lcpaq.profiler.backends.kernels",
)


def _load_builtin() -> None:
    import importlib

    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a backend module not written yet is simply absent
            if e.name != mod:
                raise
