"""Deploy: whole-model ONNX QDQ export of a fake-quant model runs on ORT and matches it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcpaq.deploy.qdq import export_qdq, layer_of_node, node_module
from lcpaq.deploy.runtime import check_outputs, deploy
from lcpaq.models import get_model
from lcpaq.policy import Policy
from lcpaq.quant import apply_policy, quantizable_names

MIXED = [(8, 8), (4, 8), (32, 32), (2, 8), (8, 4), (6, 8), (4, 8), (8, 8), (32, 32), (8, 8)]


@pytest.fixture(scope="module")
def data():
    from lcpaq.data import get_loader

    cal = next(iter(get_loader("mnist5k", "train", batch_size=64)))[0]
    xs = next(iter(get_loader("mnist5k", "val", batch_size=128)))[0]
    return cal, xs


def _fq(bits, cal):
    m = get_model("mnist_resnet")
    names = quantizable_names(m)
    pol = Policy(dict(zip(names, bits, strict=True)))
    return apply_policy(m, pol, calib_loader=[cal], calib_batches=1), pol


@pytest.mark.parametrize("bits", [[(4, 8)] * 10, [(8, 8)] * 10, MIXED], ids=["w4a8", "w8a8", "mixed"])
def test_qdq_export_matches_fake_quant(data, bits):
    fq, _ = _fq(bits, data[0])
    dep = deploy(fq, "ort", (1, 1, 28, 28), calib_inputs=[data[0].numpy()])
    res = check_outputs(dep, fq, data[1].numpy())
    # logits reach ~15; 8-bit weights go on a 7-bit grid for ORT and int8 layers get an 8-bit output
    # quantizer, so a few % of the logit range is the expected deviation, not more.
    assert res["max_abs_err"] < 0.1 * res["ref_abs_max"], res
    assert res["top1_agreement"] >= 0.97, res


def test_exact_qdq_without_output_quant_is_near_exact(data):
    fq, _ = _fq([(4, 8)] * 10, data[0])
    import onnxruntime as ort

    b = export_qdq(fq, (1, 1, 28, 28), quantize_outputs=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(b, so, providers=["CPUExecutionProvider"]).run(None, {"x": data[1].numpy()})[0]
    ref = fq(data[1]).detach().numpy()
    assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0


def test_kernels_deploy_matches_fake_quant(data):
    from lcpaq.kernels import status

    if not status().loaded:
        pytest.skip(f"kernels extension not built: {status().reason}")
    fq, _ = _fq([(4, 8)] * 9 + [(8, 8)], data[0])
    res = check_outputs(deploy(fq, "lcpaq-kernels", (1, 1, 28, 28)), fq, data[1].numpy())
    assert res["max_abs_err"] < 0.02 * res["ref_abs_max"], res
    assert res["top1_agreement"] >= 0.99


def test_scope_names_map_to_modules():
    mods = {"layer1", "layer1.0", "layer1.0.conv1", "layer2", "layer2.downsample", "layer2.downsample.0", "conv1"}
    assert node_module("/layer1/layer1.0/conv1/Conv", mods) == "layer1.0.conv1"
    assert node_module("/layer2/downsample/downsample.0/Conv", mods) == "layer2.downsample.0"
    assert node_module("/conv1/Conv_token_8", mods) == "conv1"
    assert layer_of_node("layer2_downsample_0_in/QuantizeLinear__lcpaq3", ["layer2.downsample.0", "conv1"],
                         mods) == "layer2.downsample.0"
    assert layer_of_node("/layer1/layer1.0/relu/Relu", ["conv1"], mods) is None


@pytest.mark.tvm
@pytest.mark.slow  # ~40 s (TVM import + compile) on the shared 2-core VM; in the default run
def test_tvm_deploy_matches_fake_quant(tmp_path):
    """The same QDQ graph compiled by TVM (untuned, int8 lowering) agrees with the fake-quant model."""
    pytest.importorskip("tvm")
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.testing.models import TinyResNet

    torch.manual_seed(0)
    m = TinyResNet().eval()
    names = quantizable_names(m)
    pol = Policy({n: (32, 32) if i == len(names) - 1 else (4, 8) for i, n in enumerate(names)})
    x = torch.randn(8, *m.input_shape[1:])
    fq = apply_policy(m, pol, calib_loader=[x], calib_batches=1)
    prof = tmp_path / "tvm.toml"
    prof.write_text('[device]\nname = "t"\n[backend]\nname = "tvm"\nthreads = 1\n'
                    '[candidates]\nbits = ["w4a8", "fp32"]\n[tvm]\ntrials = 0\n')
    dep = deploy(fq, "tvm", m.input_shape, calib_inputs=[x.numpy()], hw=load_profile(prof))
    res = check_outputs(dep, fq, x.numpy())
    assert res["max_abs_err"] < 0.05 * res["ref_abs_max"], res
    assert res["top1_agreement"] == 1.0
    assert any("int8" in n for n in dep.notes)  # the QDQ conv really became integer compute
