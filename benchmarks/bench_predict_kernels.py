"""Prediction fidelity on lcpaq's kernels: 20 random mixed policies per model, predicted vs measured.

For each model (the embedded mnist_resnet, resnet18 with random weights, ``torch.manual_seed(0)``)
and each predictor variant:

* ``segments``  (session 7, what ``lcpaq demo`` uses): segment units cut from the converted model
  and timed in its own sequence, keyed by the fusion partners' class, plus a correction fitted on
  the profiled policies' whole-model times (lcpaq.profiler.backends.kernels_check.profile_segments);
  the deployment is ``lcpaq.kernels.convert`` as it is now (float convs channels_last).
* ``segments-nchw``: the same predictor on the deployment before session 7 (float convs in their
  input's layout: ``convert(channels_last=False)``).
* ``table``     (the demo before session 7): the per-layer ``lcpaq-kernels`` table (each layer's
  kernel timed alone, lcpaq.profiler.backends.kernels), calibrated on uniform fp32 / W8A8
  whole-model times (lcpaq.profiler.fidelity.calibrate_to_references), on the pre-session-7
  deployment.

Test policies: seeds 0..19, each layer fp32 with p = 0.5 else w2a8/w4a8/w8a8 at random. Each is
converted and timed end to end against uniform W8A8 (``--rounds`` x repeat interleaved chunks), 1 thread,
the calling thread's CPU time (wall beside); ``--settle`` (default 2) untimed calls after each switch,
in the profile's whole rows and in the test rows alike. Scoring: ``rel`` (primary, session 7) compares with
the policy's measured ratio to the reference, interleaved in short chunks
(``lcpaq.profiler.backends.ort.time_interleaved``), times the reference's time when the table was
made; ``drift`` rescales the prediction by the reference's drift since the table was made (running
median of 7 neighbouring policies' reference readings), ``row_drift`` by the policy's own reference
reading, ``no_drift`` not at all.

The script takes the shared bench lock (/tmp/lcpaq-bench.lock) itself, one hold per model and
variant (profile + test policies: ~10 s for mnist_resnet, ~1-2 min for resnet18).

    python benchmarks/bench_predict_kernels.py
    python benchmarks/bench_predict_kernels.py --models mnist_resnet --variants segments --policies 5
    python benchmarks/bench_predict_kernels.py --rescore   # refit the saved segment tables with every
                                                           # correction, re-score the saved test rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CANDIDATES = ((2, 8), (4, 8), (8, 8), (32, 32))
VARIANTS = ("segments", "segments-nchw", "table")


def steady_malloc() -> bool:
    """glibc's mmap/trim thresholds at 256 MiB (benchmarks/bench_kernels.py): freed memory stays in
    the heap, so a call's output does not land on fresh pages whose faults depend on what ran before."""
    from bench_kernels import steady_malloc as steady

    return steady()


def bench_lock():
    """The shared timing lock (benchmarks/_lock.py)."""
    from _lock import bench_lock as lock

    return lock(indent="  ")


def settings_for(model_name: str):
    """The embedded model is ~0.3 ms: more calls per sample; resnet18 ~15 ms: one call per sample."""
    from lcpaq.profiler.backend import MeasureSettings

    if model_name == "mnist_resnet":
        return MeasureSettings(warmup=3, number=5, repeat=15)
    return MeasureSettings(warmup=2, number=1, repeat=11)


def shape_of(model_name: str) -> tuple[int, ...]:
    from lcpaq.models import default_input_shape

    return (1, *default_input_shape(model_name)[1:])


def table_model(model, name: str, shape, st, out: Path, channels_last: bool):
    """The pre-session-7 demo predictor: per-layer kernels table calibrated on uniform fp32 / W8A8
    whole models (measured here, A B against each other), and the reference's time."""
    from lcpaq.graph import trace
    from lcpaq.policy import Policy
    from lcpaq.profiler.backends.kernels_check import deploy_policy, time_whole
    from lcpaq.profiler.fidelity import calibrate_to_references
    from lcpaq.profiler.hwprofile import load_profile
    from lcpaq.profiler.predict import latency_model
    from lcpaq.profiler.run import profile
    from lcpaq.quant import quantizable_names

    inv = trace(model, shape, name=name)
    hw = load_profile(ROOT / "hw_profiles" / "host-cpu-kernels.toml")
    hw = dataclasses.replace(hw, candidates=CANDIDATES)
    if out.exists():
        out.unlink()
    profile(inv, hw, out, candidates=CANDIDATES)
    raw = latency_model(out, inv, CANDIDATES)
    layers = quantizable_names(model)
    cal = [np.random.default_rng(1).standard_normal((4, *shape[1:])).astype(np.float32)]
    fp = deploy_policy(model, Policy.uniform(layers, 32, 32), shape, cal, layers, channels_last=channels_last)
    w8 = deploy_policy(model, Policy.uniform(layers, 8, 8), shape, cal, layers, channels_last=channels_last)
    (fp_ms, _), (w8_ms, _) = time_whole([fp.call, w8.call], st, rounds=3)
    lm = calibrate_to_references(raw, {(32, 32): fp_ms, (8, 8): w8_ms})
    return lm, raw, w8_ms, {"fp32_ref_ms": fp_ms, "w8a8_ref_ms": w8_ms}


