"""Benchmark lcpaq's CUDA integer kernels on a GPU (runs only where one exists).

GEMM shapes: the CPU benchmark's (bench_kernels.py): ResNet-18 convs as GEMMs at batch
``--batch`` (M = batch*OH*OW, N = Cout, K = Cin*KH*KW) and two linear shapes. Contestants, all on the GPU, inputs resident:
  torch-fp32 (cuBLAS SGEMM, TF32 off), torch-fp16 (cuBLAS tensor cores), torch-int8-mm
  (``torch._int_mm``: cuBLASLt int8 IMMA, int32 out, exact), lcpaq-w8/w4/w2 (``qgemm_i32``: exact
  int32 GEMM from the packed 8/4/2-bit blob, the same blob the CPU kernels read).
End to end: torchvision resnet18 (random weights, BN folded) with a mixed policy converted to the
lcpaq kernels vs the same model in torch fp32 and fp16.
Timing: CUDA events around ``--reps`` launches, rounds interleaved (A B C ... A B C ...), the
fastest round's per-call time and the spread (slowest/fastest round - 1) reported.
Prints a table and writes ``bench_kernels_cuda.{csv,json}`` to ``--out`` (default
benchmarks/results/).

    python benchmarks/bench_kernels_cuda.py [--batch 32] [--rounds 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lcpaq.kernels import pack_weight, qgemm_i32, status

RESULTS = Path(__file__).resolve().parent / "results"


def shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """The CPU benchmark's GEMM shapes (bench_kernels.SHAPES, batch 1): conv rows scaled by
    ``batch``, linear shapes as they are."""
    from bench_kernels import SHAPES

    return [(name, m * batch if name.startswith("r18.") else m, n, k) for name, m, n, k in SHAPES]


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, dict]:
    for f in fns.values():  # warm-up (and lazy init)
        f()
    torch.cuda.synchronize()
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                f()
            end.record()
            end.synchronize()
            per[name].append(start.elapsed_time(end) / reps)
    out = {}
    for name, ts in per.items():
        best = min(ts)
        out[name] = {"ms": best, "spread": max(ts) / best - 1.0, "rounds": ts}
    return out


def gemm_contestants(m: int, n: int, k: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(m + n + k)
    dev = "cuda"
    a32 = torch.randn(m, k, generator=g).to(dev)
    b32 = torch.randn(k, n, generator=g).to(dev)
    a16, b16 = a32.half(), b32.half()
    x8 = torch.randint(0, 256, (m, k), generator=g).to(torch.uint8).to(dev)
    fns: dict[str, Callable[[], object]] = {
        "torch-fp32": lambda: a32 @ b32,
        "torch-fp16": lambda: a16 @ b16,
    }
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        xi8 = (x8.to(torch.int16) - 128).to(torch.int8)
        wi8 = torch.randint(-128, 128, (k, n), generator=g).to(torch.int8).to(dev)
        fns["torch-int8-mm"] = lambda: torch._int_mm(xi8, wi8)
    for bits in (8, 4, 2):
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g)
        blob = pack_weight(q, bits).to(dev)
        fns[f"lcpaq-w{bits}"] = (lambda blob=blob, bits=bits: qgemm_i32(x8, blob, bits, n))
    return fns


def _resnet18_models(batch: int):
    import copy

    import torchvision
    from torch.fx.experimental.optimization import fuse

    from lcpaq.kernels import convert
    from lcpaq.policy import Policy
    from lcpaq.quant import apply_policy, quantizable_names

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    fp32 = fuse(m)  # BN folded into the convs
    names = quantizable_names(fp32)
    pairs = [(8, 8), (4, 8), (2, 8)]
    pol = Policy({n: ((8, 8) if i in (0, len(names) - 1) else pairs[i % 3]) for i, n in enumerate(names)})
    q = copy.deepcopy(fp32)
    calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    apply_policy(q, pol, calib_loader=calib, calib_batches=2)
    intm = convert(copy.deepcopy(q), pol)
    if torch.cuda.is_available():
        fp32, q, intm = fp32.cuda(), q.cuda(), intm.cuda()
    return fp32, q, intm, pol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_cuda: no CUDA GPU here (nothing to measure)")
    if not status().cuda:
        raise SystemExit(f"bench_kernels_cuda: extension without CUDA kernels: {status()}")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    rows = []
    for name, m, n, k in shapes(args.batch):
        res = time_interleaved(gemm_contestants(m, n, k), args.rounds, args.reps)
        gop = 2.0 * m * n * k / 1e9
        for cname, r in res.items():
            rows.append({"shape": name, "M": m, "N": n, "K": k, "contestant": cname,
                         "ms": round(r["ms"], 5), "TOPS": round(gop / r["ms"], 2),
                         "spread": round(r["spread"], 3),
                         "vs_fp16": round(res["torch-fp16"]["ms"] / r["ms"], 3),
                         "vs_lcpaq_w8": round(res["lcpaq-w8"]["ms"] / r["ms"], 3)})
        line = "  ".join(f"{c} {r['ms'] * 1e3:8.1f}us" for c, r in res.items())
        print(f"{name:18s} M={m:6d} N={n:5d} K={k:5d}  {line}", flush=True)

    fp32, fq, intm, pol = _resnet18_models(args.batch)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    fp16 = __import__("copy").deepcopy(fp32).half()
    x16 = x.half()
    with torch.inference_mode():
        yfq, yq = fq(x), intm(x)
        rel = float((yq - yfq).norm() / yfq.norm())
        e2e = time_interleaved({"torch-fp32": lambda: fp32(x), "torch-fp16": lambda: fp16(x16),
                                "lcpaq-mixed": lambda: intm(x)}, args.rounds, max(2, args.reps // 5))
    print(f"resnet18 e2e batch {args.batch}: " + "  ".join(
        f"{c} {r['ms']:.2f} ms (spread {r['spread']:.2f})" for c, r in e2e.items())
        + f"  rel. output diff kernels vs fake-quant {rel:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_kernels_cuda.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"device": dev, "torch": torch.__version__, "batch": args.batch, "rounds": args.rounds,
            "reps": args.reps, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernels": str(status()), "policy": {k: list(v) for k, v in pol.items()},
            "gemm": rows, "resnet18_e2e": {c: {"ms": r["ms"], "spread": r["spread"]} for c, r in e2e.items()},
            "resnet18_rel_diff_vs_fakequant": rel}
    (args.out / "bench_kernels_cuda.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {args.out / 'bench_kernels_cuda.csv'} and .json")


if __name__ == "__main__":
    main()
