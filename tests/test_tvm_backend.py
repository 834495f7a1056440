"""The TVM backend measures units locally (int8 vs fp32 kernels), errors come back as data."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
from _tvm_util import conv_layer, linear_layer, require_tvm

require_tvm()

from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend  # noqa: E402
from lcpaq.profiler.backends.tvm import parse_target  # noqa: E402
from lcpaq.profiler.hwprofile import load_profile  # noqa: E402
from lcpaq.profiler.units import build_unit  # noqa: E402

SETTINGS = MeasureSettings(warmup=1, number=3, repeat=5, min_repeat_ms=0)
PROFILE = "hw_profiles/host-cpu-tvm.toml"


def _profile(tmp_path, trials=0, intrin="avx2", fp32="nchwc"):  # AVX2 runs on every host targeted here
    prof = load_profile(os.path.join(os.path.dirname(__file__), "..", PROFILE))
    return dataclasses.replace(prof, tvm={"trials": trials, "work_dir": str(tmp_path / "tvm_db"),
                                          "int8_intrin": intrin, "fp32_layout": fp32})


def _unit(layer, bits, in_class="int8"):
    b, feeds = build_unit(layer, bits, in_class)
    return Unit(key=f"{layer.name}|{bits}", onnx=b, inputs=feeds, bits=bits)


def test_parse_target_profile_strings():
    assert parse_target("llvm -mcpu=znver3 -num-cores=2") == {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
    t = parse_target("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72 -mattr=+neon,+fp-armv8")
    assert t["mattr"] == ["+neon", "+fp-armv8"] and t["mtriple"] == "aarch64-linux-gnu"


@pytest.mark.parametrize("bits,intrin,fp32,kernel", [
    ((8, 8), "avx2", "nchwc", "tvm:conv2d-int8-avx2"), ((4, 8), "avx2", "nchwc", "tvm:conv2d-int8-avx2"),
    ((8, 8), "off", "nchwc", "tvm:conv2d-int8"), ((32, 32), "avx2", "nchwc", "tvm:conv2d-fp32-nchwc"),
    ((32, 32), "avx2", "nchw", "tvm:conv2d-fp32")],
    ids=["w8a8-avx2", "w4a8-avx2", "w8a8-generic", "fp32-nchwc", "fp32-nchw"])
def test_measures_tiny_conv_unit(tmp_path, bits, intrin, fp32, kernel):
    be = get_backend("tvm", _profile(tmp_path, intrin=intrin, fp32=fp32))
    assert be.versions()["tvm"].startswith("0.")
    m = be.measure(_unit(conv_layer(c=8, o=16, hw=10), bits, "int8"), SETTINGS)
    assert m.ok, m.error
    assert m.kernel == kernel
    assert m.n == SETTINGS.repeat
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms < 1000
    assert m.extra["remote"] is False and m.extra["tuned_now"] == 0


def test_measures_linear_unit(tmp_path):
    m = get_backend("tvm", _profile(tmp_path)).measure(_unit(linear_layer(), (8, 8)), SETTINGS)
    assert m.ok, m.error
    assert m.kernel == "tvm:matmul-int8"


def test_bigger_workload_takes_longer(tmp_path):
    be = get_backend("tvm", _profile(tmp_path))
    small = be.measure(_unit(conv_layer(c=8, o=8, hw=8), (32, 32), "fp32"), SETTINGS)
    big = be.measure(_unit(conv_layer(c=32, o=32, hw=28), (32, 32), "fp32"), SETTINGS)
    assert small.ok and big.ok
    assert big.median_ms > small.median_ms  # 50x the MACs


def test_failure_is_data_not_exception(tmp_path):
    be = get_backend("tvm", _profile(tmp_path))
    m = be.measure(Unit(key="broken", onnx=b"not an onnx model", inputs={}), SETTINGS)
    assert not m.ok and m.n == 0 and math.isnan(m.median_ms)
    assert m.error


def test_bit_pairs_at_a8_share_one_library_key(tmp_path):
    be = get_backend("tvm", _profile(tmp_path))
    layer = conv_layer(c=8, o=16, hw=10)
    keys = {bits: be.lower(_unit(layer, bits))[3] for bits in ((8, 8), (6, 8), (4, 8), (2, 8), (32, 32))}
    assert len({keys[b] for b in ((8, 8), (6, 8), (4, 8), (2, 8))}) == 1
    assert keys[(32, 32)] != keys[(8, 8)]
    # the fp32-input form of the int8 unit adds a quantize: another structure
    assert be.lower(_unit(layer, (8, 8), "fp32"))[3] != keys[(8, 8)]
    first = be.measure(_unit(layer, (8, 8)), SETTINGS)
    second = be.measure(_unit(layer, (4, 8)), SETTINGS)
    assert first.ok and second.ok and second.extra["cached_lib"] == "memory"


def test_bad_int8_intrin_setting_is_a_profile_error(tmp_path):
    from lcpaq.errors import ProfileError

    with pytest.raises(ProfileError, match="int8_intrin"):
        get_backend("tvm", _profile(tmp_path, intrin="sse"))
    with pytest.raises(ProfileError, match="fp32_layout"):
        get_backend("tvm", _profile(tmp_path, fp32="nhwc"))


def test_int8_intrin_kind_follows_target_features():
    import tvm

    from lcpaq.profiler.tvm_tune import int8_intrin_kind

    kinds = [int8_intrin_kind(tvm.target.Target(parse_target(f"llvm -mcpu={cpu}")))
             for cpu in ("znver3", "znver4", "x86-64")]
    assert kinds == ["avx2", "vnni", None]


def test_tensor_intrin_stub_is_scoped():
    import sys

    import tvm

    from lcpaq.profiler.tvm_tune import needs_tensor_intrin, skip_tensor_intrin

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        pytest.skip("the real tensor intrinsics are already imported in this process")
    host, vnni = (tvm.target.Target(parse_target(f"llvm -mcpu={cpu}")) for cpu in ("znver3", "cascadelake"))
    assert not needs_tensor_intrin(host) and not needs_tensor_intrin(vnni)  # own rule list on llvm
    assert needs_tensor_intrin(tvm.target.Target({"kind": "cuda"}))
    with skip_tensor_intrin(host):
        import tvm.s_tir.tensor_intrin as stub  # noqa: F401 - what TuneContext does: instant

        assert "lcpaq stub" in (stub.__doc__ or "")
    assert name not in sys.modules  # removed on exit: a later real import still works
    with skip_tensor_intrin(tvm.target.Target({"kind": "cuda"})):
        assert name not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LCPAQ_TVM_TUNE_TEST") != "1",
                    reason="MetaSchedule tuning takes ~1 min on the shared 2-core VM; set LCPAQ_TVM_TUNE_TEST=1")
def test_tuning_database_is_kept_and_reused(tmp_path):
    be = get_backend("tvm", _profile(tmp_path, trials=1))
    layer = conv_layer(c=8, o=16, hw=8)  # O % 16 == 0: the NCHWc float conv also with AVX-512
    info = be.tune([_unit(layer, (8, 8)), _unit(layer, (4, 8)), _unit(layer, (32, 32), "fp32")])
    # int8 and fp32 NCHWc convs, each with its input layout transform and its epilogue (the two
    # input transforms differ in dtype); w4 shares w8's
    assert info["tasks"] == 6 and info["tuned_now"] == 6
    assert be.tune([_unit(layer, (2, 8))])["tuned_now"] == 0
    assert [p.stat().st_size > 0 for p in (tmp_path / "tvm_db").glob("llvm-*/database_tuning_record.json")] == [True]
    first = be.measure(_unit(layer, (8, 8)), SETTINGS)
    assert first.ok, first.error
    assert first.extra["tuned"] and first.extra["tuned_now"] == 0 and first.extra["lib"].endswith(".so")
    again = get_backend("tvm", _profile(tmp_path, trials=1)).measure(_unit(layer, (2, 8)), SETTINGS)
    assert again.ok and again.extra["tuned_now"] == 0  # fast path: the kept library, no tuning
    assert again.extra["cached_lib"] == first.extra["lib"] and again.kernel == first.kernel