def run_variant(name: str, variant: str, n_pol: int, rounds: int, extra: int, repeat: int = 0, tag: str = "",
                cover: int = 3, settle: int = 2, shared_ref: bool = True) -> dict:
    import torch

    from lcpaq.models import get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.backends.kernels_check import (
        check_policies,
        deploy_policy,
        profile_segments,
        random_policies,
        summarize,
    )
    from lcpaq.quant import quantizable_names

    torch.manual_seed(0)
    model = get_model(name).eval()
    shape = shape_of(name)
    st = settings_for(name)
    if repeat:
        st = dataclasses.replace(st, repeat=repeat)
    cl = variant == "segments"
    layers = quantizable_names(model)
    tests = random_policies(layers, CANDIDATES, n_pol)
    cal = [np.random.default_rng(1).standard_normal((4, *shape[1:])).astype(np.float32)]
    ref = None  # one uniform-W8A8 deployment for the profile's and the test rows
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    info: dict = {}
    with bench_lock():
        load0 = os.getloadavg()
        if variant == "table":
            lm, raw, ref_ms, info = table_model(model, name, shape, st,
                                                RESULTS / f"bench_predict_kernels_table_{name}{tag}.jsonl",
                                                channels_last=False)
            info["raw_predict"] = True
        else:
            ref = deploy_policy(model, Policy.uniform(layers, 8, 8), shape, cal, layers, channels_last=cl)
            table, lm = profile_segments(model, shape, CANDIDATES, settings=st, calib=cal, extra=extra, cover=cover,
                                         channels_last=cl, settle=settle, reference=ref)
            ref = ref if shared_ref else None  # else check_policies converts its own (session 7)
            table.save(RESULTS / f"bench_predict_kernels_segments_{name}{'' if cl else '_nchw'}{tag}.json")
            ref_ms = float(np.median([r["ref_ms"] for r in table.rows]))
            raw = None
            info = {"fit": dict(lm.meta), "profiled_policies": len(table.rows)}
        t_prof = time.perf_counter() - t0
        rows = check_policies(model, shape, tests, lm.predict, settings=st, ref_ms=ref_ms, rounds=rounds,
                              channels_last=cl, calib=cal, settle=settle, reference=ref)
        load1 = os.getloadavg()
    if raw is not None:  # the uncalibrated per-layer table beside it
        for r, pol in zip(rows, tests, strict=True):
            r["raw_table_ms"] = raw.predict(pol)
            r["error_raw_table_pct"] = (raw.predict(pol) - r["measured_ms"]) / r["measured_ms"] * 100
    summ = {"model": name, "variant": variant, "rel": summarize(rows, "error_pct"),
            "drift": summarize(rows, "error_drift_pct"),
            "row_drift": summarize(rows, "error_row_pct"), "no_drift": summarize(rows, "error_raw_pct"), "load_start": load0, "load_end": load1,
            "profile_s": t_prof, "total_s": time.perf_counter() - t0, "settings": dataclasses.asdict(st),
            "rounds": rounds, "settle": settle, "shared_reference": shared_ref, "measured_ms_range": [min(r["measured_ms"] for r in rows),
                                                     max(r["measured_ms"] for r in rows)], **info}
    if raw is not None:
        summ["raw_table"] = summarize(rows, "error_raw_table_pct")
    return {"summary": summ, "rows": rows}


