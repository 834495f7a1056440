"""QDQ -> integer lowering in TVM: integer ops really replace the float conv/matmul, exact vs ORT."""

from __future__ import annotations

import numpy as np
import pytest
from _tvm_util import conv_layer, linear_layer, require_tvm

require_tvm()

import onnx  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from lcpaq.profiler.backends.ort import session  # noqa: E402
from lcpaq.profiler.backends.tvm import HOST_TARGET  # noqa: E402
from lcpaq.profiler.tvm_lower import kernel_label, lower_qdq  # noqa: E402
from lcpaq.profiler.units import build_unit  # noqa: E402

LAYERS = {
    "conv3x3": conv_layer(), "conv1x1s2": conv_layer(k=1, stride=2, act=False),
    "fc": linear_layer(),
}


def _run(mod, feeds, target=HOST_TARGET):
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    return vm["main"](*[tvm.runtime.tensor(v, dev) for v in feeds.values()]).numpy()


CASES = [("conv3x3", b, ic) for b in ((8, 8), (4, 8), (2, 8)) for ic in ("int8", "fp32")] + [
    ("conv1x1s2", (4, 4), "fp32"), ("fc", (8, 8), "int8"), ("fc", (4, 8), "fp32")]


def _id(c):
    return f"{c[0]}-w{c[1][0]}a{c[1][1]}-in_{c[2]}"


@pytest.mark.parametrize("name,bits,in_class", CASES, ids=[_id(c) for c in CASES])
def test_qdq_lowered_to_integer_and_exact_vs_ort(name, bits, in_class):
    layer = LAYERS[name]
    onnx_bytes, feeds = build_unit(layer, bits, in_class, seed=3)
    mod = from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    low, kinds = lower_qdq(mod)
    op = "conv2d" if layer.kind == "conv" else "matmul"
    assert kinds == [f"{op}-int8"]
    text = low["main"].script()
    # the float conv/matmul and the dequantize of weights/activations are gone
    n_ops = text.count("R.nn.conv2d(") + text.count("R.matmul(")
    assert n_ops == 1 and text.count('out_dtype="int32"') == n_ops
    assert "R.dequantize" not in text
    out = _run(low, feeds)
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    assert out.dtype == np.uint8 and out.shape == ref.shape
    # same integer accumulation, same float requantize: at most 1 LSB from float rounding order
    diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_integer_conv_accumulator_matches_numpy_reference():
    """The int32 accumulator of the lowered conv equals an exact integer reference."""
    layer = conv_layer(c=4, o=6, hw=6)
    onnx_bytes, feeds = build_unit(layer, (8, 8), "int8", seed=1)
    m = onnx.load_from_string(onnx_bytes)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    x, w = feeds["x"].astype(np.int64), inits["wq"].astype(np.int64)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.zeros((1, 6, 6, 6), np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 6, j:j + 6], w[:, :, i, j])
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "uint8"))
    with bb.function("main", [xv]):
        y = bb.emit(relax.op.nn.conv2d(xv, relax.const(inits["wq"]), padding=[1, 1, 1, 1], out_dtype="int32"))
        bb.emit_func_output(y)
    got = _run(bb.get(), {"x": feeds["x"]})
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, acc)


@pytest.mark.parametrize("name", ["conv3x3", "fc"])
def test_fp32_unit_stays_float(name):
    onnx_bytes, feeds = build_unit(LAYERS[name], (32, 32), "fp32", seed=2)
    mod = from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    low, kinds = lower_qdq(mod)
    assert kinds == []
    assert kernel_label(kinds, low).endswith("-fp32")
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    np.testing.assert_allclose(_run(low, feeds), ref, rtol=1e-4, atol=1e-4)


