"""Build of lcpaq's integer-kernel extension ``lcpaq/_C*.so`` (CPU AVX2 + optional CUDA).

Switches (environment):
  LCPAQ_SKIP_KERNELS=1  build no extension at all (lcpaq.kernels then uses its PyTorch reference).
  LCPAQ_SKIP_CUDA=1     build the CPU kernels only, even where nvcc is found.
  CUDA_HOME             where nvcc lives; CUDA sources are compiled only when $CUDA_HOME/bin/nvcc
                        exists (set CUDA_HOME=/usr/local/cuda here: auto-detection picks /usr/local).
  LCPAQ_CUDA_ARCHS      e.g. "80;90" (default) to keep the CUDA build short.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("kernels", "csrc")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _ext_modules() -> tuple[list, dict]:
    if _truthy("LCPAQ_SKIP_KERNELS"):
        return [], {}
    from torch.utils import cpp_extension as ce

    sources = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # -ffp-contract=off: the epilogue must round exactly like the PyTorch reference (no FMA fusion).
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else ""
    use_cuda = bool(nvcc) and os.path.exists(nvcc) and not _truthy("LCPAQ_SKIP_CUDA")
    include_dirs = [os.path.join(ROOT, CSRC, "cpu")]
    if use_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        archs = os.environ.get("LCPAQ_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = []
        for a in filter(None, (s.strip() for s in archs)):
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = ce.CUDAExtension(
            "lcpaq._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx + ["-DLCPAQ_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++20", "-DLCPAQ_WITH_CUDA"] + gencode,
            },
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    else:
        ext = ce.CppExtension(
            "lcpaq._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    build_ext = ce.BuildExtension.with_options(no_python_abi_suffix=False, use_ninja=ce.is_ninja_available())
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
