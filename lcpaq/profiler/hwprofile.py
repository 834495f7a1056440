"""Device profiles (hw_profiles/*.toml): a board and runtime described as data, validated on load.

    [device]   name, version, description
    [backend]  name = "ort" | "tvm" | "lcpaq-kernels"; target; threads; execution_provider
    [candidates] bits = ["w2a8", "w4a8", "w8a8", "fp32"]
    [measure]  warmup, number, repeat, min_repeat_ms, timeout_s, metric ("thread_cpu" | "wall")
    [rpc]      host, port, key                     (remote boards through a TVM RPC tracker)
    [tvm]      trials, work_dir                    (MetaSchedule tuning)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from lcpaq.errors import ProfileError
from lcpaq.policy import BitPair, PolicyError, parse_bits
from lcpaq.profiler.backend import MeasureSettings
from lcpaq.profiler.backends.tvm import (
    PROFILE_KEYS as TVM_KEYS,  # imports no TVM: that waits for a backend
)

BACKENDS = ("ort", "tvm", "lcpaq-kernels", "fake")
METRICS = ("thread_cpu", "wall")


@dataclass(frozen=True)
class RpcConfig:
    host: str
    port: int
    key: str


@dataclass(frozen=True)
class HwProfile:
    name: str
    version: str
    backend: str
    target: str
    threads: int
    candidates: tuple[BitPair, ...]
    settings: MeasureSettings
    rpc: RpcConfig | None = None
    tvm: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["candidates"] = [f"w{w}a{a}" if (w, a) != (32, 32) else "fp32" for w, a in self.candidates]
        return d


def _get(d: Mapping[str, Any], key: str, typ: type | tuple, where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise ProfileError(f"{where}: missing field '{key}'")
        return default
    v = d[key]
    if isinstance(v, bool) and typ in (int, float, (int, float)) or not isinstance(v, typ):
        tname = typ.__name__ if isinstance(typ, type) else "number"
        raise ProfileError(f"{where}: field '{key}' must be a {tname}, got {v!r}")
    return v


# Every table and key a profile may hold: anything else is a typo (``reapeat = 3``, ``[mesure]``)
# that would silently leave a default in place. The TVM backend declares its own keys.
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "device": ("name", "version", "description"),
    "backend": ("name", "target", "threads", "execution_provider"),
    "candidates": ("bits",),
    "measure": ("warmup", "number", "repeat", "min_repeat_ms", "timeout_s", "metric"),
    "rpc": ("host", "port", "key"),
    "tvm": TVM_KEYS,
}


def _unknown(found: Mapping[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    """ProfileError naming the first key of ``found`` that is not in ``known`` (with the closest
    known one when there is one) and every accepted key."""
    import difflib

    for k in found:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ProfileError(f"{where}: unknown {what} '{k}'{hint}; accepted: {', '.join(known)}")


def _check_keys(doc: Mapping[str, Any], w: str) -> None:
    _unknown(doc, tuple(KNOWN_KEYS), w, "table")
    for table, keys in KNOWN_KEYS.items():
        if isinstance(doc.get(table), Mapping):
            _unknown(doc[table], keys, f"{w} [{table}]", "key")


def load_profile(path: str | Path) -> HwProfile:
    """Read and validate a device profile; ProfileError names the file and the bad field."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"device profile {p} does not exist; see hw_profiles/ for examples") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"device profile {p} is not valid TOML: {e}") from None
    w = str(p)
    dev = _get(doc, "device", dict, w)
    be = _get(doc, "backend", dict, w)
    name = _get(dev, "name", str, f"{w} [device]")
    backend = _get(be, "name", str, f"{w} [backend]")
    if backend not in BACKENDS:
        raise ProfileError(f"{w} [backend]: field 'name' = '{backend}' is unknown; use one of {BACKENDS}")
    threads = _get(be, "threads", int, f"{w} [backend]", 1)
    if threads < 1:
        raise ProfileError(f"{w} [backend]: field 'threads' must be >= 1")
    bits = _get(_get(doc, "candidates", dict, w), "bits", list, f"{w} [candidates]")
    try:
        cands = tuple(parse_bits(str(b)) for b in bits)
    except PolicyError as e:
        raise ProfileError(f"{w} [candidates]: field 'bits': {e}") from None
    if not cands:
        raise ProfileError(f"{w} [candidates]: field 'bits' is empty")
    m = _get(doc, "measure", dict, w, {})
    mw = f"{w} [measure]"
    settings = MeasureSettings(
        warmup=_get(m, "warmup", int, mw, 5), number=_get(m, "number", int, mw, 10),
        repeat=_get(m, "repeat", int, mw, 15), min_repeat_ms=float(_get(m, "min_repeat_ms", (int, float), mw, 0.0)),
        timeout_s=float(_get(m, "timeout_s", (int, float), mw, 120.0)), threads=threads,
        metric=_get(m, "metric", str, mw, "thread_cpu"),
    )
    for k in ("warmup", "number", "repeat"):
        if getattr(settings, k) < (0 if k == "warmup" else 1):
            raise ProfileError(f"{mw}: field '{k}' must be positive")
    if settings.metric not in METRICS:
        raise ProfileError(f"{mw}: field 'metric' = '{settings.metric}' is unknown; use one of {METRICS}")
    _check_keys(doc, w)
    rpc = None
    if "rpc" in doc:
        r = _get(doc, "rpc", dict, w)
        rw = f"{w} [rpc]"
        rpc = RpcConfig(_get(r, "host", str, rw), _get(r, "port", int, rw), _get(r, "key", str, rw))
    return HwProfile(
        name=name, version=str(dev.get("version", "1")), backend=backend,
        target=str(be.get("target", "")), threads=threads, candidates=cands, settings=settings, rpc=rpc,
        tvm=dict(doc.get("tvm", {})), description=str(dev.get("description", "")), path=w,
    )