def test_lifted_constants_make_w2_to_w8_one_module_with_their_own_weights():
    """Weights become parameters: w2/w4/w8 at a8 lower to the same module text (one compiled
    library), and running it with each unit's own arrays gives that unit's ORT output."""
    from lcpaq.profiler.tvm_lower import lift_constants

    layer = LAYERS["conv3x3"]
    texts, ex = set(), None
    for bits in ((8, 8), (4, 8), (2, 8)):
        onnx_bytes, feeds = build_unit(layer, bits, "int8", seed=5)
        low, _ = lower_qdq(from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False))
        lifted, params, scalars = lift_constants(low)
        assert [p.shape for p in params][0] == (16, 8, 3, 3) and params[0].dtype == np.int8
        texts.add((lifted.script(show_meta=False), scalars))
        if ex is None:  # compiled once, from the w8 unit
            ex = tvm.compile(lifted, target=tvm.target.Target(HOST_TARGET))
        dev = tvm.cpu()
        vm = relax.VirtualMachine(ex, dev)
        out = vm["main"](*[tvm.runtime.tensor(v, dev) for v in [feeds["x"], *params]]).numpy()
        ref = session(onnx_bytes, 1).run(None, feeds)[0]
        diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, bits
    assert len(texts) == 1


def test_fp32_and_int8_units_lower_to_different_modules():
    from lcpaq.profiler.tvm_lower import lift_constants

    texts = set()
    for bits in ((8, 8), (32, 32)):
        onnx_bytes, _ = build_unit(LAYERS["conv3x3"], bits, "int8")
        low, _ = lower_qdq(from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False))
        texts.add(lift_constants(low)[0].script(show_meta=False))
    assert len(texts) == 2


def _host_has(feature: str) -> bool:
    from tvm.target import codegen

    host = tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})
    return bool(codegen.target_has_features(feature, host))


INTRIN_CASES = [(k, *c) for k in ("avx2", "vnni") for c in
                (("conv3x3", (8, 8), "int8"), ("conv3x3", (2, 8), "fp32"), ("conv1x1s2", (4, 4), "fp32"))]


@pytest.mark.parametrize("kind,name,bits,in_class", INTRIN_CASES, ids=[f"{c[0]}-{_id(c[1:])}" for c in INTRIN_CASES])
def test_int8_intrinsic_path_is_exact_vs_ort(kind, name, bits, in_class):
    """The NCHWc u8 x s8 conv (packed weights, layout transforms around it) equals ORT's output."""
    from lcpaq.profiler.tvm_lower import INT8_INTRINS

    if kind == "vnni" and not _host_has("avx512vnni"):
        pytest.skip("this host has no AVX-512 VNNI")
    target = dict(HOST_TARGET, mcpu="znver4") if kind == "vnni" else HOST_TARGET  # the path only
    layer = LAYERS[name]
    if layer.out_channels % INT8_INTRINS[kind][1]:
        layer = conv_layer(c=8, o=16, hw=9, k=1, stride=2, act=False)
    onnx_bytes, feeds = build_unit(layer, bits, in_class, seed=4)
    mod = from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    low, kinds = lower_qdq(mod, int8_intrin=kind)
    assert kinds == [f"conv2d-int8-{kind}"]
    text = low.script()
    assert "R.nn.conv2d(" not in text and f"conv2d_nchwc{INT8_INTRINS[kind][1]}_u8s8" in text
    out = _run(low, feeds, target)
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("kind", ["avx2", "vnni"])
def test_int8_intrinsic_is_exact_at_the_saturation_edge(kind):
    """Tensorized by hand (no tuning): all-255 activations x all-(+-max) weights, the worst case for
    the vpmaddubsw i16 pair sum (2 * 255 * 63 = 32130), equal the int64 reference."""
    from tvm import s_tir

    from lcpaq.profiler.tvm_lower import INT8_INTRINS, conv2d_nchwc_u8s8, register_int8_intrin

    if kind == "vnni" and not _host_has("avx512vnni"):
        pytest.skip("this host has no AVX-512 VNNI")
    name, lanes, max_w = INT8_INTRINS[kind]
    assert register_int8_intrin(kind) == name
    prim = conv2d_nchwc_u8s8((1, 8, 4, 4), lanes, (1, 1), (1, 1), (0, 0, 0, 0), lanes)
    sch = s_tir.Schedule(prim)
    blk = sch.get_sblock("conv2d_nchwc")
    b, o, y, x, o8, ic, kh, kw, c4 = sch.get_loops(blk)
    sch.reorder(b, o, y, x, ic, kh, kw, o8, c4)
    sch.decompose_reduction(blk, ic)
    sch.tensorize(o8, name)
    assert ("pmadd.ub.sw" if kind == "avx2" else "vpdpbusd") in sch.mod.script()
    lib = tvm.compile(sch.mod, target=tvm.target.Target(dict(HOST_TARGET, mcpu="znver4") if kind == "vnni"
                                                       else HOST_TARGET))
    dev = tvm.cpu()
    xs = np.full((1, 2, 4, 4, 4), 255, np.uint8)
    for sign in (1, -1):
        w = np.full((1, 2, 1, 1, lanes, 4), max_w * sign, np.int8)
        out = tvm.runtime.tensor(np.zeros((1, 1, 4, 4, lanes), np.int32), dev)
        lib(tvm.runtime.tensor(xs, dev), tvm.runtime.tensor(w, dev), out)
        np.testing.assert_array_equal(out.numpy(), np.full((1, 1, 4, 4, lanes), sign * 255 * max_w * 8, np.int32))


