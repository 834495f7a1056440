"""Deploy and validate: export a policy (ONNX QDQ, TVM, lcpaq integer kernels), check outputs against
the fake-quant model, and measure deployed latency against the table's prediction.

>>> # from lcpaq.deploy import validate
>>> # rep = validate("mnist_resnet", pol, "hw_profiles/host-cpu-ort.toml", "latency_tables/t.jsonl")
"""

from __future__ import annotations

from typing import Any

__all__ = ["ValidationReport", "check_outputs", "deploy", "export_qdq", "validate"]


def __getattr__(name: str) -> Any:  # lazy: importing lcpaq.deploy must not load torch/onnxruntime
    if name in ("validate", "ValidationReport"):
        from lcpaq.deploy import validate as _v

        return getattr(_v, name)
    if name in ("deploy", "check_outputs"):
        from lcpaq.deploy import runtime

        return getattr(runtime, name)
    if name == "export_qdq":
        from lcpaq.deploy.qdq import export_qdq

        return export_qdq
    raise AttributeError(name)
