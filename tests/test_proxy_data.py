"""Proxy subset and margin score."""

from __future__ import annotations

import pytest
import torch

from lcpaq.data import get_dataset, targets
from lcpaq.errors import ConfigError
from lcpaq.proxy import margin_score, proxy_subset


@pytest.mark.parametrize("kw", [{"fraction": 0.04}, {"fraction": 0.1}, {"count": 53}], ids=["4pct", "10pct", "n53"])
def test_proxy_subset_deterministic_and_balanced(kw):
    ds = get_dataset("digits", "train")
    a, b = proxy_subset(ds, **kw), proxy_subset(ds, **kw)
    assert a.indices == b.indices
    want = kw.get("count") or round(kw["fraction"] * len(ds))
    assert len(a.indices) == want and len(set(a.indices)) == want
    assert abs(a.share - want / len(ds)) < 1e-12
    counts = list(a.per_class.values())
    assert max(counts) - min(counts) <= 1
    y = targets(ds)[list(a.indices)]
    assert {int(c): int((y == c).sum()) for c in set(y.tolist())} == {c: n for c, n in a.per_class.items() if n}
    assert proxy_subset(ds, **kw, seed=1).indices != a.indices


def test_proxy_subset_rejects_bad_sizes():
    ds = get_dataset("digits", "train")
    for kw in ({"fraction": 0.0}, {"fraction": 1.5}, {"count": 10**6}, {}):
        with pytest.raises(ConfigError):
            proxy_subset(ds, **kw)


def _clusters(sep: float, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 16, generator=g) * sep
    y = torch.arange(5).repeat_interleave(40)
    return centers[y] + spread * torch.randn(200, 16, generator=g), y


@pytest.mark.parametrize("sep", [1.0, 3.0], ids=["sep1", "sep3"])
def test_margin_grows_with_separation_and_compactness(sep):
    f, y = _clusters(sep, 1.0)
    base = margin_score(f, y)
    assert margin_score(*_clusters(2 * sep, 1.0)) > base  # farther centroids
    assert margin_score(*_clusters(sep, 0.5)) > base  # tighter classes
    assert margin_score(10 * f, y) == pytest.approx(base, rel=1e-6)  # scale invariant
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert margin_score(f, shuffled) < base  # wrong labels: no margin


def test_margin_needs_two_classes():
    with pytest.raises(ConfigError):
        margin_score(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
