"""Tables from two setups never mix: resume refuses a table measured on another host/runtime/
settings (naming the field), `lcpaq profile --fresh` keeps the old table under a dated name, and
`lcpaq tables diff` reports the setup change beside the per-workload ratios."""

from __future__ import annotations

import json
import sys

import pytest
from _profiles import FAKE_PROFILE

from lcpaq.errors import TableSetupError
from lcpaq.profiler.table import TableWriter, header_changes, host_isa, keep_previous, read_table

BASE = {"profile": "p", "backend": "fake", "threads": 1, "settings": {"repeat": 3},
        "versions": {"onnxruntime": "1.32.0"}, "host_cpu": "AMD EPYC x2", "host_isa": "x86_64: avx2 fma"}


def _row(key, ms, spread=0.01):
    return {"key": key, "workload": key, "w_bits": 8, "a_bits": 8, "median_ms": ms,
            "p10_ms": ms * (1 - spread), "p90_ms": ms * (1 + spread), "n": 5, "error": None}


def test_host_isa_names_cpu_features():
    isa = host_isa()
    assert isa and isa.split(":")[0].strip()  # at least the machine
    if sys.platform == "linux":
        flags = open("/proc/cpuinfo").read()
        assert (" avx2" in flags) == (" avx2" in isa + " ")  # reported exactly when present


@pytest.mark.parametrize("field,value", [
    ("versions", {"onnxruntime": "1.33.0"}), ("host_isa", "x86_64: avx2 fma avx512_vnni"),
    ("threads", 2), ("settings", {"repeat": 5})])
def test_resume_refuses_another_setup(tmp_path, field, value):
    path = tmp_path / "t.jsonl"
    with TableWriter(path, BASE) as tw:
        tw.append(_row("a", 1.0))
    with TableWriter(path, dict(BASE, date="later")) as tw:  # same setup: resumes
        assert tw.done == {"a"}
    with pytest.raises(TableSetupError, match=f"{field}.*--fresh"):
        TableWriter(path, dict(BASE, **{field: value}))
    assert set(read_table(path).rows) == {"a"}  # untouched


def test_old_header_without_a_field_still_resumes(tmp_path):
    path = tmp_path / "t.jsonl"
    old = {k: v for k, v in BASE.items() if k != "host_isa"}
    with TableWriter(path, old) as tw:
        tw.append(_row("a", 1.0))
    with TableWriter(path, BASE) as tw:
        assert tw.done == {"a"}
    assert header_changes(old, BASE) == []


def test_keep_previous_never_overwrites(tmp_path):
    path = tmp_path / "m.jsonl"
    kept = []
    for _ in range(2):
        with TableWriter(path, dict(BASE, date="2026-11-22T13:34:20+00:00")) as tw:
            tw.append(_row("a", 1.0))
        kept.append(keep_previous(path))
    assert not path.exists() and len(set(kept)) == 2 and all(k.exists() for k in kept)
    assert kept[0].name.startswith("m.2026-11-22T13-34-20")


class _Run:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


@pytest.fixture
def cli(capsys):
    from lcpaq.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main(list(args))
        o = capsys.readouterr()
        return _Run(rc, o.out, o.err)
    return run


