"""Torch-free description of a model's quantizable layers (what :mod:`lcpaq.graph` traces).

Search, costs and latency prediction consume this; only :mod:`lcpaq.graph` builds it from torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INVENTORY_SCHEMA = "lcpaq.inventory/1"


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer (Conv2d incl. depthwise/grouped, or Linear) at a given input size.

    Shapes are NCHW for conv and (N, F) for linear, batch included.
    ``macs`` counts multiply-accumulates for one forward pass of that batch.
    """

    name: str
    kind: str  # "conv" | "linear"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    weight_numel: int = 0
    params: int = 0
    macs: int = 0
    # What follows the layer in the traced graph, for fused workload keys:
    # e.g. ("bn", "relu") or ("bn", "add", "relu"). Informational; never required.
    fused: tuple[str, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LayerInfo:
        kw = dict(d)
        for k in ("in_shape", "out_shape", "kernel_size", "stride", "padding", "dilation", "fused"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return LayerInfo(**kw)


@dataclass(frozen=True)
class Inventory:
    """All quantizable layers of a model, in execution order, plus graph facts the search needs.

    ``tie_groups``: layers whose outputs meet at a residual add / concat and so must share
    activation precision. ``edges``: (producer, consumer) pairs of quantizable layers that are
    adjacent in the dataflow (only non-quantizable ops between them), used for transition costs.
    """

    model: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    tie_groups: tuple[tuple[str, ...], ...] = ()
    edges: tuple[tuple[str, str], ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def __getitem__(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": INVENTORY_SCHEMA,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "layers": [asdict(layer) for layer in self.layers],
            "tie_groups": [list(g) for g in self.tie_groups],
            "edges": [list(e) for e in self.edges],
            "meta": dict(self.meta),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Inventory:
        return Inventory(
            model=d["model"],
            input_shape=tuple(d["input_shape"]),
            layers=tuple(LayerInfo.from_dict(x) for x in d["layers"]),
            tie_groups=tuple(tuple(g) for g in d.get("tie_groups", ())),
            edges=tuple(tuple(e) for e in d.get("edges", ())),  # type: ignore[misc]
            meta=dict(d.get("meta", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @staticmethod
    def load(path: str | Path) -> Inventory:
        return Inventory.from_dict(json.loads(Path(path).read_text()))
