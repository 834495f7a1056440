"""Proxy search vs full-search baseline over the same knob settings, side by side.

For each dataset (mnist5k with the embedded model; digits with a MnistResNet trained here):
  * proxy: successive halving (lcpaq.proxy.tune) on a 4 % class-balanced proxy subset, PTQ only;
    plus every setting scored on the whole proxy set (for the rank correlation);
  * full: every setting scored by a short KD fine-tune (--full-epochs, default 3) on the full
    training data + val accuracy;
  * the candidate policies (ILP/Pareto solves) are computed once and shared by both searches;
  * Kendall tau between proxy scores (margin, -KL, acc) and full scores; wall-time ratio;
  * the policy each side chose, fine-tuned with the same KD recipe: final accuracy (mean over
    --final-seeds seeds) on the held-out half of the val split (the full search selects on the
    other half).
Timings interleave proxy and full per setting (A B A B). The machine is shared (2 cores).

    OMP_NUM_THREADS=1 python benchmarks/bench_proxy.py [--trials 10] [--datasets mnist5k,digits]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (the ILP solver runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def digits_model(seed: int = 0):
    from lcpaq.data import get_loader
    from lcpaq.models import MnistResNet

    torch.manual_seed(seed)
    m = MnistResNet()
    tr = get_loader("digits", "train", batch_size=32, shuffle=True, seed=seed)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12 * len(tr))
    for _ in range(12):
        m.train()
        for x, y in tr:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            sched.step()
    return m.eval()


def run_one(data: str, trials: int, full_epochs: int, final_epochs: int, fraction: float, final_seeds: int = 3,
            calibration: str = "fp32", lock: str | None = None) -> dict:
    from scipy.stats import kendalltau
    from torch.utils.data import DataLoader, Subset

    from lcpaq.costs import policy_costs
    from lcpaq.data import _stratified_split, get_dataset, get_loader
    from lcpaq.errors import InfeasibleBudgetError, SolverError
    from lcpaq.finetune import finetune
    from lcpaq.graph import trace
    from lcpaq.models import get_model
    from lcpaq.policy import Policy
    from lcpaq.proxy import (
        PolicyMaker,
        ProxyEvaluator,
        candidate_configs,
        full_score,
        proxy_subset,
        tune,
    )
    from lcpaq.search import Budgets
    from lcpaq.sensitivity import estimate_sensitivity

    if data == "mnist5k":
        model, shape = get_model("mnist_resnet"), (1, 1, 28, 28)
    else:
        model, shape = digits_model(), (1, 1, 8, 8)
    inv = trace(model, shape, name=f"mnist_resnet@{data}")
    train = get_loader(data, "train", batch_size=64, shuffle=True)
    # The full search selects on one half of the validation split; both sides' choices are
    # reported on the other half (held out from every selection), so the full baseline's winner
    # is not scored on the images it was picked with.
    vds = get_dataset(data, "val")
    sel_idx, test_idx = _stratified_split(vds.tensors[1].numpy(), 0.5, 0)
    val = DataLoader(Subset(vds, sel_idx.tolist()), batch_size=500)
    test = DataLoader(Subset(vds, test_idx.tolist()), batch_size=500)
    cands = [(w, a) for w in (2, 4, 8) for a in (4, 8)]
    rep = estimate_sensitivity(model, get_loader(data, "train", batch_size=32), candidates=cands, probes=20, tol=0.2)
    w4 = policy_costs(inv, Policy.uniform(inv.names, 4, 8))  # W4A8-average budget
    budgets = Budgets(max_size_mb=w4.total_size_mb * 1.0001, max_gbops=sum(w4.bops.values()) / 1e9 * 1.0001)
    sub = proxy_subset(get_dataset(data, "train"), fraction=fraction)
    configs = candidate_configs(trials, seed=0)
    make = PolicyMaker(inv, rep, budgets=budgets)

    # Steps 1-3 are the timings: run under an exclusive flock on `lock` (the shared machine's
    # benchmark lock) so no other benchmark runs beside them; model training, sensitivity and the
    # final fine-tunes (accuracies, not timings) run outside it.
    lock_f = open(lock, "a") if lock else None
    if lock_f is not None:
        import fcntl

        fcntl.flock(lock_f, fcntl.LOCK_EX)
    load_before = open("/proc/loadavg").read().split()[:3]
    # 1. the candidate set both searches choose from: one feasible policy per knob setting (the ILP
    #    and Pareto solves), computed once and shared; timed on its own.
    t, c = time.perf_counter(), _cpu()
    errors = {}
    for k in configs:
        try:
            make(k)
        except (InfeasibleBudgetError, SolverError) as e:
            errors[k] = str(e).splitlines()[0]
    t_policy, c_policy = time.perf_counter() - t, _cpu() - c

    # 2. the proxy search (successive halving, PTQ on the proxy subset), evaluator setup included
    t0, c0 = time.perf_counter(), _cpu()
    ev = ProxyEvaluator(model, *sub.tensors(), calibration=calibration)
    res = tune(model, inv, rep, ev, budgets=budgets, configs=configs, maker=make)
    t_tune, c_tune = time.perf_counter() - t0, _cpu() - c0
    ev.clear_cache()  # the scoring pass below times cold evaluations (fp32 cache kept: built once)

    # 3. every setting scored both ways, interleaved (proxy, full, proxy, full, ...)
    rows, t_proxy, t_full, full_cache, proxy_cache = [], 0.0, 0.0, {}, {}
    c_proxy = c_full = 0.0
    for k in configs:
        if k in errors:  # infeasible knobs are data
            rows.append({"knobs": k.label(), "error": errors[k]})
            continue
        pol = make(k)
        key = (pol, k.calib_method)
        t, c = time.perf_counter(), _cpu()
        if key not in proxy_cache:
            proxy_cache[key] = ev.evaluate(pol, calib_method=k.calib_method)
        t_proxy += time.perf_counter() - t
        c_proxy += _cpu() - c
        t, c = time.perf_counter(), _cpu()
        if key not in full_cache:
            full_cache[key] = full_score(model, pol, k, train, val, epochs=full_epochs)
        t_full += time.perf_counter() - t
        c_full += _cpu() - c
        s = proxy_cache[key]
        rows.append({"knobs": k.label(), "policy": pol.summary(), "margin": s.margin, "kl": s.kl, "proxy_acc": s.acc,
                     "full_acc": full_cache[key]})
    load_after = open("/proc/loadavg").read().split()[:3]
    if lock_f is not None:
        lock_f.close()  # releases the flock
    ok = [r for r in rows if "full_acc" in r]
    full = [r["full_acc"] for r in ok]
    tau = {m: float(kendalltau([r[m] for r in ok], full).statistic) for m in ("margin", "kl", "proxy_acc")}
    best_full = max(ok, key=lambda r: r["full_acc"])
    chosen = {"proxy": (res.best.knobs, res.best.policy),
              "full": next((k, make(k)) for k in configs if k.label() == best_full["knobs"])}
    # 4. each side's choice fine-tuned with the same KD recipe, averaged over seeds (one val image
    #    is 0.28 pt on digits: a single fine-tune is too noisy to compare two policies at 0.3 pt)
    same = chosen["proxy"][1] == chosen["full"][1] and chosen["proxy"][0].calib_method == chosen["full"][0].calib_method
    final = {}
    for side, (k, pol) in chosen.items():
        if side == "full" and same:  # same policy and calibration: fine-tunes are deterministic per seed
            final[side] = dict(final["proxy"], knobs=k.label())
            continue
        runs = [finetune(copy.deepcopy(model), pol, train, test, epochs=final_epochs, kd_temp=k.kd_temp,
                         kd_alpha=k.kd_alpha, calib_method=k.calib_method, seed=sd) for sd in range(final_seeds)]
        final[side] = {"knobs": k.label(), "policy": pol.summary(), "fp32": runs[0].fp32_acc,
                       "ptq": runs[0].ptq_acc, "qat": sum(r.qat_acc for r in runs) / len(runs),
                       "qat_per_seed": [r.qat_acc for r in runs]}
    return {"data": data, "proxy_share": sub.share, "proxy_samples": len(sub.indices), "configs": len(configs),
            "unique_evals": len(full_cache), "tune_s": t_tune, "proxy_score_s": t_proxy, "full_s": t_full,
            "policy_s": t_policy,
            "cpu": {"tune_s": c_tune, "proxy_score_s": c_proxy, "full_s": c_full, "policy_s": c_policy,
                    "ratio_full_vs_tune": c_full / max(c_tune, 1e-9),
                    "ratio_with_policies": (c_full + c_policy) / max(c_tune + c_policy, 1e-9),
                    "ratio_full_vs_proxy_scoring": c_full / max(c_proxy, 1e-9)},
            # the ratio: full search (every setting KD-fine-tuned) vs the proxy search, both
            # over the same precomputed candidate set
            "ratio_full_vs_tune": t_full / t_tune,
            # the same with the shared policy solves added to both sides
            "ratio_with_policies": (t_full + t_policy) / (t_tune + t_policy),
            # per evaluation: the same unique (policy, calibration) set scored both ways
            "ratio_full_vs_proxy_scoring": t_full / max(t_proxy, 1e-9),
            "same_choice": same, "kendall_tau": tau, "final": final, "rows": rows, "calibration": calibration,
            "sensitivity_probes": rep.probes, "full_epochs": full_epochs, "final_epochs": final_epochs,
            "final_seeds": final_seeds, "select_val_images": len(sel_idx), "test_val_images": len(test_idx),
            "loadavg_1min": os.getloadavg()[0], "loadavg_timed": [load_before, load_after], "locked": bool(lock)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--datasets", default="digits,mnist5k")
    ap.add_argument("--full-epochs", type=int, default=3, help="KD epochs per setting in the full baseline")
    ap.add_argument("--final-seeds", type=int, default=5, help="fine-tune seeds averaged for the final accuracy")
    ap.add_argument("--calibration", default="fp32", help="proxy calibration: fp32 (cached ranges) | sequential")
    ap.add_argument("--final-epochs", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.04)
    ap.add_argument("--lock", default=None, help="flock this file around the timed steps (e.g. /tmp/lcpaq-bench.lock)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = []
    for d in a.datasets.split(","):
        r = run_one(d, a.trials, a.full_epochs, a.final_epochs, a.fraction, a.final_seeds, a.calibration, a.lock)
        out.append(r)
        (RESULTS / "bench_proxy.json").write_text(json.dumps(out, indent=1, default=str))
        print(f"\n== {d}: proxy {100 * r['proxy_share']:.1f}% ({r['proxy_samples']} samples), "
              f"{r['configs']} settings, {r['unique_evals']} unique (policy, calib)")
        for row in r["rows"]:
            print("  ", row)
        print(f"  tau {r['kendall_tau']}  tune {r['tune_s']:.2f}s  proxy-scoring {r['proxy_score_s']:.2f}s  "
              f"full {r['full_s']:.1f}s  shared policies {r['policy_s']:.2f}s  ratio full/tune {r['ratio_full_vs_tune']:.0f}x  "
              f"(with policies {r['ratio_with_policies']:.0f}x)  full/proxy-scoring {r['ratio_full_vs_proxy_scoring']:.0f}x  "
              f"load {r['loadavg_1min']:.1f}")
        cp = r["cpu"]
        print(f"  CPU time: tune {cp['tune_s']:.2f}s  proxy-scoring {cp['proxy_score_s']:.2f}s  full {cp['full_s']:.1f}s  "
              f"policies {cp['policy_s']:.2f}s  ratios {cp['ratio_full_vs_tune']:.0f}x / {cp['ratio_with_policies']:.0f}x / "
              f"{cp['ratio_full_vs_proxy_scoring']:.0f}x")
        for side, f in r["final"].items():
            print(f"  chosen by {side}: {f}")
    with (RESULTS / "bench_proxy.csv").open("w") as f:
        f.write("data,proxy_share,configs,tau_margin,tau_kl,tau_acc,tune_s,full_s,policy_s,ratio,ratio_with_policies,"
                "ratio_scoring,cpu_ratio,cpu_ratio_with_policies,cpu_ratio_scoring,final_proxy_qat,final_full_qat,fp32,loadavg\n")
        for r in out:
            t, fi = r["kendall_tau"], r["final"]
            f.write(f"{r['data']},{r['proxy_share']:.4f},{r['configs']},{t['margin']:.3f},{t['kl']:.3f},"
                    f"{t['proxy_acc']:.3f},{r['tune_s']:.2f},{r['full_s']:.1f},{r['policy_s']:.2f},"
                    f"{r['ratio_full_vs_tune']:.1f},{r['ratio_with_policies']:.1f},{r['ratio_full_vs_proxy_scoring']:.1f},"
                    f"{r['cpu']['ratio_full_vs_tune']:.1f},{r['cpu']['ratio_with_policies']:.1f},"
                    f"{r['cpu']['ratio_full_vs_proxy_scoring']:.1f},"
                    f"{fi['proxy']['qat']:.2f},{fi['full']['qat']:.2f},{fi['proxy']['fp32']:.2f},{r['loadavg_1min']:.1f}\n")


if __name__ == "__main__":
    main()
