"""The CUDA sources compile with nvcc (they run only where a GPU exists)."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = Path(CUDA_HOME) / "bin" / "nvcc"


@pytest.mark.skipif(not NVCC.exists(), reason=f"nvcc not found at {NVCC} (set CUDA_HOME)")
@pytest.mark.parametrize("src", sorted(p.name for p in (ROOT / "kernels/csrc/cuda").glob("*.cu")))
def test_cuda_source_compiles(src: str, tmp_path: Path) -> None:
    tinc = Path(torch.__file__).parent / "include"
    cmd = [str(NVCC), "-c", str(ROOT / "kernels/csrc/cuda" / src), "-o", str(tmp_path / "k.o"),
           "-std=c++20", "-O0", "-gencode", "arch=compute_80,code=sm_80", "-Xcompiler", "-fPIC",
           f"-I{tinc}", f"-I{tinc / 'torch/csrc/api/include'}", f"-I{ROOT / 'kernels/csrc/cpu'}",
           f"-I{sysconfig.get_paths()['include']}", "-DLCPAQ_WITH_CUDA"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0


def test_cuda_kernels_run_when_gpu_present() -> None:
    from lcpaq.kernels import pack_weight, qgemm_i32, status

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: CUDA kernels compiled but not run")
    if not status().cuda:
        pytest.skip("extension built without CUDA")
    g = torch.Generator().manual_seed(0)
    for bits in (8, 4, 2):
        x = torch.randint(0, 256, (37, 300), generator=g).to(torch.uint8)
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (29, 300), generator=g)
        y = qgemm_i32(x.cuda(), pack_weight(q, bits).cuda(), bits, 29).cpu()
        assert torch.equal(y.long(), x.long() @ q.T)

