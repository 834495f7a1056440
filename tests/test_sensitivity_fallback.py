"""Ops without double backward (hardsigmoid in mobilenet_v3): warn naming the op and modules, and
fall back to a Fisher estimate instead of crashing."""

from __future__ import annotations

import logging

import pytest
import torch

from lcpaq.quant import quantizable_names
from lcpaq.sensitivity import SensitivityConfig, estimate_sensitivity


def test_mobilenet_v3_falls_back_to_fisher(caplog):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 64, 64, generator=g), torch.randint(0, 10, (6,), generator=g)
    with caplog.at_level(logging.WARNING, logger="lcpaq.sensitivity"):
        with pytest.warns(RuntimeWarning, match=r"op 'hardsigmoid' \(used by features\.\d+\.block\.\d+\."
                                                r"scale_activation \(Hardsigmoid\).*Fisher"):
            rep = estimate_sensitivity(m, (x, y), candidates=[(4, 8), (8, 8), (32, 32)], probes=6,
                                       config=SensitivityConfig(min_probes=6))
    assert any("hardsigmoid" in r.getMessage() for r in caplog.records)
    assert rep.method == "fisher" and "hardsigmoid" in rep.meta["fallback"]
    assert rep.probes == 6 and list(rep.layers) == quantizable_names(m) and len(rep.layers) > 50
    for ly in rep.layers:
        w, a = rep.weight_trace[ly], rep.act_trace[ly]
        assert w.method == "fisher" and w.mean >= 0 and a.mean >= 0 and w.probes == 6
        assert rep.omega(ly, (4, 8)) >= rep.omega(ly, (8, 8)) >= 0
    assert sum(rep.weight_trace[ly].mean for ly in rep.layers) > 0
    assert m.training is False


def test_other_runtime_errors_are_not_swallowed():
    class Bad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("shape mismatch somewhere")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        estimate_sensitivity(Bad(), (torch.randn(2, 4), torch.tensor([0, 1])), candidates=[(8, 8)], probes=2)
