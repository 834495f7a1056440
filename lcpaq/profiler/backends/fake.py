"""Deterministic fake backend for unit tests of the search/table machinery (never for real tables).

Latency = a fixed function of the unit's MACs and bits, no runtime involved.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lcpaq.profiler.backend import Measurement, MeasureSettings, Unit, register_backend


class FakeBackend:
    name = "fake"

    def __init__(self, profile: Any = None) -> None:
        self.profile = profile

    def versions(self) -> dict[str, str]:
        return {"fake": "1"}

    def measure(self, unit: Unit, settings: MeasureSettings) -> Measurement:
        if "fail" in unit.key:
            return Measurement(float("nan"), float("nan"), float("nan"), 0, error="RuntimeError: injected failure")
        if unit.layer and unit.layer.get("kind") == "overhead":
            return Measurement(1e-5, 1e-5, 1e-5, settings.repeat, 1e-5, kernel="fake")
        macs = float(unit.layer.get("macs", 1e6)) if unit.layer else 1e6
        w, a = unit.bits
        scale = 1.0 if (w, a) == (32, 32) else 0.5 + 0.05 * max(w, a) / 8
        jitter = int(hashlib.sha1(unit.key.encode()).hexdigest()[:4], 16) / 65535 * 0.01
        ms = macs / 1e6 * scale * (1 + jitter) + (0.01 if "in=int8" in unit.key and w == 32 else 0.0)
        return Measurement(ms, ms * 0.98, ms * 1.02, settings.repeat, ms, kernel="fake")


register_backend("fake", FakeBackend)
