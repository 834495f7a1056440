"""The CLI as a user gets it wrong: every mistake is exit code 2 with one line saying what to change,
found before any long work, and no table is touched; Ctrl-C in `lcpaq profile` says how to resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcpaq.cli import main
from lcpaq.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
HW = ROOT / "hw_profiles" / "host-cpu-ort.toml"
EMB = ["conv1", "layer1.conv1", "layer1.conv2", "layer2.downsample.0", "layer2.conv1", "layer2.conv2",
       "layer3.downsample.0", "layer3.conv1", "layer3.conv2", "fc"]
ROW = {"workload": "conv:x", "layer_example": "conv1", "w_bits": 8, "a_bits": 8, "unit_class": "int8",
       "in_class": "fp32", "median_ms": 0.02, "p10_ms": 0.019, "p90_ms": 0.021, "n": 15, "kernel": "k",
       "error": None}


def _table(path: Path, profile: str = "host-cpu-ort", **row_over) -> Path:
    head = {"schema": "lcpaq.latency_table/1", "profile": profile, "backend": "ort", "threads": 1}
    rows = [dict(ROW, key="conv:x|w8a8|in=fp32"), dict(ROW, key="conv:x|w8a8|in=int8", **row_over)]
    path.write_text("\n".join(json.dumps(r) for r in [head, *rows]) + "\n")
    return path


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    omega = d / "omega.json"
    omega.write_text(json.dumps({n: {"w4a8": 0.2 * (i + 1), "w8a8": 0.01} for i, n in enumerate(EMB)}))
    pol = Policy.uniform(EMB, 8, 8).save(d / "p.json")
    afile = d / "afile"
    afile.write_text("x")
    return {"omega": omega, "policy": pol, "dir": d, "afile": afile}


def test_usage_error_is_one_line_naming_the_help(capsys):
    assert main(["profile", "--model", "mnist_resnet"]) == 2
    _one_line_error(capsys, "Missing option '--hw'", "lcpaq profile --help")


@pytest.mark.parametrize("case", ["folder", "under-a-file", "read-only-fs"])
@pytest.mark.parametrize("cmd", ["search", "profile", "sensitivity", "export"])
def test_unwritable_out_fails_before_any_work(files, capsys, cmd, case):
    out = {"folder": files["dir"], "under-a-file": files["afile"] / "o.json",
           "read-only-fs": Path("/proc/lcpaq-test.json")}[case]
    if case == "read-only-fs" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    args = {"search": ["search", "--model", "mnist_resnet", "--sensitivity", str(files["omega"]),
                       "--max-size-mb", "0.05"],
            "profile": ["profile", "--hw", str(HW), "--model", "mnist_resnet"],
            "sensitivity": ["sensitivity", "--model", "mnist_resnet", "--data", "mnist5k", "--probes", "2"],
            "export": ["export", "--model", "mnist_resnet", "--policy", str(files["policy"])]}[cmd]
    assert main([*args, "--out", str(out)]) == 2
    _one_line_error(capsys, "--out")
    assert files["afile"].read_text() == "x"


def test_a_folder_given_as_a_file_is_exit_2(files, capsys):
    table = _table(files["dir"] / "t.jsonl")
    assert main(["predict", "--table", str(table), "--model", "mnist_resnet", "--policy", str(files["dir"])]) == 2
    _one_line_error(capsys, str(files["dir"]), "check the path")


@pytest.mark.parametrize("bad", [{"median_ms": "fast"}, {"median_ms": None}, {"p90_ms": float("nan")}],
                         ids=["str", "null", "nan"])
def test_damaged_table_row_is_named_and_the_table_kept(files, tmp_path, capsys, bad):
    good, broken = _table(tmp_path / "good.jsonl"), _table(tmp_path / "bad.jsonl", **bad)
    before = broken.read_bytes()
    assert main(["tables", "show", str(broken)]) == 2
    _one_line_error(capsys, "conv:x|w8a8|in=int8", "re-run `lcpaq profile`")
    assert main(["tables", "diff", str(good), str(broken)]) == 2
    _one_line_error(capsys, "conv:x|w8a8|in=int8")
    assert main(["predict", "--table", str(broken), "--model", "mnist_resnet", "--policy", str(files["policy"])]) == 2
    _one_line_error(capsys, "conv:x|w8a8|in=int8")
    assert broken.read_bytes() == before


def test_tables_diff_band_must_be_a_fraction(tmp_path, capsys):
    t = _table(tmp_path / "t.jsonl")
    assert main(["tables", "diff", str(t), str(t), "--band", "-1"]) == 2
    _one_line_error(capsys, "--band")
    assert main(["tables", "diff", str(t), str(t), "--band", "0.05", "--json"]) == 0
    assert [r["flag"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["", ""]
    faster = _table(tmp_path / "new.jsonl", median_ms=0.01, p10_ms=0.0099, p90_ms=0.0101)  # after an upgrade
    assert main(["tables", "diff", str(t), str(faster)]) == 0
    assert "0 regressions, 1 improvements" in " ".join(capsys.readouterr().out.split())
    zero = _table(tmp_path / "zero.jsonl", median_ms=0.0, p10_ms=0.0, p90_ms=0.0)  # a clock too coarse
    assert main(["tables", "diff", str(t), str(zero)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "1 common workloads" in text and "no layer workload in common" not in text
    other = tmp_path / "other.jsonl"  # another model's table: only keys the first does not have
    other.write_text(t.read_text().replace("conv:x", "conv:z"))
    assert main(["tables", "diff", str(t), str(other)]) == 0
    assert "no layer workload in common" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("args,needle", [
    (["--bits", ""], "--bits is empty"),
    (["--max-latency-ms", "nan"], "--max-latency-ms nan"),
    (["--max-size-mb", "inf"], "--max-size-mb inf"),
    (["--max-size-mb", "0.05", "--pareto", "front.txt"], ".png"),
    (["--max-size-mb", "0.05", "--pareto", "front.png", "--pareto-points", "0"], "--pareto-points"),
    (["--time-limit", "0"], "--time-limit"),
], ids=["empty-bits", "nan-budget", "inf-budget", "pareto-suffix", "pareto-points", "time-limit"])
def test_search_options_checked_before_solving(files, tmp_path, capsys, args, needle):
    out = tmp_path / "p.json"
    rc = main(["search", "--model", "mnist_resnet", "--sensitivity", str(files["omega"]), "--out", str(out),
               *[str(tmp_path / a) if a.startswith("front") else a for a in args]])
    assert rc == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_search_refuses_a_policy_as_its_sensitivity_report(files, tmp_path, capsys):
    assert main(["search", "--model", "mnist_resnet", "--sensitivity", str(files["policy"]),
                 "--out", str(tmp_path / "p.json")]) == 2
    _one_line_error(capsys, "lcpaq.policy/1", "not a sensitivity report")


def test_profile_empty_bits_is_exit_2(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["profile", "--hw", str(HW), "--model", "mnist_resnet", "--bits", "", "--out", str(out)]) == 2
    _one_line_error(capsys, "--bits is empty")
    assert not out.exists()


def test_input_size_that_does_not_fit_is_exit_2(capfd):
    assert main(["inspect", "--model", "mnist_resnet", "--input-size", "1x3x28x28"]) == 2
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "--input-size 1x3x28x28 does not fit mnist_resnet" in err and "1x1x28x28" in err


@pytest.mark.parametrize("args,needle", [
    (["sensitivity", "--model", "resnet18", "--data", "digits", "--probes", "2"], "1-channel"),
    (["sensitivity", "--model", "mnist_resnet", "--data", "mnist5k", "--batch-size", "0"], "--batch-size"),
    (["sensitivity", "--model", "mnist_resnet", "--data", "mnist5k", "--tol", "-1"], "--tol"),
], ids=["data-channels", "batch-size", "tol"])
def test_sensitivity_bad_input_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "s.json"
    assert main([*args, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_validate_refuses_a_table_from_another_profile(files, tmp_path, capsys):
    table = _table(tmp_path / "t.jsonl", profile="host-cpu-tvm")
    assert main(["validate", "--model", "mnist_resnet", "--policy", str(files["policy"]), "--hw", str(HW),
                 "--table", str(table), "--out", str(tmp_path / "v")]) == 2
    _one_line_error(capsys, "'host-cpu-tvm', not 'host-cpu-ort'")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("args,needle", [
    (["demo", "--backend", "foo", "--quick"], "--backend foo"),
    (["tune", "--model", "mnist_resnet", "--data", "digits", "--w-bits", "x"], "--w-bits"),
    (["tune", "--model", "mnist_resnet", "--data", "digits", "--w-bits", "4,9"], "2..8"),
    (["tune", "--model", "mnist_resnet", "--data", "digits", "--metric", "f1"], "--metric f1"),
    (["finetune", "--model", "mnist_resnet", "--data", "digits", "--kd-temp", "0"], "--kd-temp"),
    (["finetune", "--model", "mnist_resnet", "--data", "digits", "--calib", "max"], "--calib max"),
], ids=["demo-backend", "tune-w-bits", "tune-w-bits-range", "tune-metric", "finetune-kd-temp", "finetune-calib"])
def test_other_bad_options_exit_2(files, tmp_path, capsys, args, needle):
    extra = {"tune": ["--sensitivity", str(files["omega"])], "finetune": ["--policy", str(files["policy"])]}.get(args[0], [])
    assert main([*args, *extra, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, needle)


def test_profile_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import lcpaq.profiler.run as run

    out = tmp_path / "t.jsonl"

    def interrupted(inv, hw, path, **kw):
        _table(Path(path))  # two rows written, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "profile", interrupted)
    assert main(["profile", "--hw", str(HW), "--model", "mnist_resnet", "--out", str(out)]) == 130
    text = " ".join(capsys.readouterr().out.split())
    assert "interrupted: 2 rows are in" in text and "run the same command again to resume" in text


def test_search_json_stays_parseable_with_the_highs_banner(files, tmp_path):
    pytest.importorskip("highspy")
    out = tmp_path / "p.json"
    res = subprocess.run([sys.executable, "-c", "from lcpaq.cli import entry; entry()", "search", "--model",
                          "mnist_resnet", "--sensitivity", str(files["omega"]), "--max-size-mb", "0.05",
                          "--ilp-solver", "highs", "--out", str(out), "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["policy_path"] == str(out)


def test_profile_without_an_rpc_tracker_fails_fast(tmp_path, capsys):
    """TVM would tune every task and then retry the tracker forever; the CLI asks it first."""
    from lcpaq.profiler.rpc import free_port

    text = (ROOT / "hw_profiles" / "rpi4-tvm-rpc.toml").read_text().replace("port = 9190", f"port = {free_port()}")
    hw = tmp_path / "board.toml"
    hw.write_text(text)
    out = tmp_path / "t.jsonl"
    assert main(["profile", "--hw", str(hw), "--model", "mnist_resnet", "--out", str(out)]) == 2
    _one_line_error(capsys, "no TVM RPC tracker answers at 127.0.0.1:", "--key rpi4")
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["tables-show", "cost-policy", "profile-hw"])
def test_a_binary_file_is_exit_2(tmp_path, capsys, cmd):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\xff\xfe garbage\n")
    args = {"tables-show": ["tables", "show", str(junk)],
            "cost-policy": ["cost", "--model", "mnist_resnet", "--policy", str(junk)],
            "profile-hw": ["profile", "--hw", str(junk), "--model", "mnist_resnet", "--out", str(tmp_path / "t.jsonl")]}
    assert main(args[cmd]) == 2
    _one_line_error(capsys, "not UTF-8 text")


def test_torn_table_names_the_command_that_repairs_it(files, tmp_path, capsys):
    torn = _table(tmp_path / "t.jsonl")
    with torn.open("a") as f:
        f.write('{"key": "conv:y|w8a8|in=fp32", "work')  # a kill -9 in the middle of a write
    before = torn.read_bytes()
    for args in (["tables", "show", str(torn)],
                 ["predict", "--table", str(torn), "--model", "mnist_resnet", "--policy", str(files["policy"])]):
        assert main(args) == 2
        _one_line_error(capsys, "torn", f"lcpaq profile --hw PROFILE --model MODEL --out {torn} --repair")
    assert torn.read_bytes() == before


def test_finetune_ctrl_c_says_how_to_resume(files, tmp_path, capsys, monkeypatch):
    import lcpaq.finetune as ft

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "finetune", interrupted)
    out = tmp_path / "q.pt"
    assert main(["finetune", "--model", "mnist_resnet", "--policy", str(files["policy"]), "--data", "digits",
                 "--out", str(out)]) == 130
    text = " ".join(capsys.readouterr().out.split())
    assert f"checkpointed in {out}.ckpt" in text and "run the same command again" in text
    assert not out.exists()


def test_imagefolder_with_a_non_image_is_exit_2(tmp_path, capsys):
    (tmp_path / "imgs" / "cls").mkdir(parents=True)
    (tmp_path / "imgs" / "cls" / "x.png").write_text("not an image")
    out = tmp_path / "s.json"
    assert main(["sensitivity", "--model", "mnist_resnet", "--data", f"imagefolder:{tmp_path / 'imgs'}",
                 "--probes", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, "first sample cannot be read", "x.png")
    assert not out.exists()


def test_profile_out_that_is_not_a_table_is_refused_and_kept(files, tmp_path, capsys):
    pol = tmp_path / "policy.json"
    pol.write_bytes(files["policy"].read_bytes())
    for fresh in ([], ["--fresh"]):
        assert main(["profile", "--hw", str(HW), "--model", "mnist_resnet", "--out", str(pol), *fresh]) == 2
        _one_line_error(capsys, "is not a latency table", "choose another path")
    assert pol.read_bytes() == files["policy"].read_bytes() and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("cmd", ["search", "sensitivity", "export"])
def test_other_commands_never_overwrite_a_latency_table(files, tmp_path, capsys, cmd):
    table = _table(tmp_path / "t.jsonl")
    before = table.read_bytes()
    args = {"search": ["search", "--model", "mnist_resnet", "--sensitivity", str(files["omega"]),
                       "--max-size-mb", "0.05"],
            "sensitivity": ["sensitivity", "--model", "mnist_resnet", "--data", "digits", "--probes", "2"],
            "export": ["export", "--model", "mnist_resnet", "--policy", str(files["policy"])]}[cmd]
    assert main([*args, "--out", str(table)]) == 2
    _one_line_error(capsys, "is a latency table")
    assert table.read_bytes() == before
