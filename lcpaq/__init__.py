"""lcpaq: hardware-in-the-loop mixed-precision quantization for PyTorch models.

Light at import: torch, onnxruntime and tvm are imported only by the modules that need them.
"""

from lcpaq.errors import LcpaqError
from lcpaq.policy import Policy

__version__ = "0.1.0"
__all__ = ["LcpaqError", "Policy", "__version__"]
