"""Apache TVM 0.27 latency backend: relax ONNX import, QDQ -> integer lowering, MetaSchedule, RPC.

Per unit: import the ONNX bytes with the relax ONNX frontend, lower QDQ conv/matmul to integer
compute (lcpaq.profiler.tvm_lower: u8 x s8 convs through lcpaq's VNNI or AVX2 tensor intrinsic in
NCHWc form, ``[tvm] int8_intrin``; float convs in NCHWc, ``[tvm] fp32_layout``), lift the weights
to parameters, compile for the profile's target (``-mcpu=native`` = this host's CPU; tuned with
MetaSchedule when ``[tvm] trials`` > 0, one database per target under ``[tvm] work_dir``, one
compiled library per lowered structure under ``<work_dir>/libs``: w2..w8 at a8 share it and pass
their own weights), then time ``main`` with the Relax VM's ``time_evaluator`` locally, or on a
remote board through the TVM RPC tracker named in the profile's ``[rpc]`` table (export, upload,
load_module, remote time_evaluator). ``TvmBackend.tune(units)`` tunes all missing tasks of a table
in one MetaSchedule run before measuring.

Timing is wall clock per call (TVM runs on its own thread pool, so the calling thread's CPU time
means nothing here): ``repeat`` samples of ``number`` calls, ``min_repeat_ms`` as TVM defines it.
``Measurement.kernel`` says what ran, e.g. ``tvm:conv2d-int8-vnni`` or ``tvm:conv2d-fp32-nchwc``.
TVM has no sub-byte conv on CPU: every 2..8-bit pair runs the int8 kernel (weights on the w-bit
grid).

Example:
    >>> from lcpaq.profiler.backend import get_backend
    >>> from lcpaq.profiler.hwprofile import load_profile
    >>> prof = load_profile("hw_profiles/host-cpu-tvm.toml")  # doctest: +SKIP
    >>> m = get_backend("tvm", prof).measure(unit, prof.settings)  # doctest: +SKIP
    >>> m.kernel  # doctest: +SKIP
    'tvm:conv2d-int8-vnni'
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from lcpaq.errors import BackendUnavailableError, ProfileError
from lcpaq.profiler.backend import Measurement, MeasureSettings, Unit, register_backend

# Every `[tvm]` key of a device profile this backend reads (``tvm_cfg.get``): the profile loader
# refuses any other (a typo would silently leave a default in place). A new option goes here.
PROFILE_KEYS = ("trials", "elementwise_trials", "work_dir", "int8_intrin", "fp32_layout", "epilogue",
                "fp32_epilogue", "unit_form", "flush_weights")

HOST_TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
# bytes TVM's timer writes before each sample to evict the whole cache hierarchy (>= 2x this host's
# 32 MiB L3): only for image-fed units in the context form, whose input is cold in a whole model
FLUSH_ALL_BYTES = 64 << 20


def parse_target(target: str | dict | None) -> dict[str, Any]:
    """A TVM target dict from a profile's target string, e.g. ``"llvm -mcpu=znver3 -num-cores=2"``.

    TVM 0.27 rejects ``"llvm -mcpu=znver3"`` as a string; the dict form works. ``-mcpu=native``
    becomes the CPU LLVM detects on this machine (e.g. ``znver5``).

    >>> parse_target("llvm -mcpu=znver3 -num-cores=2")
    {'kind': 'llvm', 'mcpu': 'znver3', 'num-cores': 2}
    >>> parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")["mattr"]
    ['+neon']
    """
    if not target:
        return dict(HOST_TARGET)
    if isinstance(target, dict):
        return dict(target)
    parts = shlex.split(target)
    out: dict[str, Any] = {"kind": parts[0]}
    for p in parts[1:]:
        if not p.startswith("-") or "=" not in p:
            raise ProfileError(f"[backend] target '{target}': option '{p}' is not of the form -key=value")
        k, v = p.lstrip("-").split("=", 1)
        if k == "mattr":
            out[k] = v.split(",")
        elif k == "mcpu" and v == "native":  # this host's CPU, as LLVM names it (e.g. znver5)
            from tvm.target import codegen

            out[k] = str(codegen.llvm_get_system_cpu())
        elif v.lstrip("-").isdigit():
            out[k] = int(v)
        else:
            out[k] = v
    return out


class TvmBackend:
    """TVM backend for one device profile (local, or remote when the profile has ``[rpc]``)."""

    name = "tvm"

    def __init__(self, profile: Any = None, *, work_dir: str | Path | None = None,
                 trials: int | None = None) -> None:
        threads = int(getattr(profile, "threads", 1) or 1) if profile is not None else 1
        # TVM's thread pool reads this once, when the runtime first starts a parallel region.
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.onnx import from_onnx  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError or a broken native library
            raise BackendUnavailableError(
                f"apache-tvm is not usable here ({type(e).__name__}: {e}); install apache-tvm==0.27 "
                "with apache-tvm-ffi==0.1.14.post1 or pick an 'ort' profile") from None
        tvm_cfg = dict(getattr(profile, "tvm", {}) or {}) if profile is not None else {}
        self.target_dict = parse_target(getattr(profile, "target", "") if profile is not None else "")
        self.trials = int(tvm_cfg.get("trials", 0) if trials is None else trials)
        # trials per elementwise task (layout transforms, requantize epilogues); 0 = ``trials``
        self.elementwise_trials = int(tvm_cfg.get("elementwise_trials", 0))
        if self.elementwise_trials < 0:
            raise ProfileError(f"[tvm] elementwise_trials = {self.elementwise_trials}: use 0 (= trials) or more")
        wd = work_dir if work_dir is not None else tvm_cfg.get("work_dir")
        self.work_dir = Path(wd) if wd else None
        self.rpc = getattr(profile, "rpc", None) if profile is not None else None
        self.threads = threads
        # the tensor-intrinsic int8 conv (tvm_lower): "auto" = VNNI or AVX2 from the target's
        # features, "off" = TVM's generic int8 conv, or force "vnni" / "avx2"
        self.int8_intrin = str(tvm_cfg.get("int8_intrin", "auto"))
        if self.int8_intrin not in ("auto", "off", "vnni", "avx2"):
            raise ProfileError(f"[tvm] int8_intrin = '{self.int8_intrin}': use auto, off, vnni or avx2")
        self._intrin: str | None = "auto"
        # "nchwc": float convs as an NCHW4c x [O/L..L] conv with the output-channel block innermost
        # (tvm_lower.conv2d_nchwc_f32, L = 16 with AVX-512, else 8; 0.93-1.55x ORT on resnet18's dense
        # convs vs 1.41-2.99x for the NCHW conv, both at 64 trials on a Zen 5); "nchw": as imported
        self.fp32_layout = str(tvm_cfg.get("fp32_layout", "nchwc"))
        if self.fp32_layout not in ("nchw", "nchwc"):
            raise ProfileError(f"[tvm] fp32_layout = '{self.fp32_layout}': use nchw or nchwc")
        # "nchwc": requantize/bias/activation on the packed conv's NCHWc output (fused into the conv
        # kernel), one opaque transpose of the final tensor back to NCHW (tvm_lower.sink_epilogue);
        # "nchw": the output is transposed first, the epilogue runs in NCHW (as imported)
        # cold weights: TVM flushes every argument but the input from the CPU caches before each
        # timed call (one call per sample), as a whole model meets a layer's weights: an isolated
        # unit timed in a loop keeps them cached (resnet18 fp32 512x7x7 convs: 1.28 ms per conv in
        # the whole build vs 0.89 ms per unit)
        self.flush_weights = bool(tvm_cfg.get("flush_weights", False))
        self.epilogue = str(tvm_cfg.get("epilogue", "nchw"))
        # "vector": the int8 requantize epilogue and the transposition back to NCHW in one
        # hand-vectorized kernel (tvm_lower.vector_requant), every packed int8 conv
        if self.epilogue not in ("nchw", "nchwc", "vector"):
            raise ProfileError(f"[tvm] epilogue = '{self.epilogue}': use nchw, nchwc or vector")
        # "vector": the NCHWc float conv's output goes back to NCHW with its bias and ReLU through
        # one hand-vectorized kernel (tvm_lower.vector_unpack; resnet18's 64x56x56 fp32 unit 1.56x ->
        # 1.43x ORT, notes/tvm.md session 7); "fused": the transposing loop nest FuseOps builds (scalar)
        self.fp32_epilogue = str(tvm_cfg.get("fp32_epilogue", "vector"))
        if self.fp32_epilogue not in ("vector", "fused"):
            raise ProfileError(f"[tvm] fp32_epilogue = '{self.fp32_epilogue}': use vector or fused")
        # "context": units in the form a whole-model build runs them (units.build_unit(context=True):
        # the stem's max-pool inside its unit, an image-fed layer with the image's quantization);
        # "layer": as built by the profiler (ORT's form)
        self.unit_form = str(tvm_cfg.get("unit_form", "layer"))
        if self.unit_form not in ("layer", "context"):
            raise ProfileError(f"[tvm] unit_form = '{self.unit_form}': use layer or context")
        self._tuner: Any = None
        self._libs: dict[str, Any] = {}  # library key -> loaded executable, this process

    def versions(self) -> dict[str, str]:
        import tvm

        v = {"tvm": str(tvm.__version__), "tvm_target": str(self.target_dict)}
        try:
            import tvm_ffi

            v["tvm_ffi"] = str(getattr(tvm_ffi, "__version__", ""))
        except ImportError:
            pass
        if self.rpc is not None:
            v["rpc"] = f"{self.rpc.host}:{self.rpc.port}/{self.rpc.key}"
        # how units were lowered and timed (a table's header says which form its rows are)
        v["tvm_lowering"] = f"epilogue={self.epilogue},fp32_layout={self.fp32_layout},int8_intrin={self.int8_intrin}"
        if self.fp32_layout == "nchwc" and self.fp32_epilogue != "fused":  # absent in older tables = fused
            v["tvm_lowering"] += f",fp32_epilogue={self.fp32_epilogue}"
        v["tvm_flush_weights"] = str(self.flush_weights)
        if self.unit_form != "layer":
            v["tvm_unit_form"] = self.unit_form
        return v

    def unit_in_form(self, unit: Unit) -> Unit:
        """``unit`` rebuilt in this backend's unit form (``[tvm] unit_form``): a table unit (its
        ``layer`` spec and an ``|in=`` key, as ``lcpaq profile`` makes them) whose layer has a
        whole-model context (a max-pool after it, the image before it) is built again with it;
        anything else (whole models, units without a layer spec) is returned as is."""
        import dataclasses

        from lcpaq.inventory import LayerInfo
        from lcpaq.profiler.units import build_unit, feeds_image

        if self.unit_form != "context" or "|in=" not in unit.key or "kind" not in unit.layer:
            return unit
        names = {f.name for f in dataclasses.fields(LayerInfo)}
        layer = LayerInfo.from_dict({k: v for k, v in unit.layer.items() if k in names})
        if not (feeds_image(layer) or "maxpool" in layer.fused or "add" in layer.fused):
            return unit
        onnx_bytes, feeds = build_unit(layer, unit.bits, unit.key.rsplit("|in=", 1)[1], context=True)
        return dataclasses.replace(unit, onnx=onnx_bytes, inputs=feeds)

    def target(self) -> Any:
        import tvm

        return tvm.target.Target(self.target_dict)

    def lower(self, unit: Unit) -> tuple[Any, list[np.ndarray], str, str]:
        """(Relax module with tensor constants lifted to parameters, their arrays, kernel label,
        library key). The key hashes the module's structure, the target, the trial budget and the
        TVM version, not the weight values: units that lower to the same integer module (w2..w8
        at a8) share one compiled library."""
        import hashlib

        import onnx
        import tvm
        from tvm.relax.frontend.onnx import from_onnx

        from lcpaq.profiler.tvm_lower import kernel_label, lift_constants, lower_qdq
        from lcpaq.profiler.tvm_tune import int8_intrin_kind

        mod = from_onnx(onnx.load_from_string(unit.onnx), keep_params_in_input=False)
        if self._intrin == "auto":
            self._intrin = int8_intrin_kind(self.target()) if self.int8_intrin == "auto" else (
                None if self.int8_intrin == "off" else self.int8_intrin)
        lanes = 0
        if self.fp32_layout == "nchwc":
            from tvm.target import codegen

            lanes = 16 if codegen.target_has_features("avx512f", self.target()) else 8
        mod, kinds = lower_qdq(mod, int8_intrin=self._intrin, fp32_nchwc=lanes,
                               nchwc_epilogue=self.epilogue == "nchwc", fp32_unpack=self.fp32_epilogue == "vector",
                               int8_unpack=self.epilogue == "vector")
        kernel = kernel_label(kinds, mod)
        mod, params, scalars = lift_constants(mod)
        h = hashlib.sha256(mod.script(show_meta=False).encode())
        h.update(scalars)
        h.update(f"|{sorted(self.target_dict.items())}|{self.trials}|{tvm.__version__}|lift3".encode())
        return mod, params, kernel, h.hexdigest()[:32]

    def tuner(self) -> Any:
        """This backend's MetaSchedule tuner (one per process: pools and cost model are kept)."""
        from lcpaq.profiler.tvm_tune import TuneConfig, Tuner

        if self._tuner is None:
            if self.work_dir is None or self.trials <= 0:
                raise ProfileError("tuning needs [tvm] trials > 0 and a work_dir in the device profile")
            extra = ("cast", "multiply", "add", "relu", "quantize") if self.epilogue == "nchwc" else ()
            self._tuner = Tuner(self.target(), self.work_dir, TuneConfig(
                trials=self.trials, elementwise_trials=self.elementwise_trials, extra_ops=extra), rpc=self.rpc)
        return self._tuner

    def tune(self, units: list[Unit]) -> dict[str, Any]:
        """Tune every task of ``units`` that the database lacks, in one MetaSchedule run.

        A full table is faster this way than tuning unit by unit inside ``measure`` (one search
        over all tasks shares the cost model from the start); ``measure`` then only compiles.
        Returns {"tasks": unique tasks, "tuned_now": tuned in this call, "tune_s": seconds}.
        """
        if self.rpc is not None:  # before any tuning: a missing tracker is retried forever
            from lcpaq.profiler.rpc import check_tracker

            check_tracker(self.rpc)
        tuner = self.tuner()
        mods = [self.lower(self.unit_in_form(u))[0] for u in units]
        miss, n = tuner.missing(mods)
        return {"tasks": n, "tuned_now": len(miss), "tune_s": round(tuner.tune(miss), 2)}

    def prepare(self, units: list[Unit]) -> dict[str, Any]:
        """Called once by a table run (``lcpaq profile``) with every unit it will measure: tunes
        all their missing tasks in one MetaSchedule run (when the profile tunes), so ``measure``
        only compiles and times, as in ``bench_tvm.py --full``."""
        if self.work_dir is None or self.trials <= 0:
            return {"tuned_now": 0}
        return self.tune(units)

    def compile(self, unit: Unit) -> tuple[Any, str, list[np.ndarray], dict[str, Any]]:
        """(Relax executable, kernel label, parameter arrays to pass after the inputs, info)."""
        import tvm

        from lcpaq.profiler.tvm_tune import compile_tuned

        t0 = time.perf_counter()
        mod, params, kernel, key = self.lower(unit)
        lib = self.work_dir / "libs" / f"{key}.so" if self.work_dir is not None and self.trials > 0 else None
        if key in self._libs:  # same structure measured before in this process (another bit pair)
            return self._libs[key], kernel, params, {
                "tuned": lib is not None, "tasks": -1, "tuned_now": 0, "cached_lib": "memory",
                "lib": str(lib) if lib else None, "compile_s": round(time.perf_counter() - t0, 3)}
        if lib is not None and lib.exists():
            # Re-profiling fast path: the tuned build of this structure is kept beside the database.
            ex = tvm.runtime.load_module(str(lib))
            self._libs[key] = ex
            return ex, kernel, params, {
                "tuned": True, "tasks": -1, "tuned_now": 0, "cached_lib": str(lib), "lib": str(lib),
                "compile_s": round(time.perf_counter() - t0, 3)}
        if lib is not None:
            ex, info = self.tuner().compile(mod)
            lib.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_name(f"{lib.stem}.{os.getpid()}.tmp.so")
            ex.export_library(str(tmp))
            os.replace(tmp, lib)  # atomic: a killed run never leaves a half-written library
            info["lib"] = str(lib)
        else:
            ex, info = compile_tuned(mod, self.target(), None, 0)
        self._libs[key] = ex
        info["compile_s"] = round(time.perf_counter() - t0, 3)
        return ex, kernel, params, info

    def measure(self, unit: Unit, settings: MeasureSettings) -> Measurement:
        try:
            unit = self.unit_in_form(unit)
            ex, kernel, params, info = self.compile(unit)
            cold = self._image_fed(unit)
            if self.rpc is not None:
                secs = self._run_remote(ex, unit, params, settings, info.get("lib"), flush_input=cold)
            else:
                secs = self._run_local(ex, unit, params, settings, flush_input=cold)
            ms = np.asarray(secs, dtype=np.float64) * 1e3
            return Measurement(
                median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)),
                p90_ms=float(np.percentile(ms, 90)), n=int(ms.size), wall_median_ms=float(np.median(ms)),
                kernel=kernel, extra={**info, "remote": self.rpc is not None})
        except Exception as e:  # noqa: BLE001 - failures are data
            nan = float("nan")
            return Measurement(nan, nan, nan, 0, error=f"{type(e).__name__}: {e}"[:500])

    def _image_fed(self, unit: Unit) -> bool:
        """A context-form table unit of a layer that reads the model's image (units.feeds_image)."""
        if self.unit_form != "context" or "kind" not in unit.layer:
            return False
        from lcpaq.profiler.units import feeds_image

        return feeds_image(SimpleNamespace(**{k: unit.layer.get(k) for k in ("kind", "groups", "in_channels")}))

    def _time(self, vm: Any, dev: Any, args: list[Any], settings: MeasureSettings, *,
              flush_input: bool = False) -> list[float]:
        for _ in range(settings.warmup):
            vm["main"](*args)
        if self.flush_weights:  # one call per sample, caches flushed before it (but the input's)
            # an image-fed layer meets its input cold too: a whole model has streamed every other
            # layer's weights and activations through the caches since the image was last read
            # (resnet18's stem unit +0.21 ms with it, toward the whole build's stem kernels)
            f = vm.module.time_evaluator("main", dev, number=1, repeat=settings.repeat * settings.number,
                                         min_repeat_ms=0, f_preproc="cache_flush_cpu_non_first_arg",
                                         cache_flush_bytes=FLUSH_ALL_BYTES if flush_input else 0)
        else:
            f = vm.time_evaluator("main", dev, number=settings.number, repeat=settings.repeat,
                                  min_repeat_ms=int(settings.min_repeat_ms))
        return list(f(*args).results)

    @staticmethod
    def _args(unit: Unit, params: list[np.ndarray], dev: Any) -> list[Any]:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in [*unit.inputs.values(), *params]]

    def _run_local(self, ex: Any, unit: Unit, params: list[np.ndarray], settings: MeasureSettings, *,
                   flush_input: bool = False) -> list[float]:
        import tvm
        from tvm import relax

        dev = tvm.cpu()
        vm = relax.VirtualMachine(ex, dev)
        return self._time(vm, dev, self._args(unit, params, dev), settings, flush_input=flush_input)

    def _run_remote(self, ex: Any, unit: Unit, params: list[np.ndarray], settings: MeasureSettings,
                    lib: str | None = None, *, flush_input: bool = False) -> list[float]:
        from tvm import relax, rpc

        from lcpaq.profiler.rpc import check_tracker

        check_tracker(self.rpc)
        tracker = rpc.connect_tracker(self.rpc.host, self.rpc.port)
        remote = tracker.request(self.rpc.key, priority=1, session_timeout=int(settings.timeout_s))
        with tempfile.TemporaryDirectory() as d:
            path = lib or os.path.join(d, "unit.so")  # a kept tuned build is uploaded as is
            if lib is None:
                ex.export_library(path)
            remote.upload(path, target="unit.so")
        rlib = remote.load_module("unit.so")
        dev = remote.cpu()
        vm = relax.VirtualMachine(rlib, dev)
        return self._time(vm, dev, self._args(unit, params, dev), settings, flush_input=flush_input)


register_backend("tvm", TvmBackend)
