"""Session 7 fixes of user-facing defects outside the CLI (notes/qa.md): the profiling worker and
Ctrl-C, table read errors, JSON latency tables by schema, the HiGHS banner, typos in device
profiles, --weights errors, the Hutchinson stop rule, profile with nothing left to measure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _profiles import FAKE_PROFILE

from lcpaq.errors import ConfigError, ProfileError, TableError, TableSetupError
from lcpaq.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

PROFILE = FAKE_PROFILE


# 1. the profiling worker: Ctrl-C is the parent's; a closed pipe ends it without a word

def _worker() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lcpaq.profiler.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def test_worker_ignores_ctrl_c_and_exits_quietly_when_its_pipe_closes():
    from lcpaq.profiler import worker

    p = _worker()
    worker.send(p.stdin, ("fake", None))
    assert worker.recv(p.stdout)[0] == "ready"
    p.send_signal(signal.SIGINT)  # what Ctrl-C sends to the whole process group
    time.sleep(0.3)
    assert p.poll() is None  # still serving: the parent decides
    p.stdin.close()  # the parent's answer to Ctrl-C
    assert p.wait(20) == 0
    assert p.stderr.read() == b""


def test_worker_pipe_closed_before_the_handshake_is_quiet():
    p = _worker()
    p.stdin.close()
    assert p.wait(20) == 0
    assert b"Traceback" not in p.stderr.read()


# 2. table read errors

def test_non_utf8_table_is_a_table_error_naming_file_and_line(tmp_path):
    from lcpaq.profiler.table import read_table

    b = tmp_path / "b.jsonl"
    b.write_bytes(b'{"schema": "lcpaq.latency_table/1"}\n\x00\xff\xfe x\n')
    with pytest.raises(TableError, match=r"b\.jsonl: line 2 is not UTF-8"):
        read_table(b)


def test_torn_line_names_the_command_that_repairs_it(tmp_path):
    from lcpaq.profiler.table import TableWriter, read_table

    path = tmp_path / "t.jsonl"
    with TableWriter(path, {"profile": "p", "backend": "fake"}) as tw:
        tw.append({"key": "a", "median_ms": 1.0})
    with path.open("a") as f:
        f.write('{"key": "b", "med')
    with pytest.raises(TableError) as e:
        read_table(path)
    assert f"lcpaq profile --hw PROFILE --model MODEL --out {path} --repair" in str(e.value)
    assert "re-run with" not in str(e.value)


# 3. JSON latency tables are told apart by their schema

CANDS = [(4, 8), (8, 8), (32, 32)]


def _segment_table(layers: list[str]):
    """A kernels segment table over ``layers`` (each layer fused with the next in pairs), rows
    generated from known unit costs."""
    from lcpaq.profiler.backends import kernels_check as kc

    partners = {n: [] for n in layers}
    for a, b in zip(layers[0::2], layers[1::2], strict=False):
        partners[a], partners[b] = [b], [a]
    plan = kc.SegmentPlan(list(layers), partners)
    rng = np.random.default_rng(0)
    cost = {(n, c): 0.01 + 0.01 * rng.random() + (0.02 if 32 in c else 0.0) for n in layers for c in CANDS}
    pols = kc.design_segment_policies(plan, CANDS, np.random.default_rng(1))
    t = kc.SegmentTable(plan)
    for pol in pols:
        segs = {n: cost[(n, tuple(pol[n]))] for n in layers}
        t.rows.append({"policy": {n: list(p) for n, p in pol.items()}, "segments": segs,
                       "whole_ms": 0.05 + sum(segs.values()), "ref_ms": 1.0})
    return t


def test_segment_table_gives_the_demo_latency_model_and_other_json_is_refused(tmp_path):
    from lcpaq.graph import trace
    from lcpaq.profiler.backends.kernels_check import SEGMENT_SCHEMA, fit_segment_model
    from lcpaq.profiler.predict import latency_model
    from lcpaq.testing.models import TinyResNet

    inv = trace(TinyResNet(), TinyResNet.input_shape, name="tiny")
    st = _segment_table(list(inv.names))
    path = tmp_path / "latency_segments.json"
    st.save(path)
    lm, ref = latency_model(path, inv, CANDS), fit_segment_model(st, CANDS)
    rng = np.random.default_rng(2)
    for _ in range(5):
        pol = Policy({n: CANDS[int(rng.integers(3))] for n in inv.names})
        assert lm.predict(pol) == pytest.approx(ref.predict(pol), rel=1e-12)
    assert lm.meta["table"] == str(path) and lm.meta["correction"] == "trans"  # fit_segment_model's default

    other = tmp_path / "sens.json"
    other.write_text(json.dumps({"schema": "lcpaq.sensitivity/1"}))
    with pytest.raises(TableError) as e:
        latency_model(other, inv, CANDS)
    msg = str(e.value)
    assert "lcpaq.sensitivity/1" in msg and SEGMENT_SCHEMA in msg and "lcpaq.block_table/1" in msg
    wrong = _segment_table(list(inv.names)[1:])  # another model's layers
    wrong.save(path)
    with pytest.raises(TableError, match="other layers"):
        latency_model(path, inv, CANDS)


# 4. the HiGHS banner never reaches a library user's stdout

def test_highs_solve_prints_nothing_on_stdout():
    code = ("from lcpaq.search import solve_ilp\nfrom lcpaq.testing.synthetic import random_problem\n"
            "r = solve_ilp(random_problem(5, seed=0, budget_frac=0.4), solver='highs')\nprint(r.status)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Optimal\n"  # HiGHS' "Running HiGHS ..." banner was here


# 5. typos in a device profile

@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.replace("repeat = 2", "reapeat = 2"),
     r"\[measure\]: unknown key 'reapeat' \(did you mean 'repeat'\?\); accepted: warmup, number, repeat"),
    (lambda s: s.replace("[measure]", "[mesure]"), r"unknown table 'mesure' \(did you mean 'measure'\?\)"),
    (lambda s: s + "[tvm]\ntrails = 8\n", r"\[tvm\]: unknown key 'trails' \(did you mean 'trials'\?\)"),
    (lambda s: s.replace("threads = 1", "threads = 1\nthread = 2"), r"\[backend\]: unknown key 'thread'"),
    (lambda s: s + "[extras]\nx = 1\n", r"unknown table 'extras'; accepted: device, backend"),
], ids=["key", "table", "tvm", "backend", "no-close-match"])
def test_profile_typos_are_refused_naming_the_field(tmp_path, mutate, needle):
    from lcpaq.profiler.hwprofile import load_profile

    p = tmp_path / "hw.toml"
    p.write_text(mutate(PROFILE))
    with pytest.raises(ProfileError, match=needle):
        load_profile(p)


def test_tvm_profile_keys_are_the_ones_the_backend_reads():
    """The typo check accepts exactly the `[tvm]` keys TvmBackend reads (declared once, beside them)."""
    import re

    from lcpaq.profiler.backends.tvm import PROFILE_KEYS
    from lcpaq.profiler.hwprofile import KNOWN_KEYS

    read = set(re.findall(r'tvm_cfg\.get\("(\w+)"', (ROOT / "lcpaq" / "profiler" / "backends" / "tvm.py").read_text()))
    assert read and read == set(PROFILE_KEYS) and KNOWN_KEYS["tvm"] == PROFILE_KEYS


def test_every_shipped_profile_still_loads():
    from lcpaq.profiler.hwprofile import load_profile

    files = sorted((ROOT / "hw_profiles").glob("*.toml"))
    assert len(files) >= 4 and all(load_profile(f).name for f in files)


# 6. --weights errors are one short line

def test_weights_of_another_model_are_one_short_line(tmp_path):
    from lcpaq.models import get_model

    torch.save(get_model("mnist_resnet").state_dict(), tmp_path / "q.pt")
    with pytest.raises(ConfigError) as e:
        get_model("resnet18", weights=tmp_path / "q.pt")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    assert "114 missing (layer1.0.conv1.weight, layer1.0.bn1.weight, layer1.0.bn1.bias, ...)" in msg
    assert "48 unexpected (" in msg and "check that --model" in msg

    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")  # a whole module, not a state_dict
    with pytest.raises(ConfigError, match="not a state_dict") as e:
        get_model("mnist_resnet", weights=tmp_path / "whole.pt")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


# 8. profile with nothing left to measure starts no worker

def test_finished_table_starts_no_worker_and_still_checks_the_runtime(tmp_path, monkeypatch):
    from lcpaq.graph import trace
    from lcpaq.profiler import run
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.table import read_table
    from lcpaq.testing.models import TinyMLP

    (tmp_path / "hw.toml").write_text(PROFILE)
    hw = load_profile(tmp_path / "hw.toml")
    inv = trace(TinyMLP(), (1, 8), name="mlp")
    out = run.profile(inv, hw, tmp_path / "t.jsonl")  # isolated: one worker
    before = out.read_bytes()

    def no_worker(self):
        raise AssertionError("a worker was started with nothing to measure")

    monkeypatch.setattr(run.IsolatedRunner, "_start", no_worker)
    run.profile(inv, hw, out)
    assert out.read_bytes() == before
    # the runtime versions still come into the header: a table of another runtime is refused
    lines = before.decode().splitlines()
    head = json.loads(lines[0])
    head["versions"] = {"fake": "0"}
    out.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(TableSetupError, match="versions"):
        run.profile(inv, hw, out)
    assert len(read_table(out)) == len(lines) - 1


# 7. the Hutchinson stop rule: a near-zero trace no longer keeps every run at max_probes

def test_floored_stop_rule_stops_early_and_agrees_with_the_full_run():
    from lcpaq.sensitivity import hutchinson_traces
    from lcpaq.sensitivity.stats import TRACE_FLOOR
    from lcpaq.testing.models import TinyMLP

    torch.manual_seed(0)
    m = TinyMLP().eval()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def run(**kw):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: threads only contend with the other tests' processes
        try:
            w, a, _ = hutchinson_traces(m, x, y, ["fc1", "fc2"], max_probes=400, seed=0, **kw)
        finally:
            torch.set_num_threads(threads)
        return {**{f"w:{k}": v for k, v in w.items()}, **{f"a:{k}": v for k, v in a.items()}}

    early = run(tol=0.3)
    n = early["w:fc1"].probes
    assert 10 <= n < 300  # stopped on the rule, well before max_probes
    assert run(tol=0.3) == early  # seeded: the same probes, the same stop
    # the input of fc1 has a trace near 0: |stderr / mean| alone never gets below tol
    assert abs(early["a:fc1"].mean) < 0.05 * abs(early["a:fc2"].mean)
    assert run(tol=0.3, floor=0.0)["w:fc1"].probes == 400
    big = {g: max(abs(e.mean) for k, e in early.items() if k[0] == g) for g in "wa"}
    for k, e in early.items():  # what the rule promised at the stop
        assert e.stderr < 0.3 * max(abs(e.mean), TRACE_FLOOR * big[k[0]])
    full = run(tol=1e-9)
    assert full["w:fc1"].probes == 400
    for k, e in early.items():  # the early traces are the full run's within their standard errors
        assert abs(e.mean - full[k].mean) <= 2 * e.stderr, k