def rescore(models: list[str], variants: list[str], tag: str) -> int:
    """Refit each saved segment table with every correction; score the saved test measurements."""
    from lcpaq.policy import Policy
    from lcpaq.profiler.backends.kernels_check import SegmentTable, fit_segment_model, summarize

    print(" model         variant        correction  drift: med / max / ±5%    no drift: med / max")
    for name in models:
        for v in [v for v in variants if v != "table"]:
            res = RESULTS / f"bench_predict_kernels_{name}_{v}{tag}.json"
            tab = RESULTS / f"bench_predict_kernels_segments_{name}{'' if v == 'segments' else '_nchw'}{tag}.json"
            if not (res.exists() and tab.exists()):
                continue
            rows, t = json.loads(res.read_text())["rows"], SegmentTable.load(tab)
            for corr in ("none", "const", "trans", "scale", "split", "auto"):
                lm = fit_segment_model(t, CANDIDATES, correction=corr)
                scored = []
                ref0 = float(np.median([q["ref_ms"] for q in t.rows]))
                for r in rows:
                    p = lm.predict(Policy({n: tuple(b) for n, b in r["policy"].items()}))
                    m = r["measured_ms"]
                    if "rel" in r:  # measured against the interleaved reference: its ratio at table time
                        m, r = r["rel"] * ref0, {**r, "drift": 1.0}
                    scored.append({"d": (p * r["drift"] - m) / m * 100, "r": (p - m) / m * 100})
                d, n = summarize(scored, "d"), summarize(scored, "r")
                print(f" {name:13s} {v:14s} {corr + ('=' + lm.meta['correction'] if corr == 'auto' else ''):11s} "
                      f"{d['median_abs_pct']:6.2f}% {d['max_abs_pct']:6.2f}% {d['within_5']:3d}/{d['n']}   "
                      f"{n['median_abs_pct']:6.2f}% {n['max_abs_pct']:6.2f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist_resnet,resnet18")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--policies", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="test policies: rounds x repeat interleaved chunks against the reference")
    ap.add_argument("--extra", type=int, default=12, help="random policies profiled beyond the designed ones")
    ap.add_argument("--cover", type=int, default=3,
                    help="each segment key in at least this many designed policies (runs 1-4 of session 7: 1)")
    ap.add_argument("--repeat", type=int, default=0, help="samples per timing (default: 15 mnist_resnet, 11 resnet18)")
    ap.add_argument("--settle", type=int, default=2,
                    help="untimed calls after each switch between policy and reference in the whole rows "
                         "(session 7: 1)")
    ap.add_argument("--reference", choices=("shared", "own"), default="shared",
                    help="test rows against the profile's W8A8 deployment (shared) or a new conversion (own; session 7)")
    ap.add_argument("--malloc", choices=("default", "steady"), default="default",
                    help="steady: glibc keeps freed memory (mmap/trim thresholds 256 MiB), as bench_kernels.py")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--rescore", action="store_true", help="no timing: refit saved tables, re-score saved rows")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    problems = [f"unknown variant(s) {', '.join(bad)} (use {', '.join(VARIANTS)})"] if bad else []
    problems += ["--policies and --rounds must be >= 1"] if args.policies < 1 or args.rounds < 1 else []
    problems += ["--repeat must be >= 0 (0: the model's default)"] if args.repeat < 0 else []
    problems += ["--cover must be >= 1"] if args.cover < 1 else []
    problems += ["--settle must be >= 0"] if args.settle < 0 else []
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.rescore:
        return rescore([m for m in args.models.split(",") if m], variants, args.tag)
    import torch

    torch.set_num_threads(1)
    malloc_steady = args.malloc == "steady" and steady_malloc()
    print(f"malloc: {args.malloc} ({'set' if malloc_steady else 'glibc defaults'})", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in [m for m in args.models.split(",") if m]:
        for v in variants:
            print(f"{name} / {v} ...", flush=True)
            res = run_variant(name, v, args.policies, args.rounds, args.extra, args.repeat, args.tag, args.cover,
                              args.settle, args.reference == "shared")
            res["summary"]["malloc"] = "steady" if malloc_steady else "default"
            path = RESULTS / f"bench_predict_kernels_{name}_{v}{args.tag}.json"
            path.write_text(json.dumps(res, indent=1, default=float) + "\n")
            s = res["summary"]
            first = len(lines)
            for key in ("rel", "drift", "row_drift", "no_drift", "raw_table"):
                if key in s:
                    d = s[key]
                    lines.append(f" {name:13s} {v:14s} {key:9s} {d['median_abs_pct']:7.2f}% {d['max_abs_pct']:7.2f}% "
                                 f"{d['within_5']:3d}/{d['n']}  {d['median_signed_pct']:+7.2f}%  "
                                 f"{s['load_start'][0]:.2f}->{s['load_end'][0]:.2f}  {s['total_s']:.0f}s")
            print("\n".join(lines[first:]), flush=True)
    print("\n model         variant        scoring   med|err|  max|err|  ±5%   med err   load(1m)   time")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
