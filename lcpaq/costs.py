"""Model size and BOPs of a policy. Torch-free: works on an :class:`~lcpaq.inventory.Inventory`.

Size counts packed weights at w_bits, one fp32 scale per output channel (per-channel symmetric
weights, no zero point) plus fp32 bias; fp32 layers count 4 bytes per weight. BOPs = MACs x
w_bits x a_bits (fp32 counts as 32 x 32).
"""

from __future__ import annotations

from dataclasses import dataclass

from lcpaq.inventory import Inventory, LayerInfo
from lcpaq.policy import FLOAT_BITS, BitPair, Policy


def layer_size_bytes(layer: LayerInfo, pair: BitPair) -> float:
    """Bytes to store one layer's weights at ``pair`` (scales and bias included)."""
    w_bits = pair[0]
    bias = 4 * layer.out_channels if layer.bias else 0
    if w_bits == FLOAT_BITS:
        return 4.0 * layer.weight_numel + bias
    scales = 4 * layer.out_channels
    return layer.weight_numel * w_bits / 8.0 + scales + bias


def layer_bops(layer: LayerInfo, pair: BitPair) -> float:
    """Bit operations of one forward pass: MACs x w_bits x a_bits."""
    return float(layer.macs) * pair[0] * pair[1]


@dataclass(frozen=True)
class CostReport:
    """Per-layer and total size (bytes) and BOPs of a policy."""

    size_bytes: dict[str, float]
    bops: dict[str, float]

    @property
    def total_size_bytes(self) -> float:
        return sum(self.size_bytes.values())

    @property
    def total_size_mb(self) -> float:
        return self.total_size_bytes / 1e6

    @property
    def total_bops(self) -> float:
        return sum(self.bops.values())

    @property
    def total_gbops(self) -> float:
        return self.total_bops / 1e9


def policy_costs(inventory: Inventory, policy: Policy) -> CostReport:
    """Size and BOPs of ``policy`` on ``inventory`` (the policy must cover every layer)."""
    policy.validate(inventory.names)
    return CostReport(
        size_bytes={ly.name: layer_size_bytes(ly, policy[ly.name]) for ly in inventory},
        bops={ly.name: layer_bops(ly, policy[ly.name]) for ly in inventory},
    )
