"""Deployments: a fake-quant model under its policy, running on a real runtime.

``deploy(fq_model, hw, input_shape, calib_inputs=...)`` returns a :class:`Deployment` with
``run(x) -> np.ndarray`` (for output checks) and ``call`` (one timed batch-1 inference), for

* ``ort``           -- the whole-model ONNX QDQ graph (lcpaq.deploy.qdq) on ONNX Runtime;
* ``lcpaq-kernels`` -- the model converted to lcpaq's integer kernels (lcpaq.kernels.convert);
* ``tvm``           -- the QDQ graph compiled by the TVM backend (lcpaq.profiler.backends.tvm),
  locally or on an RPC board, when that backend provides ``compile_onnx``.

Runtimes are imported lazily. :func:`check_outputs` compares a deployment with the fake-quant model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lcpaq.errors import BackendUnavailableError

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    backend: str
    run: Callable[[np.ndarray], np.ndarray]  # any batch -> logits
    call: Callable[[], Any]  # one batch-1 inference on a fixed input (what is timed)
    artifact: bytes | None = None  # ONNX bytes (ort/tvm)
    notes: list[str] = field(default_factory=list)
    profile_layers: Callable[[int], dict[str, float]] | None = None  # per-layer ms, where possible
    # The runtime's own timer, settings -> (primary ms samples, wall ms samples); None = time `call`.
    timer: Callable[[Any], tuple[np.ndarray, np.ndarray]] | None = None


def deploy(fq_model: Any, backend: str, input_shape: Sequence[int], *, threads: int = 1,
           calib_inputs: Sequence[np.ndarray] = (), hw: Any = None) -> Deployment:
    """Deploy a calibrated fake-quant model on ``backend`` ('ort', 'lcpaq-kernels', 'tvm')."""
    x1 = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    if backend == "ort":
        return _deploy_ort(fq_model, input_shape, threads, calib_inputs, x1)
    if backend == "lcpaq-kernels":
        return _deploy_kernels(fq_model, threads, x1)
    if backend == "tvm":
        return _deploy_tvm(fq_model, input_shape, threads, calib_inputs, x1, hw)
    raise BackendUnavailableError(
        f"cannot deploy on backend '{backend}': validate needs a real runtime (ort, lcpaq-kernels, tvm)")


def _deploy_ort(fq: Any, input_shape: Sequence[int], threads: int, calib: Sequence[np.ndarray],
                x1: np.ndarray) -> Deployment:
    from lcpaq.deploy.qdq import export_qdq
    from lcpaq.profiler.backends.ort import session

    onnx_bytes = export_qdq(fq, input_shape, calib_inputs=calib)
    sess = session(onnx_bytes, threads)
    name = sess.get_inputs()[0].name
    feed = {name: x1}

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.asarray(x, np.float32)})[0]

    def profile_layers(runs: int) -> dict[str, float]:
        return ort_layer_profile(onnx_bytes, threads, x1, runs, layer_names(fq),
                                 {n for n, _ in fq.named_modules()})

    return Deployment("ort", run, lambda: sess.run(None, feed), onnx_bytes,
                      ["8-bit weights stored on a 7-bit grid (ORT AVX2 int8 conv saturation)"],
                      profile_layers)


def _deploy_kernels(fq: Any, threads: int, x1: np.ndarray) -> Deployment:
    import torch

    from lcpaq.kernels import convert, status

    st = status()
    if not st.loaded:
        raise BackendUnavailableError(f"lcpaq-kernels: compiled extension not available ({st.reason}); "
                                      "build it with `pip install -e . --no-build-isolation`")
    m = convert(copy.deepcopy(fq), inplace=True).eval()
    xt = torch.from_numpy(x1).contiguous(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> np.ndarray:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return m(torch.from_numpy(np.asarray(x, np.float32))).numpy()
        finally:
            torch.set_num_threads(old)

    def call() -> Any:
        with torch.inference_mode():
            return m(xt)

    return Deployment("lcpaq-kernels", run, call, None, [f"threads set by caller: {threads}"])


def _deploy_tvm(fq: Any, input_shape: Sequence[int], threads: int, calib: Sequence[np.ndarray],
                x1: np.ndarray, hw: Any) -> Deployment:
    """The QDQ graph (static batch 1) of ``fq`` compiled by the TVM backend (:func:`deploy_tvm_onnx`)."""
    from lcpaq.deploy.qdq import export_qdq

    onnx_bytes = export_qdq(fq, input_shape, calib_inputs=calib, dynamic_batch=False)
    return deploy_tvm_onnx(onnx_bytes, x1, hw)


def deploy_tvm_onnx(onnx_bytes: bytes, x1: np.ndarray, hw: Any, *, backend: Any = None) -> Deployment:
    """A whole-model QDQ graph (static batch 1, input ``x``) compiled by the TVM backend: locally or
    on an RPC board.

    QDQ conv/matmul are lowered to int8 compute (lcpaq.profiler.tvm_lower); the profile's
    ``[tvm] trials``/``work_dir`` say whether to tune and where the tuning database lives.
    ``backend``: a TvmBackend to reuse across models (its tuner, pools and loaded libraries).
    On a board ``timer`` is TVM's ``time_evaluator`` (wall, timed there); locally there is none and
    ``call`` (one inference on the calling thread: at 1 TVM thread the calling thread computes, so
    its CPU time can be taken around it) is timed as on every other runtime.
    """
    import tvm
    from tvm import relax

    from lcpaq.profiler.backend import Unit
    from lcpaq.profiler.backends.tvm import TvmBackend

    be = backend if backend is not None else TvmBackend(hw)
    unit = Unit("deploy:whole-model", onnx_bytes, {"x": x1}, {}, (8, 8))
    ex, kernel, params, info = be.compile(unit)  # params: weights lifted out of the library
    if be.rpc is None:
        dev = tvm.cpu()
        vm = relax.VirtualMachine(ex, dev)
    else:  # a session on the board: upload the library once, run and time there
        import os
        import tempfile

        from tvm import rpc

        remote = rpc.connect_tracker(be.rpc.host, be.rpc.port).request(be.rpc.key, priority=1,
                                                                        session_timeout=600)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.so")
            ex.export_library(path)
            remote.upload(path)
        dev = remote.cpu()
        vm = relax.VirtualMachine(remote.load_module("model.so"), dev)

    weights = [tvm.runtime.tensor(np.ascontiguousarray(p), dev) for p in params]

    def one(x: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), dev), *weights)
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()

    def run(xs: np.ndarray) -> np.ndarray:  # static batch 1: one sample at a time
        return np.concatenate([one(xs[i:i + 1]) for i in range(len(xs))])

    arg = tvm.runtime.tensor(np.ascontiguousarray(x1), dev)

    def timer(settings: Any) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(settings.warmup):
            vm["main"](arg, *weights)
        f = vm.time_evaluator("main", dev, number=settings.number, repeat=settings.repeat,
                              min_repeat_ms=int(settings.min_repeat_ms))
        ms = np.asarray(f(arg, *weights).results, np.float64) * 1e3
        return ms, ms

    notes = [f"tvm kernel: {kernel}", f"tvm compile: {info}"]
    if be.rpc is not None:
        notes.append(f"remote board via tracker {be.rpc.host}:{be.rpc.port} key {be.rpc.key}")
    # on the board, time_evaluator times there; locally `call` is timed like every other runtime
    # (interleaved with the reference, the calling thread's CPU time at 1 thread)
    return Deployment("tvm", run, lambda: vm["main"](arg, *weights), onnx_bytes, notes, None,
                      timer if be.rpc is not None else None)


def layer_names(model: Any) -> list[str]:
    from lcpaq.quant import quantizable_names

    return quantizable_names(model)


def ort_layer_profile(onnx_bytes: bytes, threads: int, x: np.ndarray, runs: int,
                      layers: Sequence[str], modules: set[str]) -> dict[str, float]:
    """Per-layer ms from ONNX Runtime's node profiler (wall time, averaged over ``runs``).

    Nodes that belong to no layer (pooling, flatten, ...) are summed under ``"(other)"``.
    """
    import json
    import os
    import tempfile

    import onnxruntime as ort

    from lcpaq.deploy.qdq import layer_of_node

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as td:
        so.profile_file_prefix = os.path.join(td, "ort")
        sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(3):
            sess.run(None, {name: x})
        sess.end_profiling()  # drop warm-up events
        so2 = so
        sess = ort.InferenceSession(onnx_bytes, so2, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, {name: x})
        path = sess.end_profiling()
        events = json.loads(open(path).read())
    out: dict[str, float] = {}
    names_seen: list[str] = []
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        ly = layer_of_node(node, layers, modules) or "(other)"
        names_seen.append(node)
        out[ly] = out.get(ly, 0.0) + float(ev["dur"]) / 1e3 / max(runs, 1)
    log.debug("ORT profiled nodes: %s", sorted(set(names_seen)))
    return out


def check_outputs(dep: Deployment, fq_model: Any, xs: np.ndarray, labels: np.ndarray | None = None
                  ) -> dict[str, float]:
    """Max abs error and top-1 agreement of a deployment against the fake-quant model on ``xs``."""
    import torch

    with torch.no_grad():
        ref = fq_model(torch.from_numpy(np.asarray(xs, np.float32))).numpy()
    out = dep.run(xs)
    res = {
        "max_abs_err": float(np.abs(out - ref).max()),
        "ref_abs_max": float(np.abs(ref).max()),
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
        "n": int(len(xs)),
    }
    if labels is not None:
        res["deployed_acc"] = float(100.0 * (out.argmax(1) == labels).mean())
        res["fakequant_acc"] = float(100.0 * (ref.argmax(1) == labels).mean())
    return res
