"""ILP solve time (CBC and HiGHS, interleaved) for ResNet-18/50-sized, 200- and 1,000-layer
problems with 12 candidates and all three budgets, with and without transition terms; the MCKP
greedy's time and optimality gap beside it; and the real ResNet-18/50 inventories (traced).

    .venv/bin/python benchmarks/bench_search.py [--quick] [--only=resnet50-sized:False]

Times: the fastest round's value (rounds interleave CBC / HiGHS / MCKP), spread = max - min.
``build_s`` is the PuLP model build (CBC path), ``build_numpy_s`` the numpy/highspy one (HiGHS
path); ``cbc_s`` / ``highs_s`` are the whole solve_ilp call (wall; ``*_cpu_s``: CPU of this process
and of the CBC child, the load-robust figure) over the rounds that proved optimality (status "Optimal k/n"; a round that hit the time limit is rejected).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcpaq.errors import SolverError  # noqa: E402
from lcpaq.search import solve_ilp, solve_mckp  # noqa: E402
from lcpaq.search.ilp import _model, default_solver  # noqa: E402
from lcpaq.search.mip import build_arrays  # noqa: E402
from lcpaq.testing.synthetic import CANDIDATES_12, random_problem, synthetic_latency  # noqa: E402

OUT = Path(__file__).parent / "results"
LIMIT_S = 60.0


def synthetic_cases(quick: bool):
    sizes = [("resnet18-sized", 21), ("resnet50-sized", 54), ("synthetic-200", 200), ("synthetic-1000", 1000)]
    for name, n in sizes[:3] if quick else sizes:
        for pw in (False, "abits") + (("random",) if n <= 54 else ()):
            yield name, random_problem(n, seed=7, ties=n // 20, pairwise=pw, budget_frac=0.5), pw


def inventory_cases():
    """Real traced ResNet-18/50 inventories: size/BOPs from lcpaq.costs, Ω ~ 4^-w scaled by layer,
    ORT-like latency (three kernel classes) with fp32<->int transitions on the traced edges."""
    try:
        from lcpaq.graph import trace_named
    except Exception as e:  # noqa: BLE001
        print(f"(skipping traced inventories: {e})")
        return
    import random

    from lcpaq.policy import FP32
    from lcpaq.search import Budgets, build_problem

    cands = CANDIDATES_12[:-1] + (FP32,)
    for model in ("resnet18", "resnet50"):
        _, inv = trace_named(model)
        rng = random.Random(0)
        omega = {}
        for ly in inv:
            s = rng.uniform(0.1, 10) / max(ly.weight_numel, 1) ** 0.5
            omega[ly.name] = {p: 0.0 if p == FP32 else s * (4.0 ** -p[0] + 0.5 * 4.0 ** -p[1]) for p in cands}
        lat = synthetic_latency(inv.names, cands, seed=1, edges=inv.edges, transition_ms=0.05)
        free = build_problem(inv, omega, candidates=cands, latency=lat)
        ev = {c: [free.evaluate({ly: p for ly in inv.names})[c] for p in cands] for c in ("size_mb", "gbops", "latency_ms")}
        b = {c: min(v) + 0.4 * (max(v) - min(v)) for c, v in ev.items()}
        yield (f"{model}-traced", build_problem(inv, omega, candidates=cands, latency=lat, budgets=Budgets(
            max_size_mb=b["size_mb"], max_gbops=b["gbops"], max_latency_ms=b["latency_ms"])), "classes")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (CBC runs as a child process):
    the load-robust figure on this shared VM, reported beside wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


CPU: dict[str, list[float]] = {}


def timed(fn, key: str | None = None):
    t0, c0 = time.perf_counter(), _cpu()
    try:
        out = fn()
    except SolverError as e:
        out = e
    if key is not None and not isinstance(out, Exception):
        CPU.setdefault(key, []).append(_cpu() - c0)
    return out, time.perf_counter() - t0


def main(quick: bool = False, only: str | None = None) -> list[dict]:
    rows = []
    cases = list(synthetic_cases(quick)) + ([] if quick else list(inventory_cases()))
    if only:
        cases = [c for c in cases if only in f"{c[0]}:{c[2]}"]
    for name, prob, pw in cases:
        n = len(prob.layers)
        rounds = 3 if n <= 200 else 1
        t: dict[str, list[float]] = {"build": [], "build_np": [], "cbc": [], "highs": [], "auto": [], "mckp": []}
        CPU.clear()
        res: dict[str, object] = {}
        n_opt = {"cbc": 0, "highs": 0}
        for _ in range(rounds):
            t0 = time.perf_counter()
            _model(prob, "omega", prob.budgets)
            t["build"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            build_arrays(prob, "omega", prob.budgets)
            t["build_np"].append(time.perf_counter() - t0)
            for s in ("cbc", "highs"):
                r, dt = timed(lambda s=s, p=prob: solve_ilp(p, solver=s, time_limit_s=LIMIT_S), s)
                if not isinstance(r, Exception):
                    res[s], n_opt[s] = r, n_opt[s] + 1
                    t[s].append(dt)
                res.setdefault(s, r)
            r, dt = timed(lambda p=prob: solve_ilp(p, time_limit_s=LIMIT_S), "auto")  # what users get
            if not isinstance(r, Exception):
                t["auto"].append(dt)
                res["auto_solver"] = r.solver  # type: ignore[attr-defined]
            res["mckp"], dt = timed(lambda p=prob: solve_mckp(p))
            t["mckp"].append(dt)
        ok = [r for r in (res["cbc"], res["highs"]) if not isinstance(r, Exception)]
        best = min((r.objective for r in ok), default=float("nan"))  # type: ignore[attr-defined]
        mk = res["mckp"]
        gap = 100 * (mk.objective - best) / best if not isinstance(mk, Exception) else float("nan")  # type: ignore[attr-defined]
        row = {
            "problem": name, "layers": n, "candidates": max(len(c) for c in prob.candidates.values()),
            "budgets": len(prob.budgets.items()), "pairwise": str(pw), "rounds": rounds,
            "build_s": min(t["build"]), "build_numpy_s": min(t["build_np"]),
            "cbc_s": min(t["cbc"], default=float("nan")), "cbc_spread_s": max(t["cbc"], default=0) - min(t["cbc"], default=0),
            "cbc_status": f"Optimal {n_opt['cbc']}/{rounds}",
            "highs_s": min(t["highs"], default=float("nan")),
            "highs_spread_s": max(t["highs"], default=0) - min(t["highs"], default=0),
            "highs_status": f"Optimal {n_opt['highs']}/{rounds}",
            "cbc_cpu_s": min(CPU.get("cbc", []), default=float("nan")),
            "highs_cpu_s": min(CPU.get("highs", []), default=float("nan")),
            "auto": default_solver(n, transitions=pw is not False),
            "auto_s": min(t["auto"], default=float("nan")), "auto_cpu_s": min(CPU.get("auto", []), default=float("nan")),
            "auto_path": res.get("auto_solver", "failed"),
            "mckp_s": min(t["mckp"]), "mckp_gap_pct": gap,
            "loadavg_1min": os.getloadavg()[0],  # the VM is shared: read times against this
        }
        rows.append(row)
        print(f"{name:16s} pw={row['pairwise']:7s} n={n:4d} build {row['build_s']:.3f}s | CBC {row['cbc_s']:.3f}s "
              f"({row['cbc_status']}, cpu {row['cbc_cpu_s']:.3f}) | HiGHS {row['highs_s']:.3f}s ({row['highs_status']}, "
              f"cpu {row['highs_cpu_s']:.3f}) | auto {row['auto_s']:.3f}s (cpu {row['auto_cpu_s']:.3f}, {row['auto_path']}) | "
              f"MCKP {row['mckp_s']:.3f}s gap {row['mckp_gap_pct']:.2f}% | load {row['loadavg_1min']:.1f}", flush=True)
    OUT.mkdir(exist_ok=True)
    stem = "search" if not (quick or only) else "search_partial"
    (OUT / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    with (OUT / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


if __name__ == "__main__":
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
    main(quick="--quick" in sys.argv, only=only)
