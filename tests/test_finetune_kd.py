"""KD fine-tuning: loss, accuracy recovery on the embedded model, checkpoint resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lcpaq.data import get_loader
from lcpaq.errors import ConfigError
from lcpaq.finetune import finetune, kd_loss, load_quantized, save_quantized
from lcpaq.finetune.kd import CHECKPOINT_NAME
from lcpaq.models import get_model
from lcpaq.policy import Policy
from lcpaq.quant import QUANT_TYPES, quantizable_names
from lcpaq.testing.models import TinyResNet


@pytest.mark.parametrize("temp", [1.0, 4.0], ids=["T1", "T4"])
def test_kd_loss_mixes_kl_and_ce(temp):
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.arange(8) % 5
    ce = torch.nn.functional.cross_entropy(s, y)
    assert float(kd_loss(s, t, y, temp=temp, alpha=0.0)) == pytest.approx(float(ce))
    assert float(kd_loss(t, t, y, temp=temp, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(s, t, y, temp=temp, alpha=1.0)) > 0


def test_kd_finetune_recovers_w4a8_embedded(tmp_path):
    torch.manual_seed(0)
    model = get_model("mnist_resnet")
    policy = Policy.uniform(quantizable_names(model), 4, 8)
    train = get_loader("mnist5k", "train", batch_size=64, shuffle=True)
    val = get_loader("mnist5k", "val", batch_size=300, subset=300)
    res = finetune(model, policy, train, val, epochs=1, max_steps_per_epoch=10, lr=5e-4)
    assert res.fp32_acc >= 98.0
    assert res.qat_acc >= res.fp32_acc - 1.0
    assert res.qat_acc >= res.ptq_acc - 0.5
    assert all(isinstance(m, QUANT_TYPES) for n, m in model.named_modules() if n in policy)
    path = save_quantized(model, policy, tmp_path / "q.pt")
    again, pol = load_quantized(get_model("mnist_resnet"), path)
    assert pol == policy
    x = next(iter(val))[0][:16]
    assert torch.equal(again(x), model(x))


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    tr = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
    return tr, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)


def _tiny(policy_bits=(4, 8)):
    torch.manual_seed(0)
    m = TinyResNet().eval()
    return m, Policy.uniform(quantizable_names(m), *policy_bits)


class _Stop(Exception):
    pass


def test_interrupted_finetune_resumes_to_same_state(tmp_path):
    tr, va = _tiny_data()
    m_ref, pol = _tiny()
    ref = finetune(m_ref, pol, tr, va, epochs=3, lr=1e-3, checkpoint_dir=tmp_path / "ref")

    def stop_after_first(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 1:
            raise _Stop
    m1, _ = _tiny()
    with pytest.raises(_Stop):
        finetune(m1, pol, tr, va, epochs=3, lr=1e-3, checkpoint_dir=tmp_path / "run", progress=stop_after_first)
    ck = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=False)
    assert ck["epoch"] == 1 and len(ck["history"]) == 1
    m2, _ = _tiny()
    res = finetune(m2, pol, tr, va, epochs=3, lr=1e-3, checkpoint_dir=tmp_path / "run")
    assert res.resumed_from == 1 and res.epochs == 3 and len(res.history) == 3
    assert res.ptq_acc == ref.ptq_acc and res.qat_acc == ref.qat_acc
    sd_ref, sd = m_ref.state_dict(), m2.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_resume_rejects_other_policy(tmp_path):
    tr, va = _tiny_data()
    m, pol = _tiny()
    finetune(m, pol, tr, va, epochs=1, checkpoint_dir=tmp_path)
    m2, pol2 = _tiny((8, 8))
    with pytest.raises(ConfigError, match="another policy"):
        finetune(m2, pol2, tr, va, epochs=2, checkpoint_dir=tmp_path)


def test_finetune_rejects_bad_hyperparameters():
    tr, va = _tiny_data()
    m, pol = _tiny()
    with pytest.raises(ConfigError):
        finetune(m, pol, tr, va, kd_alpha=1.5)
