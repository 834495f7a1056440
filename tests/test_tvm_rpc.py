"""Profiling through a loopback TVM RPC tracker + server on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
from _tvm_util import conv_layer, linear_layer, require_tvm

require_tvm()

from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend  # noqa: E402
from lcpaq.profiler.hwprofile import load_profile  # noqa: E402
from lcpaq.profiler.rpc import local_tracker  # noqa: E402
from lcpaq.profiler.units import build_unit  # noqa: E402


def test_profiles_workloads_through_loopback_tracker(tmp_path):
    prof = load_profile(os.path.join(os.path.dirname(__file__), "..", "hw_profiles", "host-cpu-tvm.toml"))
    settings = MeasureSettings(warmup=1, number=2, repeat=3)
    workloads = [(conv_layer(c=8, o=16, hw=8), (8, 8)), (conv_layer(c=8, o=16, hw=8), (32, 32)),
                 (linear_layer(), (4, 8))]
    with local_tracker(key="lcpaq-test") as rpc:
        assert rpc.host == "127.0.0.1"
        remote = dataclasses.replace(prof, rpc=rpc, tvm={"trials": 0, "int8_intrin": "avx2", "fp32_layout": "nchwc"})
        be = get_backend("tvm", remote)
        assert be.versions()["rpc"] == f"127.0.0.1:{rpc.port}/lcpaq-test"
        results = []
        for layer, bits in workloads:
            b, feeds = build_unit(layer, bits, "int8")
            results.append(be.measure(Unit(key=layer.name, onnx=b, inputs=feeds, bits=bits), settings))
    for m in results:
        assert m.ok, m.error
        assert m.extra["remote"] is True and m.n == 3 and m.median_ms > 0
    assert [m.kernel for m in results] == ["tvm:conv2d-int8-avx2", "tvm:conv2d-fp32-nchwc", "tvm:matmul-int8"]
    # the tracker is stopped: nothing listens on its port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", rpc.port)) != 0


def test_library_refuses_a_missing_tracker_before_tuning(tmp_path):
    """TVM retries a missing tracker forever (after tuning every task): the backend asks first."""
    import pathlib

    from lcpaq.errors import BackendUnavailableError
    from lcpaq.profiler.backends.tvm import TvmBackend
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.rpc import free_port

    root = pathlib.Path(__file__).resolve().parents[1]
    port = free_port()
    text = (root / "hw_profiles" / "rpi4-tvm-rpc.toml").read_text().replace("port = 9190", f"port = {port}")
    (tmp_path / "p.toml").write_text(text)
    be = TvmBackend(load_profile(tmp_path / "p.toml"), work_dir=tmp_path / "db")
    with pytest.raises(BackendUnavailableError, match=f"no TVM RPC tracker answers at 127.0.0.1:{port}"):
        be.tune([])
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").iterdir())
