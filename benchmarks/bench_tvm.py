"""TVM backend benchmark: tuned per-layer latency vs ORT on resnet18's dense convs, tuning cost,
re-profiling from the kept database.

    python benchmarks/bench_tvm.py --trials 64 --layers 1 --rounds 3

For each of the first ``--layers`` unique dense 3x3 conv workloads of resnet18 (random weights):
tune the TVM int8 (w8a8, int8 input) and fp32 (fp32 input) units with MetaSchedule at
``--trials`` per task into benchmarks/results/tvm_db (kept: a second run is the re-profiling fast
path), then time TVM and ORT side by side, interleaved (ORT TVM ORT TVM ...), ``--rounds``
rounds; report the fastest round's median and the spread. Wall clock at 1 thread for both (TVM
runs on its own pool thread, so thread CPU time does not apply to it).

Full-table time is extrapolated from the measured per-task tuning time: resnet18 has U unique
quantizable workloads; the TVM table tunes 2 heavy tasks per workload (the int8 and the fp32
conv/matmul kernel: the int8/fp32 *input* forms add only an elementwise quantize/dequantize task,
which is not tuned, and w2..w8 share the int8 task since weights are TIR parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend  # noqa: E402
from lcpaq.profiler.units import build_unit, workload_key  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def resnet18_layers():
    from lcpaq.graph import trace
    from lcpaq.models import get_model

    inv = trace(get_model("resnet18"), (1, 3, 224, 224), name="resnet18")
    seen, uniq = set(), []
    for layer in inv.layers:
        k = workload_key(layer)
        if k not in seen:
            seen.add(k)
            uniq.append(layer)
    return uniq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", default=str(RESULTS / "tvm_db"))
    args = ap.parse_args(argv)
    uniq = resnet18_layers()
    dense = [lay for lay in uniq if lay.kind == "conv" and lay.groups == 1 and lay.kernel_size == (3, 3)
             and lay.in_shape[1] > 3][: args.layers]
    prof = type("P", (), {"threads": 1, "target": "llvm -mcpu=znver3 -num-cores=2",
                          "tvm": {"trials": args.trials, "work_dir": args.db}, "rpc": None})()
    tvm_be = get_backend("tvm", prof)
    ort_be = get_backend("ort", None)
    st = MeasureSettings(warmup=3, number=5, repeat=7, min_repeat_ms=20, metric="wall")
    rows = []
    for layer in dense:
        for bits, in_class in (((8, 8), "int8"), ((32, 32), "fp32")):
            b, feeds = build_unit(layer, bits, in_class)
            unit = Unit(key=workload_key(layer), onnx=b, inputs=feeds, bits=bits)
            t0 = time.perf_counter()
            first = tvm_be.measure(unit, st)  # tunes the missing tasks (or applies the db)
            t_first = time.perf_counter() - t0
            if not first.ok:
                print("TVM failed:", first.error, file=sys.stderr)
                continue
            t0 = time.perf_counter()
            again = tvm_be.measure(unit, st)  # re-profile from the kept db
            t_again = time.perf_counter() - t0
            ort_r, tvm_r = [], []
            for _ in range(args.rounds):  # interleaved A B A B
                ort_r.append(ort_be.measure(unit, st).median_ms)
                tvm_r.append(tvm_be.measure(unit, st).median_ms)
            row = {
                "workload": workload_key(layer), "bits": "w8a8" if bits == (8, 8) else "fp32",
                "ort_ms": min(ort_r), "tvm_ms": min(tvm_r), "tvm_over_ort": min(tvm_r) / min(ort_r),
                "ort_spread": (max(ort_r) - min(ort_r)) / min(ort_r),
                "tvm_spread": (max(tvm_r) - min(tvm_r)) / min(tvm_r),
                "tvm_kernel": first.kernel, "tuned_now": first.extra.get("tuned_now"),
                "tasks": first.extra.get("tasks"), "tune_s": first.extra.get("tune_s"),
                "first_measure_s": round(t_first, 1), "reprofile_measure_s": round(t_again, 2),
                "untuned_fallback": again.extra.get("tuned") is False,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    tuned = [r for r in rows if r["tuned_now"]]
    per_task = float(np.mean([r["tune_s"] / max(r["tuned_now"], 1) for r in tuned])) if tuned else float("nan")
    reprof = float(np.mean([r["reprofile_measure_s"] for r in rows])) if rows else float("nan")
    n_tasks = 2 * len(uniq)
    summary = {
        "trials": args.trials, "resnet18_unique_workloads": len(uniq), "tvm_tasks_full_table": n_tasks,
        "tune_s_per_task_measured": per_task,
        "full_table_min_extrapolated": per_task * n_tasks / 60 if tuned else None,
        "reprofile_s_per_unit_measured": reprof,
        "reprofile_full_table_min_extrapolated": reprof * len(uniq) * 8 / 60,  # ~8 units / workload
        "note": f"2-core VM shared with other helpers (load avg {os.getloadavg()[0]:.1f} at the end); "
                "extrapolated from the tuned layers, not a full run",
    }
    print(f"{'workload':58s} {'bits':5s} {'ORT ms':>8s} {'TVM ms':>8s} {'TVM/ORT':>8s}")
    for r in rows:
        print(f"{r['workload']:58s} {r['bits']:5s} {r['ort_ms']:8.3f} {r['tvm_ms']:8.3f} {r['tvm_over_ort']:8.2f}")
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_tvm_t{args.trials}.json"
    out.write_text(json.dumps({"rows": rows, "summary": summary, "load_avg": os.getloadavg()}, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
