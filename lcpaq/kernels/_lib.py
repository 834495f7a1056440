"""Lazy loading of the compiled extension ``lcpaq/_C*.so`` and its fake (meta) kernels.

Nothing happens at import: the first op call (or :func:`available`) tries to load the library
once. When it is absent (built with LCPAQ_SKIP_KERNELS=1, or not built) the ops fall back to
:mod:`lcpaq.kernels.reference` and :func:`status` says why. ``LCPAQ_KERNELS_DISABLE=1`` forces
the fallback (tests of the fallback path).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LibStatus:
    loaded: bool
    path: str
    reason: str  # why not loaded ("" when loaded)
    cuda: bool  # CUDA kernels registered


def _find_library() -> str | None:
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = sorted(glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd")))
    return hits[0] if hits else None


@functools.cache
def _load() -> LibStatus:
    if os.environ.get("LCPAQ_KERNELS_DISABLE", "").strip() in ("1", "true", "yes"):
        st = LibStatus(False, "", "disabled by LCPAQ_KERNELS_DISABLE=1", False)
    else:
        path = _find_library()
        if path is None:
            st = LibStatus(False, "", "extension lcpaq/_C*.so not built (LCPAQ_SKIP_KERNELS=1 at "
                           "install?); run `pip install -e . --no-build-isolation`", False)
        else:
            try:
                torch.ops.load_library(path)
                _register_fakes()
                cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lcpaq::qlinear", "CUDA")
                st = LibStatus(True, path, "", bool(cuda))
            except (OSError, RuntimeError) as e:
                st = LibStatus(False, path, f"failed to load {path}: {e}", False)
    if not st.loaded:
        log.warning("lcpaq kernels: using the PyTorch integer reference (%s)", st.reason)
    return st


def available() -> bool:
    """True when the compiled kernels are loaded (``torch.ops.lcpaq.*`` exist)."""
    return _load().loaded


def status() -> LibStatus:
    """Load state of the extension: path, whether CUDA kernels exist, why not loaded."""
    return _load()


def _register_fakes() -> None:
    lib = "lcpaq::"

    @torch.library.register_fake(lib + "qgemm_i32")
    def _qgemm_fake(x, w_packed, w_bits, n):
        return x.new_empty((x.shape[0], n), dtype=torch.int32)

    @torch.library.register_fake(lib + "qlinear")
    def _qlinear_fake(x, w_packed, w_bits, n, w_scale, x_scale, x_zero_point, bias, out_scale,
                      out_zero_point, relu):
        dt = torch.uint8 if out_scale > 0 else torch.float32
        return x.new_empty((*x.shape[:-1], n), dtype=dt)

    @torch.library.register_fake(lib + "qconv2d")
    def _qconv_fake(x, w_packed, w_bits, weight_shape, stride, padding, dilation, groups,
                    w_scale, x_scale, x_zero_point, bias, out_scale, out_zero_point, relu):
        n, _, h, w = x.shape
        cout, _, kh, kw = weight_shape
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        dt = torch.uint8 if out_scale > 0 else torch.float32
        return x.new_empty((n, cout, oh, ow), dtype=dt).contiguous(
            memory_format=torch.channels_last)

    @torch.library.register_fake(lib + "quantize_act")
    def _quant_fake(x, scale, zero_point, qmin, qmax):
        mf = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                     and x.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format
        return torch.empty_like(x, dtype=torch.int8 if qmin < 0 else torch.uint8,
                                memory_format=mf)