def test_tables_diff_reports_setup_and_flags(tmp_path, cli):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    with TableWriter(old, BASE) as tw:
        for k, ms in (("conv_a", 1.0), ("conv_b", 2.0), ("conv_c", 3.0)):
            tw.append(_row(k, ms))
    with TableWriter(new, dict(BASE, host_isa="x86_64: avx2 fma avx512_vnni")) as tw:
        for k, ms in (("conv_a", 0.5), ("conv_b", 2.01), ("conv_c", 3.6), ("conv_d", 1.0)):
            tw.append(_row(k, ms))
    r = cli("tables", "diff", str(old), str(new), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["setup_changes"] == [{"field": "host_isa", "old": "x86_64: avx2 fma",
                                     "new": "x86_64: avx2 fma avx512_vnni"}]
    flags = {row["key"]: (round(row["ratio"], 3), row["flag"]) for row in out["rows"]}
    assert flags == {"conv_a": (0.5, "improvement"), "conv_b": (1.005, ""), "conv_c": (1.2, "regression")}
    r = cli("tables", "diff", str(old), str(new))
    assert r.returncode == 0 and "setup changed: host_isa" in r.stdout and "1 regressions" in r.stdout
    r = cli("tables", "diff", str(old), str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2


PROFILE = FAKE_PROFILE


def test_profile_cli_refuses_other_setup_then_fresh_keeps_old(tmp_path, cli):
    hw = tmp_path / "hw.toml"
    hw.write_text(PROFILE)
    out = tmp_path / "t.jsonl"
    r = cli("profile", "--hw", str(hw), "--model", "mnist_resnet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    n = len(read_table(out))
    hw.write_text(PROFILE.replace("repeat = 2", "repeat = 3"))  # other measurement settings
    r = cli("profile", "--hw", str(hw), "--model", "mnist_resnet", "--out", str(out))
    assert r.returncode == 2 and "settings" in r.stderr and "--fresh" in r.stderr
    r = cli("profile", "--hw", str(hw), "--model", "mnist_resnet", "--out", str(out), "--fresh")
    assert r.returncode == 0, r.stderr
    kept = [p for p in tmp_path.glob("t.*.jsonl")]
    assert len(kept) == 1 and len(read_table(kept[0])) == n == len(read_table(out))
    assert read_table(out).header["settings"]["repeat"] == 3


def test_demo_profile_stage_restarts_a_table_from_another_setup(tmp_path):
    """`lcpaq demo` resumes its own table, but one measured on another setup is kept aside under a
    dated name and the table is measured again (the demo must not fail after a host change)."""
    from lcpaq.deploy.demo import stage_profile
    from lcpaq.graph import trace
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.testing.models import TinyResNet

    class Prog:
        def add_task(self, *a, **k):
            return 0

        def update(self, *a, **k):
            pass

    (tmp_path / "hw.toml").write_text(PROFILE)
    hw = load_profile(tmp_path / "hw.toml")
    inv = trace(TinyResNet(), TinyResNet.input_shape, name="tiny")
    path = stage_profile(inv, hw, tmp_path, Prog())
    n = len(read_table(path))
    with TableWriter(tmp_path / "other.jsonl", dict(read_table(path).header, host_isa="elsewhere")) as tw:
        tw.append(_row("x", 1.0))
    (tmp_path / "other.jsonl").replace(path)  # the report folder now holds another setup's table
    path = stage_profile(inv, hw, tmp_path, Prog())
    assert len(read_table(path)) == n and read_table(path).header["host_isa"] == host_isa()
    kept = [p for p in tmp_path.glob("latency_table.*.jsonl")]
    assert len(kept) == 1 and set(read_table(kept[0]).rows) == {"x"}


def test_prepare_step_sees_every_missing_unit_once(tmp_path):
    """A backend with ``prepare`` (TVM: tune all tasks in one run) gets every unit a table run is
    about to measure, once, before measuring; a resumed run hands it only the missing ones; the
    isolated worker answers the prepare message for a backend without one."""
    from lcpaq.graph import trace
    from lcpaq.profiler.backend import register_backend, wants_prepare
    from lcpaq.profiler.backends.fake import FakeBackend
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.run import IsolatedRunner, plan_units, profile
    from lcpaq.testing.models import TinyResNet

    calls: list[list[str]] = []

    class Preparing(FakeBackend):
        def prepare(self, units):
            calls.append([u.key for u in units])
            return {"tuned_now": len(units)}

    register_backend("fake-prepare", Preparing)
    assert wants_prepare("fake-prepare") and not wants_prepare("fake") and not wants_prepare("ort")
    import dataclasses

    (tmp_path / "hw.toml").write_text(PROFILE)
    hw = dataclasses.replace(load_profile(tmp_path / "hw.toml"), backend="fake-prepare")
    inv = trace(TinyResNet(), TinyResNet.input_shape, name="tiny")
    plan = plan_units(inv, hw.candidates)
    out = tmp_path / "t.jsonl"
    with TableWriter(out, {"profile": hw.name, "backend": hw.backend}) as tw:  # a run cut short
        for key, *_ in plan[:3]:
            tw.append(_row(key, 1.0))
    profile(inv, hw, out, isolate=False)
    assert calls == [[p[0] for p in plan[3:]]]
    assert len(read_table(out)) == len(plan) + 1
    profile(inv, hw, out, isolate=False)  # complete: nothing to prepare
    assert len(calls) == 1
    with IsolatedRunner("fake", load_profile(tmp_path / "hw.toml")) as r:
        assert r.prepare([], 30.0) == {}


# what lcpaq itself decides about a table's setup; the runtime versions (pip may serve newer ones)
# and the target the host resolves (-mcpu=native) are the machine's, not the repository's
RUNTIME_VERSION_KEYS = {"onnxruntime", "tvm", "tvm_ffi", "tvm_target", "torch", "lcpaq-kernels"}


@pytest.mark.parametrize("profile_name", ["host-cpu-ort", "host-cpu-tvm"])
def test_committed_tables_resume_with_the_shipped_profile(profile_name):
    """A committed table must be one `lcpaq profile --hw <shipped profile>` resumes (or reports
    complete) rather than refusing it as another setup: same profile, settings and lcpaq-side
    lowering (e.g. TVM's epilogue / cold-weight timing, recorded in the versions)."""
    from pathlib import Path

    from lcpaq.profiler.backend import get_backend
    from lcpaq.profiler.hwprofile import load_profile

    root = Path(__file__).resolve().parent.parent
    hw = load_profile(root / "hw_profiles" / f"{profile_name}.toml")
    if hw.backend == "tvm":
        pytest.importorskip("tvm")
    versions = get_backend(hw.backend, hw).versions()
    tables = sorted((root / "latency_tables" / profile_name).glob("*.jsonl"))
    assert tables, f"no committed table under latency_tables/{profile_name}"
    for t in tables:
        head = json.loads(t.read_text().splitlines()[0])
        want = {"profile": hw.name, "profile_version": hw.version, "backend": hw.backend, "target": hw.target,
                "threads": hw.threads, "settings": hw.settings.__dict__,
                "versions": {k: v for k, v in versions.items() if k not in RUNTIME_VERSION_KEYS}}
        have = {**head, "versions": {k: v for k, v in head["versions"].items() if k not in RUNTIME_VERSION_KEYS}}
        assert header_changes(have, want) == [], t.name
