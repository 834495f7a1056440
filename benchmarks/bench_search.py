"""ILP solve time (ResNet-18/50-sized, 200 and 1,000 layers; 12 candidates; 3 budgets) and the
MCKP greedy's time and optimality gap beside it. Prints a table, writes CSV/JSON.

    .venv/bin/python benchmarks/bench_search.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcpaq.search import solve_ilp, solve_mckp  # noqa: E402
from lcpaq.search.ilp import _model  # noqa: E402
from lcpaq.testing.synthetic import random_problem  # noqa: E402

CASES = [("resnet18-sized", 21, 4), ("resnet50-sized", 54, 8), ("synthetic-200", 200, 20), ("synthetic-1000", 1000, 50)]
OUT = Path(__file__).parent / "results"


def main(rounds: int = 3) -> list[dict]:
    rows = []
    for name, n, ties in CASES:
        for pairwise in (False, True):
            prob = random_problem(n, seed=7, ties=ties, pairwise=pairwise, budget_frac=0.5)
            ilp_t, mk_t, build_t = [], [], []
            for _ in range(rounds if n <= 200 else 1):  # interleave ILP / MCKP
                t0 = time.perf_counter()
                _model(prob, "omega", prob.budgets)
                build_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ilp = solve_ilp(prob, time_limit_s=120)
                ilp_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                mk = solve_mckp(prob)
                mk_t.append(time.perf_counter() - t0)
            rows.append({
                "problem": name, "layers": n, "candidates": 12, "pairwise": pairwise,
                "ilp_total_s": min(ilp_t), "ilp_solver_s": ilp.solve_time_s, "model_build_s": min(build_t),
                "mckp_s": min(mk_t), "ilp_spread_s": max(ilp_t) - min(ilp_t),
                "gap_pct": 100 * (mk.objective - ilp.objective) / ilp.objective,
            })
            r = rows[-1]
            print(f"{name:16s} pairwise={pairwise!s:5s} ILP {r['ilp_total_s']:.3f}s "
                  f"(solver {r['ilp_solver_s']:.3f}s, build {r['model_build_s']:.3f}s)  "
                  f"MCKP {r['mckp_s']:.4f}s  gap {r['gap_pct']:.2f}%", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "search.json").write_text(json.dumps(rows, indent=1))
    import csv

    with (OUT / "search.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("median MCKP gap %.2f%%" % statistics.median(r["gap_pct"] for r in rows))
    return rows


if __name__ == "__main__":
    main()
