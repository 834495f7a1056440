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
    other half); with --oracle (default: digits) every candidate too, giving the best reachable
    final and how well each side's scores rank the held-out finals;
  * --seeds: digits retrains its model per seed (a new candidate set each time); mnist5k
    (--mnist-seeds) redraws the proxy subset, its full runs are made and timed once.
Timings interleave proxy and full per setting (A B A B); the timed steps of all seeds of a dataset
run in one hold of --lock. The machine is shared (2 cores).

    OMP_NUM_THREADS=1 python benchmarks/bench_proxy.py --lock /tmp/lcpaq-bench.lock [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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


def prepare(data: str, seed: int, a: argparse.Namespace, memo: dict) -> dict:
    """Everything untimed before the searches, for one dataset and seed: digits retrains its
    model with ``seed`` (sensitivity, candidate set and proxy subset all change); mnist5k keeps the
    embedded model (its sensitivity is computed once, in ``memo``) and draws the proxy subset with
    ``seed``."""
    from torch.utils.data import DataLoader, Subset

    from lcpaq.costs import policy_costs
    from lcpaq.data import _stratified_split, get_dataset, get_loader
    from lcpaq.graph import trace
    from lcpaq.models import get_model
    from lcpaq.policy import Policy
    from lcpaq.proxy import PolicyMaker, candidate_configs, proxy_subset
    from lcpaq.search import Budgets
    from lcpaq.sensitivity import estimate_sensitivity

    if data == "mnist5k" and "model" in memo:
        ctx = dict(memo["model"])
    else:
        model, shape = (get_model("mnist_resnet"), (1, 1, 28, 28)) if data == "mnist5k" else (digits_model(seed), (1, 1, 8, 8))
        inv = trace(model, shape, name=f"mnist_resnet@{data}")
        cands = [(w, a) for w in (2, 4, 8) for a in (4, 8)]
        rep = estimate_sensitivity(model, get_loader(data, "train", batch_size=32), candidates=cands, probes=20,
                                   tol=0.2)
        w4 = policy_costs(inv, Policy.uniform(inv.names, 4, 8))  # W4A8-average budget
        budgets = Budgets(max_size_mb=w4.total_size_mb * 1.0001, max_gbops=sum(w4.bops.values()) / 1e9 * 1.0001)
        ctx = {"model": model, "inv": inv, "rep": rep, "budgets": budgets}
        if data == "mnist5k":
            memo["model"] = dict(ctx)
    # The full search selects on one half of the validation split; both sides' choices are
    # reported on the other half (held out from every selection), so the full baseline's winner
    # is not scored on the images it was picked with.
    vds = get_dataset(data, "val")
    sel_idx, test_idx = _stratified_split(vds.tensors[1].numpy(), 0.5, 0)
    ctx.update(data=data, seed=seed, train=get_loader(data, "train", batch_size=64, shuffle=True),
               val=DataLoader(Subset(vds, sel_idx.tolist()), batch_size=500),
               test=DataLoader(Subset(vds, test_idx.tolist()), batch_size=500), n_sel=len(sel_idx), n_test=len(test_idx),
               sub=proxy_subset(get_dataset(data, "train"), fraction=a.fraction, seed=seed),
               configs=candidate_configs(a.trials, seed=0))
    # a fresh PolicyMaker per seed: its solves are timed in step 1 (mnist5k seeds > 0 re-solve too)
    ctx["make"] = PolicyMaker(ctx["inv"], ctx["rep"], budgets=ctx["budgets"])
    return ctx


def timed(ctx: dict, a: argparse.Namespace, memo: dict) -> dict:
    """Steps 1-3, the timings (the caller holds the benchmark lock around them)."""
    from lcpaq.errors import InfeasibleBudgetError, SolverError
    from lcpaq.proxy import ProxyEvaluator, full_score, tune

    model, make, configs = ctx["model"], ctx["make"], ctx["configs"]
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
    def new_evaluator():
        return ProxyEvaluator(model, *ctx["sub"].tensors(), calibration=a.calibration, weights=a.proxy_weights,
                              inventory=ctx["inv"])

    # the whole tune, a fresh evaluator each time, timed --tune-repeats times: once here (cold,
    # kept apart as the first run), then once before each full fine-tune of step 3 (A B A B, so
    # both sides see the same stretch of the shared machine's load), the rest back to back; the
    # ratio uses the median (one ~20 ms run is at the mercy of a load spike)
    tune_runs = []

    def run_tune():
        t0, c0 = time.perf_counter(), _cpu()
        r = tune(model, ctx["inv"], ctx["rep"], new_evaluator(), budgets=ctx["budgets"], configs=configs,
                 maker=make, metric=a.metric)
        tune_runs.append((time.perf_counter() - t0, _cpu() - c0))
        return r

    res = run_tune()
    # the scoring pass below times cold evaluations on an evaluator whose fp32 outputs are built
    # (once per search) but whose ranges and quantized layers are not: each setting pays them
    ev = new_evaluator()

    # 3. every setting scored both ways, interleaved (proxy, full, proxy, full, ...); mnist5k seeds
    #    after the first reuse its full runs (same model and candidates: deterministic per policy)
    rows, t_proxy, t_full, proxy_cache = [], 0.0, 0.0, {}
    c_proxy = c_full = 0.0
    full_cache = memo.setdefault("full", {})
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
        if key not in full_cache and len(tune_runs) < a.tune_repeats:
            run_tune()
        t, c = time.perf_counter(), _cpu()
        if key not in full_cache:
            full_cache[key] = full_score(model, pol, k, ctx["train"], ctx["val"], epochs=a.full_epochs)
        t_full += time.perf_counter() - t
        c_full += _cpu() - c
        s = proxy_cache[key]
        rows.append({"knobs": k.label(), "calib": k.calib_method, "policy": pol.summary(), "margin": s.margin,
                     "kl": s.kl, "proxy_acc": s.acc, "full_acc": full_cache[key]})
    while len(tune_runs) < a.tune_repeats:
        run_tune()
    t_tune = statistics.median(t for t, _ in tune_runs)
    c_tune = statistics.median(c for _, c in tune_runs)
    load_after = open("/proc/loadavg").read().split()[:3]
    timed_full = "full_s" not in memo
    memo.setdefault("full_s", (t_full, c_full))
    t_full, c_full = memo["full_s"]
    return {"res": res, "rows": rows, "unique_evals": len(proxy_cache), "tune_s": t_tune, "proxy_score_s": t_proxy,
            "full_s": t_full, "full_timed_here": timed_full, "policy_s": t_policy,
            "tune_runs_s": [t for t, _ in tune_runs], "tune_cpu_runs_s": [c for _, c in tune_runs],
            "ratio_full_vs_first_tune": t_full / tune_runs[0][0],
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
            "loadavg_timed": [load_before, load_after]}


def finish(ctx: dict, tm: dict, a: argparse.Namespace, memo: dict) -> dict:
    """Step 4 (untimed): the choices fine-tuned with the final recipe, tau, oracle."""
    from scipy.stats import kendalltau

    from lcpaq.finetune import finetune

    model, make, configs, data = ctx["model"], ctx["make"], ctx["configs"], ctx["data"]
    res, ok = tm["res"], [r for r in tm["rows"] if "full_acc" in r]
    full = [r["full_acc"] for r in ok]
    tau = {m: float(kendalltau([r[m] for r in ok], full).statistic) for m in ("margin", "kl", "proxy_acc")}
    best_full = max(ok, key=lambda r: r["full_acc"])  # ties: the first setting in the trial order
    chosen = {"proxy": (res.best.knobs, res.best.policy),
              "full": next((k, make(k)) for k in configs if k.label() == best_full["knobs"])}
    # fine-tunes with the final recipe on the held-out half, mean over --final-seeds seeds (one
    # image is 0.56 pt on digits: a single fine-tune is too noisy to compare two policies at
    # 0.3 pt): each side's choice, and with --oracle every candidate (the best reachable final,
    # and how well each side's scores rank the finals)
    finals = memo.setdefault("final", {})

    def final_of(k, pol):
        key = (pol, k.calib_method)
        if key not in finals:  # deterministic per seed: a policy chosen twice is fine-tuned once
            runs = [finetune(copy.deepcopy(model), pol, ctx["train"], ctx["test"], epochs=a.final_epochs,
                             kd_temp=k.kd_temp, kd_alpha=k.kd_alpha, calib_method=k.calib_method, seed=sd)
                    for sd in range(a.final_seeds)]
            finals[key] = {"fp32": runs[0].fp32_acc, "ptq": runs[0].ptq_acc,
                           "qat": sum(r.qat_acc for r in runs) / len(runs), "qat_per_seed": [r.qat_acc for r in runs]}
        return finals[key]

    final = {side: dict(final_of(k, pol), knobs=k.label(), policy=pol.summary()) for side, (k, pol) in chosen.items()}
    oracle = None
    if data in a.oracle.split(","):
        by_label = {k.label(): k for k in configs}
        for r in ok:
            r["final_qat"] = final_of(by_label[r["knobs"]], make(by_label[r["knobs"]]))["qat"]
        uniq = list({(r["policy"], r["calib"]): r for r in ok}.values())
        fin = [r["final_qat"] for r in uniq]
        oracle = {"best_final": max(fin), "unique": len(uniq),
                  "tau_final": {m: float(kendalltau([r[m] for r in uniq], fin).statistic)
                                for m in ("margin", "kl", "proxy_acc", "full_acc")}}
    out = {k: v for k, v in tm.items() if k != "res"}
    sub = ctx["sub"]
    return out | {
        "data": data, "seed": ctx["seed"], "proxy_share": sub.share, "proxy_samples": len(sub.indices),
        "configs": len(configs), "same_choice": chosen["proxy"][1] == chosen["full"][1]
        and chosen["proxy"][0].calib_method == chosen["full"][0].calib_method,
        "gap_pt": final["proxy"]["qat"] - final["full"]["qat"], "oracle": oracle, "kendall_tau": tau, "final": final,
        "calibration": a.calibration, "proxy_weights": a.proxy_weights, "metric": a.metric,
        "sensitivity_probes": ctx["rep"].probes, "full_epochs": a.full_epochs, "final_epochs": a.final_epochs,
        "final_seeds": a.final_seeds, "select_val_images": ctx["n_sel"], "test_val_images": ctx["n_test"],
        "loadavg_1min": os.getloadavg()[0], "locked": bool(a.lock)}


def summary(runs: list[dict]) -> dict:
    """Per dataset over seeds: mean / worst gap, how often within 0.3 pt, median ratios."""
    import statistics as st

    out = {}
    for d in dict.fromkeys(r["data"] for r in runs):
        rs = [r for r in runs if r["data"] == d]
        timed = [r for r in rs if r["full_timed_here"]]
        gaps = [r["gap_pt"] for r in rs]
        out[d] = {"seeds": [r["seed"] for r in rs], "gap_mean": st.mean(gaps), "gap_min": min(gaps),
                  "within_0.3": sum(abs(g) <= 0.3 + 1e-9 for g in gaps), "proxy_not_worse_0.3": sum(g >= -0.3 - 1e-9 for g in gaps),
                  "proxy_final_mean": st.mean(r["final"]["proxy"]["qat"] for r in rs),
                  "full_final_mean": st.mean(r["final"]["full"]["qat"] for r in rs),
                  "ratio_tune_median": st.median(r["ratio_full_vs_tune"] for r in timed),
                  "ratio_tune_min": min(r["ratio_full_vs_tune"] for r in timed),
                  "ratio_first_tune_median": st.median(r["ratio_full_vs_first_tune"] for r in timed),
                  "ratio_scoring_median": st.median(r["ratio_full_vs_proxy_scoring"] for r in timed),
                  "ratio_with_policies_median": st.median(r["ratio_with_policies"] for r in timed),
                  "cpu_ratio_tune_median": st.median(r["cpu"]["ratio_full_vs_tune"] for r in timed)}
        if all(r["oracle"] for r in rs):
            out[d]["regret_proxy_mean"] = st.mean(r["oracle"]["best_final"] - r["final"]["proxy"]["qat"] for r in rs)
            out[d]["regret_full_mean"] = st.mean(r["oracle"]["best_final"] - r["final"]["full"]["qat"] for r in rs)
            out[d]["tau_final_mean"] = {m: st.mean(r["oracle"]["tau_final"][m] for r in rs)
                                        for m in ("margin", "kl", "proxy_acc", "full_acc")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--datasets", default="digits,mnist5k")
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="digits: model-training seeds (each a new model); mnist5k: proxy-subset seeds")
    ap.add_argument("--mnist-seeds", default="0,1,2", help="seeds for mnist5k (the full baseline is run once)")
    ap.add_argument("--full-epochs", type=int, default=3, help="KD epochs per setting in the full baseline")
    ap.add_argument("--final-seeds", type=int, default=5, help="fine-tune seeds averaged for the final accuracy")
    ap.add_argument("--calibration", default="fp32", help="proxy calibration: fp32 (cached ranges) | sequential")
    ap.add_argument("--proxy-weights", default="maxabs", help="proxy weight quantizer: maxabs | refit")
    ap.add_argument("--metric", default="margin", help="proxy metric the tune ranks by: margin | kl | acc")
    ap.add_argument("--oracle", default="digits",
                    help="datasets whose every candidate is fine-tuned too (best reachable final, tau vs finals)")
    ap.add_argument("--final-epochs", type=int, default=2)
    ap.add_argument("--tune-repeats", type=int, default=9,
                    help="whole proxy tunes timed per seed (fresh evaluator each; one cold, the next interleaved "
                         "with the full fine-tunes); the ratio uses their median")
    ap.add_argument("--fraction", type=float, default=0.04)
    ap.add_argument("--lock", default=None, help="flock this file around the timed steps (e.g. /tmp/lcpaq-bench.lock)")
    ap.add_argument("--out", default="bench_proxy", help="results file stem under benchmarks/results/")
    a = ap.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: list[dict] = []
    jobs = []  # (dataset, context, memo) for every dataset and seed
    for d in a.datasets.split(","):
        memo: dict = {}
        for sd in [int(x) for x in (a.mnist_seeds if d == "mnist5k" else a.seeds).split(",")]:
            # digits: each seed is another model, so the memo (full runs, fine-tunes) is per seed
            m = memo if d == "mnist5k" else {}
            jobs.append((d, prepare(d, sd, a, m), m))
    # the timed steps of every dataset and seed in one hold of the shared benchmark lock (no other
    # benchmark beside them); training, sensitivity and the final fine-tunes run outside it
    lock_f = open(a.lock, "a") if a.lock else None
    if lock_f is not None:
        import fcntl

        fcntl.flock(lock_f, fcntl.LOCK_EX)
        print(f"lock held from {time.strftime('%H:%M:%S')} load {open('/proc/loadavg').read().split()[:3]}")
    try:
        tms = [timed(c, a, m) for _, c, m in jobs]
    finally:
        if lock_f is not None:
            lock_f.close()  # releases the flock
            print(f"lock released {time.strftime('%H:%M:%S')}")
    for (d, c, m), tm in zip(jobs, tms, strict=True):
        r = finish(c, tm, a, m)
        out.append(r)
        (RESULTS / f"{a.out}.json").write_text(json.dumps({"runs": out, "summary": summary(out)}, indent=1,
                                                          default=str))
        print(f"\n== {d} seed {r['seed']}: proxy {100 * r['proxy_share']:.1f}% ({r['proxy_samples']} samples), "
              f"{r['configs']} settings, {r['unique_evals']} unique (policy, calib)")
        for row in r["rows"]:
            print("  ", row)
        print(f"  tau {r['kendall_tau']}  tune {r['tune_s']:.3f}s (runs {[round(t, 4) for t in r['tune_runs_s']]})  "
              f"proxy-scoring {r['proxy_score_s']:.3f}s  "
              f"full {r['full_s']:.1f}s{'' if r['full_timed_here'] else ' (first seed)'}  policies "
              f"{r['policy_s']:.2f}s  ratio full/tune {r['ratio_full_vs_tune']:.0f}x (first run "
              f"{r['ratio_full_vs_first_tune']:.0f}x)  (with policies "
              f"{r['ratio_with_policies']:.0f}x)  full/proxy-scoring {r['ratio_full_vs_proxy_scoring']:.0f}x  "
              f"CPU {r['cpu']['ratio_full_vs_tune']:.0f}x  load {r['loadavg_timed']}")
        for side, f in r["final"].items():
            print(f"  chosen by {side}: {f}")
        print(f"  gap {r['gap_pt']:+.2f} pt  oracle {r['oracle']}")
    summ = summary(out)
    print(json.dumps(summ, indent=1))
    with (RESULTS / f"{a.out}.csv").open("w") as f:
        f.write("data,seed,proxy_share,configs,unique,tau_margin,tau_kl,tau_acc,tune_s,proxy_score_s,full_s,policy_s,"
                "ratio,ratio_first_tune,ratio_with_policies,ratio_scoring,cpu_ratio,final_proxy_qat,final_full_qat,"
                "gap_pt,"
                "oracle_final,fp32,loadavg_before,loadavg_after\n")
        for r in out:
            t, fi = r["kendall_tau"], r["final"]
            f.write(f"{r['data']},{r['seed']},{r['proxy_share']:.4f},{r['configs']},{r['unique_evals']},"
                    f"{t['margin']:.3f},{t['kl']:.3f},{t['proxy_acc']:.3f},{r['tune_s']:.4f},"
                    f"{r['proxy_score_s']:.4f},{r['full_s']:.2f},{r['policy_s']:.3f},{r['ratio_full_vs_tune']:.1f},"
                    f"{r['ratio_full_vs_first_tune']:.1f},"
                    f"{r['ratio_with_policies']:.1f},{r['ratio_full_vs_proxy_scoring']:.1f},"
                    f"{r['cpu']['ratio_full_vs_tune']:.1f},{fi['proxy']['qat']:.2f},{fi['full']['qat']:.2f},"
                    f"{r['gap_pt']:.2f},{(r['oracle'] or {}).get('best_final', float('nan')):.2f},"
                    f"{fi['proxy']['fp32']:.2f},{' '.join(r['loadavg_timed'][0])},{' '.join(r['loadavg_timed'][1])}\n")


if __name__ == "__main__":
    main()
