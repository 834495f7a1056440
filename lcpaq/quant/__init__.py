"""Quantization: uniform quantizers, fake-quant layers and the in-place ``apply_policy`` verb."""

from lcpaq.quant.api import apply_policy, calibrate, policy_of, quantizable_names
from lcpaq.quant.modules import QUANT_TYPES, QuantConv2d, QuantLinear
from lcpaq.quant.quantizers import (
    CALIB_METHODS,
    ActQuantizer,
    act_range,
    fake_quant_act,
    fake_quant_weight,
    qparams_from_range,
    quantize_weight,
    weight_qmax,
    weight_scale,
)

__all__ = [
    "CALIB_METHODS", "QUANT_TYPES", "ActQuantizer", "QuantConv2d", "QuantLinear", "act_range",
    "apply_policy", "calibrate", "fake_quant_act", "fake_quant_weight", "policy_of",
    "qparams_from_range", "quantizable_names", "quantize_weight", "weight_qmax", "weight_scale",
]
