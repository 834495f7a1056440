"""Benchmark lcpaq's integer kernels against torch fp32, ONNX Runtime and torch.ao on this CPU.

GEMM shapes: ResNet-18 convs as GEMMs (batch 1, M = OH*OW, N = Cout, K = Cin*KH*KW) and two
linear shapes. Contestants (activation quantization excluded everywhere, outputs as each op gives):
  torch-fp32 (MKL sgemm), ort-mmi-u8u8 / ort-mmi-u8s8 (MatMulInteger, int32 out; u8s8 is inexact
  for full-range u8 on AVX2), ort-nbits4 (MatMulNBits 4-bit, accuracy_level 4, fp32 in/out),
  torchao-qlinear (fbgemm quantized::linear, u8 out), lcpaq-w8/w4/w2 (qlinear: exact int32 GEMM +
  fp32 dequant epilogue), lcpaq-w7a8 (8-bit weights on the 7-bit grid [-63, 63], what the QDQ
  exporter emits for W8 and what 5..7-bit layers run on: a separate exact kernel, not full-range W8).
  The lcpaq kernels run on the best instruction set of the CPU (AVX-512 VNNI where present, else
  AVX2); there, lcpaq-w8a8-avx2 / lcpaq-w4a8-avx2 (and lcpaq-mixed-avx2 end to end) force the AVX2
  kernels with LCPAQ_KERNELS_ISA=avx2, for machines without VNNI.
End to end: torchvision resnet18 (random weights, BN folded into convs for both sides) in a mixed
policy on lcpaq kernels vs the same fp32 model in torch.
Rounds are interleaved (A B C ... A B C ...); per contestant the fastest round's median and the
spread (slowest/fastest round median - 1) are reported. Then the issue's goals per shape, for the
CPU's best kernels (ISA named) and the forced AVX2 ones side by side; two batch-1 (GEMV) linear
shapes are reported beside them (W4's memory advantage), not counted. Writes CSV + JSON in
benchmarks/results/ (a run with --quick, --shapes or --no-e2e writes bench_kernels_quick.*).

    .venv/bin/python benchmarks/bench_kernels.py [--rounds 5] [--threads 1,2] [--quick]
        [--shapes r18.conv1-7x7,linear-fc-b1] [--no-e2e] [--avx2-host]

--avx2-host emulates an AVX2-only CPU on a newer one: the run re-executes itself with torch held
to AVX2 (ATEN_CPU_CAPABILITY=avx2, DNNL_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2) and the
lcpaq kernels forced to AVX2 (LCPAQ_KERNELS_ISA=avx2), so the fp32 baseline is what such a CPU
runs; ONNX Runtime has no such switch and keeps its best ISA (its columns are not an AVX2 CPU's).
Writes bench_kernels_avx2host.*.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lcpaq.kernels import pack_weight, qlinear, status

RESULTS = Path(__file__).resolve().parent / "results"
AVX2_HOST_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                 "LCPAQ_KERNELS_ISA": "avx2"}
SHAPES = [  # name, M, N, K
    ("r18.conv1-7x7", 12544, 64, 147),
    ("r18.layer1-3x3", 3136, 64, 576),
    ("r18.layer2-3x3", 784, 128, 1152),
    ("r18.layer3-3x3", 196, 256, 2304),
    ("r18.layer4-3x3", 49, 512, 4608),
    ("linear-fc-b64", 64, 1000, 512),
    ("linear-768x3072-b128", 128, 3072, 768),
    # batch 1 (GEMV): the weights are read once per call, so 4-bit weights halve the memory
    # traffic; reported beside the goals, not part of the shape set
    ("linear-fc-b1", 1, 1000, 512),
    ("linear-768x3072-b1", 1, 3072, 768),
]
GEMV = {"linear-fc-b1", "linear-768x3072-b1"}
# issue 7's per-shape goals: (label, numerator, denominator, at least); ratio = den ms / num ms.
# "{isa}" is "" for the CPU's best kernels and "-avx2" for the forced AVX2 ones.
GOALS = [("W4A8/fp32", "lcpaq-w4a8{isa}", "torch-fp32", 3.0),
         ("W4A8/W8A8", "lcpaq-w4a8{isa}", "lcpaq-w8a8{isa}", 1.6),
         ("W8A8/ORT-u8u8", "lcpaq-w8a8{isa}", "ort-mmi-u8u8", 1.2)]


def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _mmi_model(b: np.ndarray, signed_w: bool):
    from onnx import TensorProto, helper, numpy_helper

    m, k = "M", b.shape[0]
    wdt = np.int8 if signed_w else np.uint8
    inits = [numpy_helper.from_array(b.astype(wdt), "B"),
             numpy_helper.from_array(np.array(128, np.uint8), "azp"),
             numpy_helper.from_array(np.array(0 if signed_w else 128, wdt), "bzp")]
    node = helper.make_node("MatMulInteger", ["A", "B", "azp", "bzp"], ["Y"])
    g = helper.make_graph([node], "mmi", [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, b.shape[1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _nbits_model(n: int, k: int, rng: np.random.Generator):
    from onnx import TensorProto, helper, numpy_helper

    bs = 32
    nb = (k + bs - 1) // bs
    bq = rng.integers(0, 256, (n, nb, bs // 2), dtype=np.uint8)
    sc = (rng.random(n * nb, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=bs, accuracy_level=4)
    g = helper.make_graph([node], "nb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                          [numpy_helper.from_array(bq, "B"), numpy_helper.from_array(sc, "S")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("com.microsoft", 1)])


def gemm_contestants(m: int, n: int, k: int, threads: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    xf, wf = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    xu8 = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    out: dict[str, Callable[[], object]] = {"torch-fp32": lambda: torch.mm(xf, wf)}
    try:
        xa = xu8.numpy()
        s1 = _ort_session(_mmi_model(rng.integers(0, 256, (k, n)), False), threads)
        s2 = _ort_session(_mmi_model(rng.integers(-127, 128, (k, n)), True), threads)
        s3 = _ort_session(_nbits_model(n, k, rng), threads)
        xfa = xf.numpy()
        out["ort-mmi-u8u8"] = lambda: s1.run(None, {"A": xa})
        out["ort-mmi-u8s8"] = lambda: s2.run(None, {"A": xa})
        out["ort-nbits4"] = lambda: s3.run(None, {"A": xfa})
    except Exception as e:  # noqa: BLE001 - a missing runtime is reported, not fatal
        print(f"  ORT unavailable: {e}")
    try:
        torch.backends.quantized.engine = "fbgemm"
        wq = torch.quantize_per_channel(wf.T.contiguous(), torch.rand(n, generator=g) * 0.01 + 1e-3,
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(wq, None)
        xq = torch.quantize_per_tensor(xf, 0.05, 128, torch.quint8)
        out["torchao-qlinear"] = lambda: torch.ops.quantized.linear(xq, packed, 0.1, 128)
    except Exception as e:  # noqa: BLE001
        print(f"  torch.ao quantized linear unavailable: {e}")
    ws = torch.rand(n, generator=g) * 0.01
    for bits in (8, 7, 4, 2):
        q = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (n, k), generator=g)
        blob = pack_weight(q, bits)
        out[f"lcpaq-w{bits}a8"] = (lambda b=blob, bb=bits: qlinear(xu8, b, bb, n, ws, 0.05, 128))
        if bits in (8, 4) and cpu_isa() != "avx2":  # the AVX2 kernels too, where the CPU has more
            out[f"lcpaq-w{bits}a8-avx2"] = _forced_isa("avx2", out[f"lcpaq-w{bits}a8"])
    return out


def steady_malloc() -> bool:
    """Keep glibc from returning freed memory to the OS between calls (mmap and trim thresholds
    256 MiB), for every contestant alike: otherwise each call's multi-MB output can land on fresh
    pages, and the page faults (in the timed thread's CPU time) depend on what ran before: in
    session 5 and 6 runs the same VNNI kernel timed as W8 and as W7 differed by up to 1.6x on the
    stem. Returns False where it cannot be set (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


def cpu_isa() -> str:
    """The lcpaq kernels' instruction set on this CPU, as the extension picks it."""
    from lcpaq.profiler.backends.kernels import kernel_isa

    return kernel_isa()


def _forced_isa(isa: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with LCPAQ_KERNELS_ISA=isa (the extension reads it on every call)."""
    def run():
        old = os.environ.get("LCPAQ_KERNELS_ISA")
        os.environ["LCPAQ_KERNELS_ISA"] = isa
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["LCPAQ_KERNELS_ISA"]
            else:
                os.environ["LCPAQ_KERNELS_ISA"] = old
    return run


def goal_table(rows: list[dict], isa: str) -> tuple[str, dict]:
    """Per thread count and shape, each goal's ratio for the CPU's best kernels (named by `isa`)
    and, where that is more than AVX2, for the forced AVX2 kernels, side by side; then how many
    of the issue's shapes (GEMV rows excluded) meet each goal."""
    ms = {(r["threads"], r["shape"], r["contestant"]): r["median_ms"] for r in rows}
    paths = [("", isa)] + ([("-avx2", "avx2")] if isa != "avx2" else [])
    head = ["threads", "shape"] + [f"{lab} [{name}] (>= {lim})" for sfx, name in paths
                                   for lab, _, _, lim in GOALS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    met: dict[str, list[int]] = {}
    for t, shape in dict.fromkeys((r["threads"], r["shape"]) for r in rows):
        cells = [str(t), shape + (" (GEMV)" if shape in GEMV else "")]
        for sfx, name in paths:
            for lab, num, den, lim in GOALS:
                a, b = ms.get((t, shape, num.format(isa=sfx))), ms.get((t, shape, den.format(isa=sfx)))
                if a is None or b is None:
                    cells.append("-")
                    continue
                ratio = b / a
                cells.append(f"{ratio:.2f}" + ("" if ratio >= lim else " (miss)"))
                if shape not in GEMV:
                    key = f"t{t} {lab} [{name}]"
                    met.setdefault(key, [0, 0])
                    met[key][0] += ratio >= lim
                    met[key][1] += 1
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), {k: f"{v[0]} of {v[1]}" for k, v in met.items()}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, reps: int, threads: int
                ) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    for f in fns.values():  # warm up everything first
        for _ in range(2):
            f()
    meds: dict[str, list[float]] = {name: [] for name in fns}
    # 1 thread: CPU time of the calling thread (stable on this shared VM, see FINDINGS.md; torch
    # and ORT compute on the calling thread at 1 thread); 2 threads: wall clock.
    clock = time.thread_time if threads == 1 else time.perf_counter
    for _ in range(rounds):
        for name, f in fns.items():
            # untimed calls first (at least one, for at least 20 ms): the first calls of a
            # contestant after another one ran were up to 1.8x slower for several milliseconds
            # (seen on the stem GEMM, session 6), which penalised whoever came first
            t_end = time.perf_counter() + 0.02
            f()
            while time.perf_counter() < t_end:
                f()
            ts = []
            for _ in range(reps):
                t0 = clock()
                f()
                ts.append(clock() - t0)
            meds[name].append(statistics.median(ts) * 1e3)
    return {n: {"ms": min(v), "spread": max(v) / min(v) - 1} for n, v in meds.items()}


def _resnet18_pair(policy_kind: str):
    import copy

    import torchvision
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from lcpaq.kernels import convert
    from lcpaq.policy import Policy
    from lcpaq.quant import apply_policy, quantizable_names

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()

    def fold(mod):  # fold every BN into the conv before it (deployment form, both sides)
        for _name, child in list(mod.named_children()):
            fold(child)
        names = list(mod._modules)
        for a, b in zip(names, names[1:], strict=False):
            ca, cb = mod._modules[a], mod._modules[b]
            if isinstance(ca, torch.nn.Conv2d) and isinstance(cb, torch.nn.BatchNorm2d):
                mod._modules[a] = fuse_conv_bn_eval(ca, cb)
                mod._modules[b] = torch.nn.Identity()
        ds = mod._modules.get("downsample")
        if isinstance(ds, torch.nn.Sequential) and len(ds) == 2 and isinstance(ds[1], torch.nn.BatchNorm2d):
            mod._modules["downsample"] = torch.nn.Sequential(fuse_conv_bn_eval(ds[0], ds[1]))

    fold(m)
    fp32 = copy.deepcopy(m)
    names = quantizable_names(m)
    pairs = {}
    for nm in names:  # mixed: 8-bit stem and fc, 2-bit for the heavy layer4 3x3s, 4-bit elsewhere
        if nm in ("conv1", "fc"):
            pairs[nm] = (8, 8)
        elif nm.startswith("layer4") and "downsample" not in nm:
            pairs[nm] = (2, 8) if policy_kind == "mixed" else (4, 8)
        else:
            pairs[nm] = (4, 8)
    pol = Policy(pairs)
    calib = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    apply_policy(m, pol, calib_loader=calib, calib_batches=2)
    return fp32, convert(m, pol), pol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="two GEMM shapes, no end-to-end")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the resnet18 end-to-end run")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's mmap/trim thresholds as they are (see steady_malloc)")
    ap.add_argument("--avx2-host", action="store_true",
                    help="hold torch and the lcpaq kernels to AVX2 (emulates an AVX2-only CPU; see the docstring)")
    args = ap.parse_args()
    avx2_host = all(os.environ.get(k) == v for k, v in AVX2_HOST_ENV.items())
    if args.avx2_host and not avx2_host:  # the switches are read when torch loads: start again with them
        import sys

        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_HOST_ENV})
    threads = [int(t) for t in args.threads.split(",")]
    malloc_steady = False if args.malloc_default else steady_malloc()
    print("lcpaq kernels:", status(), "ISA:", cpu_isa(), "torch ISA:", torch.backends.cpu.get_cpu_capability(),
          "steady malloc:", malloc_steady, "(AVX2 host emulated)" if avx2_host else "")
    rows = []
    shapes = SHAPES[1:3] if args.quick else SHAPES
    if args.shapes:
        want = args.shapes.split(",")
        unknown = set(want) - {s[0] for s in SHAPES}
        if unknown:
            ap.error(f"unknown shapes {sorted(unknown)}; choose from {[s[0] for s in SHAPES]}")
        shapes = [s for s in SHAPES if s[0] in want]
    loadavg: dict[str, list[float]] = {}
    for t in threads:
        loadavg[f"gemm_t{t}_start"] = [round(v, 2) for v in os.getloadavg()]
        for name, m, n, k in shapes:
            res = interleaved(gemm_contestants(m, n, k, t), args.rounds, args.reps, t)
            base = res["torch-fp32"]["ms"]
            for c, r in res.items():
                rows.append({"threads": t, "shape": name, "M": m, "N": n, "K": k, "contestant": c,
                             "median_ms": round(r["ms"], 4), "spread": round(r["spread"], 3),
                             "gops": round(2 * m * n * k / r["ms"] / 1e6, 1),
                             "speedup_vs_fp32": round(base / r["ms"], 2)})
            print(f"[t={t}] {name:22s} " + "  ".join(
                f"{c}={2 * m * n * k / r['ms'] / 1e6:.0f}" for c, r in res.items()))
    e2e = []
    if not (args.quick or args.no_e2e):
        with torch.inference_mode():
            fp32, intm, pol = _resnet18_pair("mixed")
            x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
            err = float((fp32(x) - intm(x)).abs().max())
            for t in threads:
                loadavg[f"e2e_t{t}_start"] = [round(v, 2) for v in os.getloadavg()]
                fns = {"torch-fp32": lambda: fp32(x), "lcpaq-mixed": lambda: intm(x)}
                if cpu_isa() != "avx2":
                    fns["lcpaq-mixed-avx2"] = _forced_isa("avx2", fns["lcpaq-mixed"])
                res = interleaved(fns, args.rounds, 3, t)
                sp = res["torch-fp32"]["ms"] / res["lcpaq-mixed"]["ms"]
                row = {"threads": t, "fp32_ms": round(res["torch-fp32"]["ms"], 3),
                       "fp32_spread": round(res["torch-fp32"]["spread"], 3),
                       "lcpaq_ms": round(res["lcpaq-mixed"]["ms"], 3),
                       "lcpaq_spread": round(res["lcpaq-mixed"]["spread"], 3),
                       "speedup": round(sp, 2), "max_abs_diff_vs_fp32": err}
                if "lcpaq-mixed-avx2" in res:
                    row["lcpaq_avx2_ms"] = round(res["lcpaq-mixed-avx2"]["ms"], 3)
                    row["speedup_avx2"] = round(res["torch-fp32"]["ms"] / res["lcpaq-mixed-avx2"]["ms"], 2)
                e2e.append(row)
                print(f"[t={t}] resnet18 e2e: fp32 {res['torch-fp32']['ms']:.2f} ms, "
                      f"lcpaq mixed {res['lcpaq-mixed']['ms']:.2f} ms -> {sp:.2f}x"
                      + (f" (AVX2 kernels: {row['speedup_avx2']:.2f}x)" if "speedup_avx2" in row else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    partial = args.quick or args.shapes or args.no_e2e
    tag = "bench_kernels" + ("_avx2host" if avx2_host else "") + ("_quick" if partial else "")
    df.to_csv(RESULTS / f"{tag}.csv", index=False)
    table = df.pivot_table(index=["threads", "shape"], columns="contestant", values="gops")
    print("\nGOP/s (higher is better):\n" + table.round(0).to_string())
    goals_md, goals_met = goal_table(rows, cpu_isa())
    print("\nGoals (ratios of fastest-round medians; '(miss)' below the goal):\n" + goals_md)
    print("shapes meeting each goal (GEMV rows excluded):", goals_met)
    print("([avx2] columns: lcpaq forced to its AVX2 kernels; "
          + ("torch held to AVX2 (--avx2-host), ORT still runs its best ISA" if avx2_host
             else "torch and ORT run their best ISA")
          + ", so [avx2] W8A8/ORT-u8u8 is not what an AVX2-only CPU would show)")
    for row in e2e:
        print(f"[t={row['threads']}] resnet18 e2e vs fp32 (>= 2.5): {cpu_isa()} {row['speedup']:.2f}"
              + (f", avx2 {row['speedup_avx2']:.2f}" if "speedup_avx2" in row else ""))
    print("load average:", loadavg, "end", os.getloadavg())
    meta = {"torch": torch.__version__, "threads": threads, "rounds": args.rounds,
            "kernels": str(status()), "isa": cpu_isa(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "avx2_host_emulated": avx2_host, "gemm": rows, "resnet18_e2e": e2e,
            "goals_met": goals_met, "steady_malloc": malloc_steady,
            "policy": "conv1/fc w8a8, layer4 3x3 w2a8, rest w4a8 (BN folded; convert fuses ReLU + "
                      "the next conv's uint8 quantization into the epilogue)",
            "loadavg": loadavg | {"end": [round(v, 2) for v in os.getloadavg()]},
            "note": "shared 2-core VM; fastest-round medians; 1 thread = thread CPU time, 2 threads = wall"}
    (RESULTS / f"{tag}.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
