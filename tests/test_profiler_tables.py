"""Profiler: device-profile validation, table append/resume after kill -9, torn lines, ORT units,
prediction vs whole-graph measurement, missing entries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lcpaq.errors import MissingLatencyError, ProfileError, TableError
from lcpaq.graph import trace
from lcpaq.policy import Policy
from lcpaq.profiler.hwprofile import load_profile
from lcpaq.profiler.predict import latency_model
from lcpaq.profiler.run import OVERHEAD_KEY, plan_units, profile
from lcpaq.profiler.table import TableWriter, read_dataframe, read_table
from lcpaq.testing.models import TinyResNet

GOOD = textwrap.dedent("""
    [device]
    name = "t"
    [backend]
    name = "{backend}"
    threads = 1
    [candidates]
    bits = ["w4a8", "w8a8", "fp32"]
    [measure]
    warmup = 1
    number = 2
    repeat = 3
""")


def _hw(tmp_path, backend="fake", extra=""):
    p = tmp_path / "hw.toml"
    p.write_text(GOOD.format(backend=backend) + extra)
    return load_profile(p)


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.replace('name = "fake"', 'name = "npu"'), "'name' = 'npu' is unknown"),
    (lambda s: s.replace("threads = 1", "threads = 0"), "threads"),
    (lambda s: s.replace('"w4a8"', '"w9a8"'), "w_bits=9"),
    (lambda s: s.replace("repeat = 3", 'repeat = "x"'), "'repeat' must be a int"),
    (lambda s: s.replace("[device]", "[dev]"), "missing field 'device'"),
    (lambda s: s + "[rpc]\nhost = 'h'\n", "missing field 'port'"),
    (lambda s: s + "\n[[[", "not valid TOML"),
], ids=["backend", "threads", "bits", "type", "section", "rpc", "toml"])
def test_profile_validation_names_field(tmp_path, mutate, needle):
    p = tmp_path / "bad.toml"
    p.write_text(mutate(GOOD.format(backend="fake")))
    with pytest.raises(ProfileError, match=needle.replace("[", r"\[")):
        load_profile(p)


def test_shipped_profiles_load():
    import glob

    names = [load_profile(f).name for f in sorted(glob.glob("hw_profiles/*.toml"))]
    assert {"host-cpu-ort", "host-cpu-tvm", "host-cpu-kernels", "rpi4-tvm-rpc"} <= set(names)


def test_table_append_resume_and_torn_line(tmp_path):
    path = tmp_path / "t.jsonl"
    with TableWriter(path, {"profile": "p", "backend": "fake"}) as tw:
        tw.append({"key": "a", "median_ms": 1.0})
    with TableWriter(path, {"profile": "p", "backend": "fake"}) as tw:
        assert tw.done == {"a"}
        tw.append({"key": "b", "median_ms": 2.0})
    with path.open("a") as f:
        f.write('{"key": "c", "med')  # torn write
    with pytest.raises(TableError, match="trailing line"):
        read_table(path)
    t = read_table(path, repair=True)
    assert set(t.rows) == {"a", "b"}
    assert len(read_dataframe(path)) == 2
    with pytest.raises(TableError, match="profile"):
        TableWriter(path, {"profile": "other", "backend": "fake"})


def test_profile_with_fake_backend_and_missing_entries(tmp_path):
    inv = trace(TinyResNet(), TinyResNet.input_shape, name="tiny")
    hw = _hw(tmp_path)
    out = profile(inv, hw, tmp_path / "t.jsonl", isolate=False)
    t = read_table(out)
    assert len(t) == len(plan_units(inv, hw.candidates)) + 1
    lm = latency_model(out, inv, hw.candidates)
    assert lm.predict(Policy.uniform(inv.names, 8, 8)) < lm.predict(Policy.uniform(inv.names, 32, 32))
    mixed = Policy.uniform(inv.names, 8, 8).replace(conv1=(32, 32))
    assert any("->" in k for k in lm.breakdown(mixed))  # transitions are visible
    with pytest.raises(MissingLatencyError, match="lcpaq profile --hw"):
        latency_model(out, inv, [(2, 8)])


KILL_SCRIPT = """
import sys
from lcpaq.graph import trace_named
from lcpaq.profiler.hwprofile import load_profile
from lcpaq.profiler.run import profile
_, inv = trace_named("resnet18")
profile(inv, load_profile(sys.argv[1]), sys.argv[2], isolate=False,
        progress=lambda d, t, n: print(d, flush=True))
"""


def test_kill9_mid_run_resumes_without_loss_or_duplicates(tmp_path):
    hw_path = tmp_path / "hw.toml"
    hw_path.write_text(GOOD.format(backend="ort").replace("repeat = 3", "repeat = 2")
                       .replace('["w4a8", "w8a8", "fp32"]', '["w8a8", "fp32"]'))
    out = tmp_path / "r18.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(hw_path), str(out)],
                            stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 240
    while seen < 8 and time.time() < deadline:  # wait until a few rows are on disk
        line = proc.stdout.readline()
        if not line:
            break
        seen = int(line.split()[0])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen >= 8
    before = read_table(out, repair=True)
    assert 0 < len(before)
    hw = load_profile(hw_path)
    from lcpaq.graph import trace_named

    _, inv = trace_named("resnet18")
    plan = plan_units(inv, hw.candidates)
    assert len(before) < len(plan) + 1
    profile(inv, hw, out, isolate=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == len(plan) + 1  # nothing lost, nothing twice
    for k, r in before.rows.items():  # finished rows were kept, not re-measured
        assert next(x for x in lines if x["key"] == k)["median_ms"] == r["median_ms"]
    assert OVERHEAD_KEY in keys


def test_ort_units_isolated_and_prediction_tracks_measurement(tmp_path):
    """Real ORT: int8 units are faster than fp32 for a 3x3 conv; errors are rows, not crashes."""
    inv = trace(TinyResNet(width=32), (1, 3, 32, 32), name="tiny32")
    hw = _hw(tmp_path, backend="ort")
    out = profile(inv, hw, tmp_path / "o.jsonl")  # through the isolated worker
    t = read_table(out)
    assert not [r for r in t if r.get("error")]
    lm = latency_model(out, inv, hw.candidates)
    f, q = lm.layer_ms("conv1", (32, 32)), lm.layer_ms("conv1", (8, 8))
    assert q < f
    assert t.get(OVERHEAD_KEY)["median_ms"] > 0
