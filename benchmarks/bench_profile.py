"""Wall time of a full ORT latency table (resnet18, mobilenet_v2) on this host, from scratch,
and of a resumed run that finds the table complete. Prints a table, writes CSV/JSON.

    .venv/bin/python benchmarks/bench_profile.py [--models resnet18,mobilenet_v2]

Candidates: the host-cpu-ort profile's (w2a8, w4a8, w6a8, w8a8, w8a4, fp32), every unique layer
x candidate x input precision (fp32 / int8 producer). TVM figures: benchmarks/bench_tvm.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcpaq.graph import trace_named  # noqa: E402
from lcpaq.profiler.hwprofile import load_profile  # noqa: E402
from lcpaq.profiler.run import plan_units, profile  # noqa: E402
from lcpaq.profiler.table import read_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"


def main() -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--hw", default=str(ROOT / "hw_profiles" / "host-cpu-ort.toml"))
    args = ap.parse_args()
    hw = load_profile(args.hw)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            _, inv = trace_named(name)
            plan = plan_units(inv, hw.candidates)
            out = Path(d) / f"{name}.jsonl"
            t0, c0 = time.perf_counter(), os.times()
            profile(inv, hw, out)
            wall = time.perf_counter() - t0
            c1 = os.times()
            t1 = time.perf_counter()
            profile(inv, hw, out)  # resume: everything already there
            resume = time.perf_counter() - t1
            t = read_table(out)
            rows.append({
                "model": name, "layers": len(inv), "unique_workloads": len({k.split("|")[0] for k, *_ in plan}),
                "units": len(plan) + 1, "errors": sum(1 for r in t if r.get("error")),
                "full_table_wall_s": wall, "full_table_cpu_s": (c1.children_user + c1.children_system
                                                                 + c1.user + c1.system) - (c0.children_user + c0.children_system + c0.user + c0.system),
                "resume_noop_wall_s": resume, "load_avg_1m": os.getloadavg()[0],
            })
            r = rows[-1]
            print(f"{name:14s} {r['layers']:3d} layers {r['unique_workloads']:3d} workloads {r['units']:4d} units  "
                  f"full table {r['full_table_wall_s']:6.1f} s wall ({r['full_table_cpu_s']:.1f} s CPU), "
                  f"resume {r['resume_noop_wall_s']:.1f} s, errors {r['errors']}, load {r['load_avg_1m']:.1f}",
                  flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_profile.json").write_text(json.dumps(rows, indent=1))
    with (OUT / "bench_profile.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