def test_avx2_path_keeps_generic_conv_for_full_range_weights():  # VNNI is exact for any int8
    """|w| > 63 could saturate vpmaddubsw: such a conv keeps the generic int8 lowering."""
    onnx_bytes, _ = build_unit(LAYERS["conv3x3"], (8, 8), "int8", seed=4)
    m = onnx.load_from_string(onnx_bytes)
    for t in m.graph.initializer:
        if t.name == "wq":
            w = onnx.numpy_helper.to_array(t).copy()
            w.flat[0] = 127
            t.CopyFrom(onnx.numpy_helper.from_array(w, "wq"))
    assert lower_qdq(from_onnx(m, keep_params_in_input=False), int8_intrin="avx2")[1] == ["conv2d-int8"]
    assert lower_qdq(from_onnx(m, keep_params_in_input=False), int8_intrin="vnni")[1] == ["conv2d-int8-vnni"]


@pytest.mark.parametrize("name,in_class", [("conv3x3", "fp32"), ("conv1x1s2", "int8")])
def test_fp32_nchwc_conv_matches_ort(name, in_class):
    """The NCHWc float conv (weights packed offline, layout transforms around it) = ORT's output."""
    onnx_bytes, feeds = build_unit(LAYERS[name], (32, 32), in_class, seed=6)
    low, kinds = lower_qdq(from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False), fp32_nchwc=8)
    assert kinds == ["conv2d-fp32-nchwc"] and "R.nn.conv2d(" not in low.script()
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    np.testing.assert_allclose(_run(low, feeds), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,in_class,act", [((8, 8), "int8", True), ((4, 8), "fp32", False), ((32, 32), "fp32", True)],
                         ids=["w8a8-in_int8-relu", "w4a8-in_fp32-none", "fp32-relu"])
