"""lcpaq per-layer Hutchinson vs PyHessian's whole-model ``trace()``, and time to 5 % stderr.

Part 1 (same model, same batch, same parameter set, same probe count): PyHessian's ``hessian``
(constructor = forward + create_graph backward) + ``trace(maxIter=N, tol=-1)`` (tol < 0 disables
its running-difference stop so both take N probes) vs lcpaq's ``hutchinson_traces`` over the
quantizable weights (one HVP per probe gives every layer), and with the input-activation blocks
as well (lcpaq's default). Only the quantizable weights require grad in both, so PyHessian's
total is over the same parameters as the sum of lcpaq's per-layer traces. Runs are interleaved
(PyHessian, lcpaq-w, lcpaq-w+a) for several rounds; we report the fastest round, the median and
the spread, and the totals with their standard errors (different probe streams: compare in
units of the combined stderr).

Part 2: probes and seconds until every layer's |stderr/mean| < 5 % (weights; weights + inputs),
on the embedded model (64 mnist5k training samples) and resnet18 (random init, 16 seeded random
64x64 images), 2 threads, capped at --cap probes.

    .venv/bin/pip install -r benchmarks/requirements-bench.txt
    .venv/bin/python benchmarks/bench_sensitivity.py [--rounds 3 --probes 20 --cap 300]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcpaq.models import EMBEDDED, get_model  # noqa: E402
from lcpaq.quant import quantizable_names  # noqa: E402
from lcpaq.sensitivity import hutchinson_traces  # noqa: E402
from lcpaq.sensitivity.blocks import collect_batches, only_grads_for, weight_of  # noqa: E402

OUT = Path(__file__).parent / "results"


def workloads() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    from lcpaq.data import get_loader

    emb = get_model(EMBEDDED)
    x, y = collect_batches(get_loader("mnist5k", "train", batch_size=32), 2)
    torch.manual_seed(0)
    r18 = get_model("resnet18", num_classes=10)
    g = torch.Generator().manual_seed(0)
    xr, yr = torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
    return {f"{EMBEDDED} (64x1x28x28)": (emb, x, y), "resnet18 (16x3x64x64)": (r18, xr, yr)}


def run_pyhessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], probes: int):
    from pyhessian import hessian

    torch.manual_seed(0)
    with only_grads_for(model, [weight_of(model, n) for n in names]):
        t0, c0 = time.perf_counter(), time.process_time()
        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        vals = h.trace(maxIter=probes, tol=-1.0)
        dt = (time.perf_counter() - t0, time.process_time() - c0)
        model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph grads in .grad
    return dt, statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals)), len(vals)


def run_lcpaq(model, x, y, names, probes, activations):
    t0, c0 = time.perf_counter(), time.process_time()
    w, a, samples = hutchinson_traces(model, x, y, names, activations=activations, max_probes=probes,
                                      min_probes=probes, seed=0)
    dt = (time.perf_counter() - t0, time.process_time() - c0)
    tot = [sum(v for k, v in s.items() if k.startswith("w:")) for s in samples]
    return dt, statistics.fmean(tot), statistics.stdev(tot) / math.sqrt(len(tot)), len(tot)


def compare(rounds: int, probes: int, wl) -> list[dict]:
    rows = []
    for name, (model, x, y) in wl.items():
        model.eval()
        names = quantizable_names(model)
        times: dict[str, list[tuple[float, float]]] = {"pyhessian": [], "lcpaq-w": [], "lcpaq-w+a": []}
        tot: dict[str, tuple] = {}
        for _ in range(rounds):  # interleaved A B C, A B C, ...
            dt, *t = run_pyhessian(model, x, y, names, probes)
            times["pyhessian"].append(dt)
            tot["pyhessian"] = t
            dt, *t = run_lcpaq(model, x, y, names, probes, False)
            times["lcpaq-w"].append(dt)
            tot["lcpaq-w"] = t
            dt, *t = run_lcpaq(model, x, y, names, probes, True)
            times["lcpaq-w+a"].append(dt)
            tot["lcpaq-w+a"] = t
        base = times["pyhessian"]
        for k, tt in times.items():
            ts, cs = [t for t, _ in tt], [c for _, c in tt]  # wall, process CPU (both threads)
            bc = [c for _, c in base]
            ratios = [c / b for c, b in zip(cs, bc, strict=True)]
            m, se, n = tot[k]
            pm, pse, _ = tot["pyhessian"]
            rows.append({
                "workload": name, "method": k, "probes": n, "wall_fastest_s": min(ts),
                "cpu_fastest_s": min(cs), "cpu_median_s": statistics.median(cs),
                "cpu_spread_pct": 100 * (max(cs) - min(cs)) / min(cs),
                "cpu_ratio_fastest": min(cs) / min(bc), "cpu_ratio_median_of_rounds": statistics.median(ratios),
                "wall_ratio_fastest": min(ts) / min(t for t, _ in base),
                "total_trace": m, "total_stderr": se,
                "z_vs_pyhessian": (m - pm) / math.sqrt(se**2 + pse**2) if k != "pyhessian" else 0.0,
            })
    return rows


def to_tol(cap: int, wl, tol: float = 0.05, max_seconds: float = 600.0) -> list[dict]:
    rows = []
    for name, (model, x, y) in wl.items():
        names = quantizable_names(model)
        for acts in (False, True):
            t0, c0 = time.perf_counter(), time.process_time()
            w, a, _ = hutchinson_traces(model, x, y, names, activations=acts, max_probes=cap, min_probes=10,
                                        tol=tol, seed=0, max_seconds=max_seconds)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            ests = {**{f"w:{k}": v for k, v in w.items()}, **{f"a:{k}": v for k, v in a.items()}}
            worst = max(ests, key=lambda k: ests[k].rel_stderr)
            n = w[names[0]].probes
            rows.append({"workload": name, "blocks": "weights+inputs" if acts else "weights", "n_blocks": len(ests),
                         "probes": n, "wall_s": dt, "cpu_s": cpu, "cpu_s_per_probe": cpu / n,
                         "reached_5pct": ests[worst].rel_stderr < tol, "max_rel_stderr": ests[worst].rel_stderr,
                         "worst_block": worst,
                         "blocks_below_5pct": sum(e.rel_stderr < tol for e in ests.values())})
    return rows


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(*rows[0].keys(), title=title)
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=220).print(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--cap", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=600.0, help="wall budget per to-5%% run")
    ap.add_argument("--skip-tol", action="store_true")
    ap.add_argument("--only", default="", help="substring of the workload names to run")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wl = {k: v for k, v in workloads().items() if args.only in k}
    cmp_rows = compare(args.rounds, args.probes, wl) if args.rounds > 0 else []
    if cmp_rows:
        show(cmp_rows, f"lcpaq vs PyHessian trace(): {args.probes} probes, {args.rounds} interleaved rounds, "
                   f"{args.threads} threads")
    tol_rows = [] if args.skip_tol else to_tol(args.cap, wl, max_seconds=args.max_seconds)
    if tol_rows:
        show(tol_rows, f"time to 5% relative stderr on every block ({args.threads} threads, cap {args.cap} probes)")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "probes": args.probes,
            "cap": args.cap, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "shared 2-core VM, other helpers were loading it"}
    tag = f"_{args.tag}" if args.tag else ""
    (OUT / f"sensitivity{tag}.json").write_text(json.dumps({"meta": meta, "compare": cmp_rows, "to_5pct": tol_rows},
                                                     indent=1) + "\n")
    for fname, rows in ((f"sensitivity{tag}_compare.csv", cmp_rows), (f"sensitivity{tag}_to_5pct.csv", tol_rows)):
        if rows:
            with open(OUT / fname, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader()
                wr.writerows(rows)


if __name__ == "__main__":
    main()
