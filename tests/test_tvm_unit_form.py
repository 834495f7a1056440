"""TVM's whole-model unit form (``[tvm] unit_form = "context"``): the stem's max-pool is part of
its unit and an image-fed layer takes the image's quantization; ORT's units keep their form."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import pytest
from _tvm_util import conv_layer, require_tvm

require_tvm()

from lcpaq.errors import ProfileError  # noqa: E402
from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend  # noqa: E402
from lcpaq.profiler.backends.ort import session  # noqa: E402
from lcpaq.profiler.hwprofile import load_profile  # noqa: E402
from lcpaq.profiler.units import build_unit, layer_spec, unit_key  # noqa: E402

PROFILE = os.path.join(os.path.dirname(__file__), "..", "hw_profiles", "host-cpu-tvm.toml")
STEM = dataclasses.replace(conv_layer(c=3, o=16, hw=16, k=3, stride=2), name="stem", fused=("bn", "relu", "maxpool"))


def _backend(tmp_path, form="context"):
    prof = load_profile(PROFILE)
    return get_backend("tvm", dataclasses.replace(prof, tvm={
        "trials": 0, "work_dir": str(tmp_path), "int8_intrin": "avx2", "unit_form": form, "flush_weights": True}))


def _table_unit(layer, bits, in_class):  # as `lcpaq profile` builds it (run.profile)
    return Unit(unit_key(layer, bits, in_class), *build_unit(layer, bits, in_class), dict(layer_spec(layer)), bits)


def _first(res):  # an int8 context unit returns (uint8 output, float output)
    return (res[0] if hasattr(res, "__len__") and not hasattr(res, "numpy") else res).numpy()


def _zero_point(onnx_bytes: bytes) -> int:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(onnx_bytes).graph.initializer}
    return int(inits["xz"])


@pytest.mark.parametrize("bits,in_class", [((8, 8), "int8"), ((4, 8), "fp32"), ((32, 32), "fp32")])
def test_stem_unit_pools_and_takes_the_image_quantization(tmp_path, bits, in_class):
    be = _backend(tmp_path)
    plain = _table_unit(STEM, bits, in_class)
    unit = be.unit_in_form(plain)
    g = onnx.load_from_string(unit.onnx).graph
    ops = [n.op_type for n in g.node]
    assert "MaxPool" not in [n.op_type for n in onnx.load_from_string(plain.onnx).graph.node]
    assert ops.count("MaxPool") == 1 and "MaxPool" in ops[-3:]
    outs = [o.name for o in g.output]
    assert outs == (["y"] if bits == (32, 32) else ["y", "y_f"])  # int8: the float max-pool output too
    assert unit.inputs["x"].dtype == np.float32  # the image is float, whatever the key's input class
    if bits != (32, 32):
        assert _zero_point(plain.onnx) == 0 and _zero_point(unit.onnx) > 0
        assert ops[0] == "QuantizeLinear"
    ref = session(unit.onnx, 1).run(None, dict(unit.inputs))[0]
    assert ref.shape == (1, 16, 4, 4)  # 16x16 -> conv s2 8x8 -> pool 4x4
    m = be.measure(plain, MeasureSettings(warmup=1, number=2, repeat=3, min_repeat_ms=0))
    assert m.ok, m.error
    assert m.kernel == ("tvm:conv2d-fp32" if bits == (32, 32) else "tvm:conv2d-int16")  # x - zp in int16
    import tvm
    from tvm import relax

    ex, _, params, _ = be.compile(unit)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = _first(vm["main"](*be._args(unit, params, tvm.cpu())))
    if bits == (32, 32):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    else:
        assert np.abs(out.astype(np.int32) - ref.astype(np.int32)).max() <= 1


def test_other_units_and_the_layer_form_are_left_alone(tmp_path):
    inner = _table_unit(conv_layer(c=8, o=16, hw=8), (8, 8), "int8")
    assert _backend(tmp_path).unit_in_form(inner) is inner
    stem = _table_unit(STEM, (8, 8), "int8")
    assert _backend(tmp_path, "layer").unit_in_form(stem) is stem
    whole = Unit("deploy:whole-model", stem.onnx, stem.inputs, {}, (8, 8))  # no layer spec: a whole model
    assert _backend(tmp_path).unit_in_form(whole) is whole
    # only an image-fed unit is timed with its input cold too (whole-cache flush before each sample)
    assert _backend(tmp_path)._image_fed(stem) and not _backend(tmp_path)._image_fed(inner)
    assert not _backend(tmp_path, "layer")._image_fed(stem) and not _backend(tmp_path)._image_fed(whole)
    assert "tvm_unit_form" in _backend(tmp_path).versions() and "tvm_unit_form" not in _backend(tmp_path, "layer").versions()
    with pytest.raises(ProfileError, match="unit_form"):
        _backend(tmp_path, "pooled")


@pytest.mark.parametrize("bits", [(8, 8), (32, 32)])
def test_residual_layer_unit_takes_its_add_and_relu(tmp_path, bits):
    """A conv that feeds a residual Add (fused = bn, add, relu) carries the Add, with the shortcut as
    a second input in the unit's class, and the ReLU after it; TVM's output equals ORT's."""
    layer = dataclasses.replace(conv_layer(c=8, o=8, hw=8, act=False), fused=("bn", "add", "relu"))
    be = _backend(tmp_path)
    unit = be.unit_in_form(_table_unit(layer, bits, "int8"))
    ops = [n.op_type for n in onnx.load_from_string(unit.onnx).graph.node]
    assert ops.count("Add") == 1 and ops[ops.index("Add") + 1] == "Relu"
    assert list(unit.inputs) == ["x", "r"] and unit.inputs["r"].shape == (1, 8, 8, 8)
    assert unit.inputs["r"].dtype == (np.uint8 if bits == (8, 8) else np.float32)
    ref = session(unit.onnx, 1).run(None, dict(unit.inputs))[0]
    import tvm
    from tvm import relax

    ex, _, params, _ = be.compile(unit)
    res = relax.VirtualMachine(ex, tvm.cpu())["main"](*be._args(unit, params, tvm.cpu()))
    out = _first(res)
    if bits == (8, 8):  # the float result, written for the next block's shortcut, is a second output
        ref_f = session(unit.onnx, 1).run(None, dict(unit.inputs))[1]
        np.testing.assert_allclose(res[1].numpy(), ref_f, rtol=1e-4, atol=1e-4)
    if bits == (32, 32):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    else:
        assert np.abs(out.astype(np.int32) - ref.astype(np.int32)).max() <= 1
    assert be.measure(_table_unit(layer, bits, "int8"), MeasureSettings(warmup=1, number=2, repeat=3, min_repeat_ms=0)).ok
