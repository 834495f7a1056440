"""Sensitivity report: Ω over bit-widths, JSON round trip, validation of malformed reports."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lcpaq.errors import SensitivityError
from lcpaq.policy import format_bits
from lcpaq.sensitivity import SensitivityConfig, SensitivityReport, estimate_sensitivity
from lcpaq.testing.models import TinyResNet

CANDS = [(2, 8), (4, 8), (8, 8), (4, 4), (8, 4), (32, 8), (32, 32)]


@pytest.fixture(scope="module")
def rep() -> SensitivityReport:
    torch.manual_seed(0)
    m = TinyResNet().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    return estimate_sensitivity(m, [(x[:4], y[:4]), (x[4:], y[4:])], candidates=CANDS, probes=10, seed=0,
                                config=SensitivityConfig(min_probes=10, model_name="tiny", data_name="rand"))


@pytest.mark.parametrize("hi,lo", [((2, 8), (4, 8)), ((4, 8), (8, 8)), ((4, 4), (4, 8)), ((8, 4), (8, 8))],
                         ids=lambda p: format_bits(p))
def test_omega_decreases_with_bits(rep, hi, lo):
    for ly in rep.layers:
        assert rep.omega(ly, hi) >= rep.omega(ly, lo) >= 0.0


def test_omega_formula_and_fp32_is_zero(rep):
    assert rep.meta["samples"] == 8 and rep.probes == 10 and rep.method == "hutchinson"
    for ly in rep.layers:
        assert rep.omega(ly, (32, 32)) == 0.0
        w, a = rep.weight_trace[ly], rep.act_trace[ly]
        nw, na = rep.numel[ly]
        want = max(w.mean, 0) / nw * rep.w_pert[ly][4] + max(a.mean, 0) / na * rep.a_pert[ly][8]
        assert rep.omega(ly, (4, 8)) == pytest.approx(want)
        assert rep.omega(ly, (32, 8)) == pytest.approx(max(a.mean, 0) / na * rep.a_pert[ly][8])
        assert rep.w_pert[ly][2] > rep.w_pert[ly][4] > rep.w_pert[ly][8] > 0
    table = rep.omega_table()
    assert list(table) == list(rep.layers) and set(table["stem"]) == set(CANDS)


def test_round_trip(rep, tmp_path):
    path = rep.save(tmp_path / "sens.json")
    d = json.loads(path.read_text())
    assert d["schema"] == "lcpaq.sensitivity/1" and d["candidates"][0] == "w2a8"
    assert set(d["layers"]["stem"]["weight_trace"]) == {"mean", "stderr", "probes"}
    assert d["layers"]["stem"]["omega"]["w4a8"] == pytest.approx(rep.omega("stem", (4, 8)))
    back = SensitivityReport.load(path)
    assert back.to_dict() == rep.to_dict()
    assert back.omega_table() == rep.omega_table()


def _mutate(d, path, value):
    d = copy.deepcopy(d)
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,match", [
    (("schema",), "lcpaq.policy/1", "schema"),
    (("layers",), {}, "non-empty"),
    (("method",), "magic", "method"),
    (("candidates",), ["w9a8"], "bad candidate"),
    (("probes",), KeyError, "'probes' is missing"),
    (("layers", "stem", "weight_trace", "mean"), float("nan"), "finite"),
    (("layers", "stem", "weight_trace", "stderr"), -1.0, ">= 0"),
    (("layers", "stem", "numel_w"), 0, "numel_w"),
    (("layers", "stem", "w_pert"), {"8": 1.0}, "no entry for 2 bits"),
    (("layers", "stem", "a_pert", "4"), "x", "finite"),
    (("layers", "stem", "omega", "w4a8"), 123.0, "disagrees"),
    (("layers", "stem", "act_trace"), None, "every layer or for none"),
], ids=["schema", "no-layers", "method", "candidate", "missing-probes", "nan-trace", "neg-stderr",
        "numel", "missing-bits", "pert-type", "omega-edited", "partial-act"])
def test_malformed_reports_raise_sensitivity_error(rep, tmp_path, path, value, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(_mutate(rep.to_dict(), path, value)))
    with pytest.raises(SensitivityError, match=match):
        SensitivityReport.load(p)


def test_unreadable_reports(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SensitivityError, match="not valid JSON"):
        SensitivityReport.load(p)
    p.write_text("[1, 2]")
    with pytest.raises(SensitivityError, match="JSON object"):
        SensitivityReport.load(p)
    with pytest.raises(SensitivityError, match="does not exist"):
        SensitivityReport.load(tmp_path / "missing.json")


def test_unknown_layer_and_bits(rep):
    with pytest.raises(SensitivityError, match="no layer 'nope'"):
        rep.omega("nope", (4, 8))
    with pytest.raises(SensitivityError, match="6 bits"):
        rep.omega("stem", (6, 8))
    with pytest.raises(SensitivityError, match="no layer"):
        rep.check_layers(["stem", "nope"])
