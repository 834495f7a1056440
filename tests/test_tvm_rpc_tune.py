"""MetaSchedule tuning through a loopback TVM RPC tracker (the remote-board path), opt-in: ~1.5 min."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from _tvm_util import conv_layer, require_tvm

require_tvm()

from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend  # noqa: E402
from lcpaq.profiler.hwprofile import load_profile  # noqa: E402
from lcpaq.profiler.rpc import local_tracker  # noqa: E402
from lcpaq.profiler.units import build_unit  # noqa: E402


@pytest.mark.skipif(os.environ.get("LCPAQ_TVM_TUNE_TEST") != "1",
                    reason="MetaSchedule tuning over RPC takes ~1.5 min on the shared 2-core VM; "
                           "set LCPAQ_TVM_TUNE_TEST=1")
def test_tunes_and_measures_through_loopback_tracker(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    prof = load_profile(os.path.join(os.path.dirname(__file__), "..", "hw_profiles", "host-cpu-tvm.toml"))
    layer = conv_layer(c=8, o=16, hw=8)
    with local_tracker(key="lcpaq-tune-test") as rpc:
        remote = dataclasses.replace(prof, rpc=rpc, tvm={**prof.tvm, "trials": 4, "work_dir": str(tmp_path)})
        be = get_backend("tvm", remote)
        units = []
        for bits in [(8, 8), (32, 32)]:
            b, feeds = build_unit(layer, bits, "int8")
            units.append(Unit(key=f"{layer.name}-w{bits[0]}a{bits[1]}", onnx=b, inputs=feeds, bits=bits))
        be.prepare(units)
        assert isinstance(be._tuner._get_pools()[1], ms.runner.RPCRunner)
        results = [be.measure(u, MeasureSettings(warmup=1, number=2, repeat=3)) for u in units]
    for m in results:
        assert m.ok, m.error
        assert m.extra["remote"] is True and m.extra["tuned"] is True and m.median_ms > 0
    # the records measured on the board are in the database kept with the table
    dbs = list(tmp_path.glob("*/database_tuning_record.json"))
    assert len(dbs) == 1
    records = [json.loads(line) for line in dbs[0].read_text().splitlines() if line.strip()]
    assert len(records) >= 2