def test_nchwc_epilogue_moves_the_requantize_before_one_opaque_transpose(bits, in_class, act, monkeypatch):
    """nchwc_epilogue: astype/scale/bias/relu/quantize run on the packed int8 conv's NCHWc output,
    one opaque kernel transposes the uint8 result back to NCHW (float convs keep their form);
    the output still equals ORT's."""
    layer = conv_layer(c=8, o=16, hw=9, act=act)
    onnx_bytes, feeds = build_unit(layer, bits, in_class, seed=7)
    mod = from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    small, _ = lower_qdq(mod, int8_intrin="avx2", fp32_nchwc=8, nchwc_epilogue=True)
    assert "transpose_nchwc" not in small.script()  # 1296 outputs: below EPILOGUE_MIN_ELEMS, unchanged
    monkeypatch.setattr("lcpaq.profiler.tvm_lower.EPILOGUE_MIN_ELEMS", 0)
    low, _ = lower_qdq(mod, int8_intrin="avx2", fp32_nchwc=8, nchwc_epilogue=True)
    text = low["main"].script()
    if bits == (32, 32):
        assert "R.permute_dims" in text and "transpose_nchwc" not in text
    else:
        assert "R.permute_dims" not in text and text.count("transpose_nchwc8_to_nchw_uint8") == 1
        assert int(low["transpose_nchwc8_to_nchw_uint8_1x2x9x9"].attrs["op_pattern"]) == 8
        conv = next(gv for gv in low.functions if gv.name_hint.startswith("conv2d_nchwc8_u8s8"))
        assert int(low[conv].attrs["op_pattern"]) == 8  # kept out of FuseOps (see tvm_lower)
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    out = _run(low, feeds)
    if bits != (32, 32):
        diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_opaque_kernel_reuses_the_tuning_record_of_its_fusable_twin(tmp_path):
    """The NCHWc-epilogue path marks packed convs opaque (op_pattern 8): a different workload hash
    for the same loop nest. Tuner copies the twin's record (op_pattern 4) instead of re-tuning."""
    from types import SimpleNamespace

    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from lcpaq.profiler.tvm_lower import conv2d_nchwc_u8s8
    from lcpaq.profiler.tvm_tune import TuneConfig, Tuner

    target = tvm.target.Target(HOST_TARGET)
    prim = conv2d_nchwc_u8s8((1, 8, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 8).with_attr("global_symbol", "main")
    opaque = tvm.IRModule({"main": prim.with_attr("op_pattern", 8)})
    twin = tvm.IRModule({"main": prim.with_attr("op_pattern", 4)})
    tuner = Tuner(target, tmp_path, TuneConfig(trials=1))
    task = SimpleNamespace(dispatched=[opaque], task_name="conv2d_nchwc8_u8s8")
    assert not tuner._reuse_twin(task)  # no record for the twin yet: tune it
    sch = s_tir.Schedule(twin)
    sch.split(sch.get_loops(sch.get_sblock("conv2d_nchwc"))[3], [None, 2])  # a non-trivial trace
    tuner.db.commit_tuning_record(ms.database.TuningRecord(sch.trace, tuner.db.commit_workload(twin), [1e-3], target))
    assert tuner.db.query_tuning_record(opaque, target, "t") is None
    assert tuner._reuse_twin(task)
    rec = tuner.db.query_tuning_record(opaque, target, "t")
    assert rec is not None and str(rec.trace) == str(sch.trace)


@pytest.mark.parametrize("hw,act,in_class", [(8, True, "fp32"), (6, False, "int8"), (7, True, "fp32")],
                         ids=["64px-relu", "36px-bias-in_int8", "49px-relu"])
def test_fp32_unpack_is_one_vectorized_kernel_and_matches_ort(hw, act, in_class):
    """fp32_unpack: the NCHWc float conv's output, its bias and ReLU go back to NCHW through one
    scheduled, opaque kernel (no tuning task, no transposing loop nest left in main); the output
    equals ORT's at every spatial size (vector widths 16, 4 and 1 here)."""
    onnx_bytes, feeds = build_unit(conv_layer(c=8, o=16, hw=hw, act=act), (32, 32), in_class, seed=8)
    mod = from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    low, kinds = lower_qdq(mod, fp32_nchwc=8, fp32_unpack=True)
    text = low["main"].script()
    assert kinds == ["conv2d-fp32-nchwc"] and "R.permute_dims" not in text and "R.nn.relu" not in text
    (name,) = [gv.name_hint for gv in low.functions if gv.name_hint.startswith("unpack_nchwc8_float32_b")]
    assert name.endswith(f"_r_1x2x{hw}x{hw}") == act
    attrs = low[name].attrs
    # noalias matters beyond this kernel: with the key "tir.noalias" (not 0.27's "tirx.noalias") no
    # kernel of the module got its noalias compute function and the tuned conv beside it ran 2.3x slower
    assert attrs["tirx.is_scheduled"] and attrs["tirx.noalias"] and int(attrs["op_pattern"]) == 8
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    np.testing.assert_allclose(_run(low, feeds), ref, rtol=1e-4, atol=1e-4)


def test_task_adopts_the_fastest_schedule_of_the_same_loop_nest_with_other_constants(tmp_path):
    """Kernels that differ only in an inline constant (a requantize scale) are separate workloads;
    Tuner._adopt_best_similar gives one the faster record of the other (trace replayed), and keeps
    its own when that is as fast."""
    from types import SimpleNamespace

    from tvm import s_tir, te
    from tvm.s_tir import meta_schedule as ms

    from lcpaq.profiler.tvm_tune import TuneConfig, Tuner

    def kernel(scale: float):
        x = te.placeholder((64, 64), "float32", name="x")
        y = te.compute((64, 64), lambda i, j: x[i, j] * scale, name="y")
        return tvm.IRModule({"main": te.create_prim_func([x, y])})

    target = tvm.target.Target(HOST_TARGET)
    tuner = Tuner(target, tmp_path, TuneConfig(trials=1))
    a, b = kernel(0.5), kernel(0.25)

    def record(mod, secs, factor):
        sch = s_tir.Schedule(mod)
        sch.split(sch.get_loops(sch.get_sblock("y"))[1], [None, factor])
        tuner.db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, tuner.db.commit_workload(mod), [secs], target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        return sch.trace

    fast = record(a, 1e-4, 16)
    record(b, 1.02e-4, 8)  # within 3 %: b keeps its own
    task = SimpleNamespace(dispatched=[b], task_name="y")
    assert not tuner._adopt_best_similar(task)
    tuner._by_args = None
    record(b, 5e-4, 8)  # the database's best for b is still its 1.02e-4 record
    assert not tuner._adopt_best_similar(task)
    c = kernel(0.125)
    record(c, 9e-4, 4)
    tuner._by_args = None
    assert tuner._adopt_best_similar(SimpleNamespace(dispatched=[c], task_name="y"))
    rec = tuner.db.query_tuning_record(c, target, "y")
    assert str(rec.trace) == str(fast) and tuner.adopted == 1


@pytest.mark.parametrize("bits,in_class,act,hw", [((8, 8), "int8", True, 8), ((4, 8), "fp32", False, 7)],
                         ids=["w8a8-in_int8-relu-64px", "w4a8-in_fp32-none-49px"])
def test_int8_unpack_requantizes_and_transposes_in_one_kernel(bits, in_class, act, hw):
    """int8_unpack: scale, bias, ReLU and the output quantize of a packed int8 conv run in the one
    vectorized kernel that brings the int32 NCHWc accumulator back to NCHW; output = ORT's +-1 LSB."""
    onnx_bytes, feeds = build_unit(conv_layer(c=8, o=16, hw=hw, act=act), bits, in_class, seed=9)
    mod = from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=False)
    low, kinds = lower_qdq(mod, int8_intrin="avx2", int8_unpack=True)
    text = low["main"].script()
    assert kinds == ["conv2d-int8-avx2"] and "R.permute_dims" not in text and "R.quantize" not in text.split("call_tir")[-1]
    (name,) = [gv.name_hint for gv in low.functions if gv.name_hint.startswith("unpack_requant_nchwc8_uint8")]
    assert ("_r_" in name) == act and low[name].attrs["tirx.is_scheduled"]
    ref = session(onnx_bytes, 1).run(None, feeds)[0]
    diff = np.abs(_run(low, feeds).astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
