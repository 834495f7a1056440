"""TVM backend benchmark: a full resnet18 latency table at a MetaSchedule budget, re-profiling from
the kept database, and tuned per-layer latency vs ORT on the dense convs.

    python benchmarks/bench_tvm.py --full            # tune + table + 2 re-profiles + ratios
    python benchmarks/bench_tvm.py --layers 2        # ratios only (tunes what the db lacks)

``--full`` (the issue's "full table" figure, a real run, not an extrapolation):
  1. tune: every unit of the table (resnet18's unique layers x the profile's bit pairs x both
     input forms) is lowered in this process, the unique conv/matmul tasks are collected and the
     ones the database lacks are tuned in one MetaSchedule run (``TvmBackend.tune``);
  2. table: ``lcpaq.profiler.run.profile`` (the product path: isolated worker, resumable table)
     compiles each unique structure with the database applied, keeps the library, times every
     unit. Full-table time = setup + tune + table;
  3. re-profile from the kept libraries: the same ``profile`` into a fresh table;
  4. re-profile from the database alone: the libraries moved aside first (put back afterwards).
Then (always) the ratio phase: for each dense 3x3 conv (``--layers`` of them, default all), the
w8a8 (int8 input) and fp32 (fp32 input) units timed on ORT and TVM interleaved (ORT TVM ORT TVM),
``--rounds`` rounds, fastest round's median, wall clock at 1 thread for both (TVM runs on its own
pool thread, so thread CPU time does not apply to it). Load averages are recorded per phase.

``--predict N`` (issue 8, resnet18 on TVM; run it under ``flock /tmp/lcpaq-bench.lock``): N random
mixed policies (the generator of ``bench_predict.py``: each layer fp32 with p = 0.5, else one of
w2a8/w4a8/w6a8/w8a8, seeds 0..N-1), each exported whole (lcpaq.deploy.qdq) and built whole by TVM
through lcpaq's lowering (``lcpaq.deploy.runtime.deploy_tvm_onnx``, the path of ``lcpaq validate``),
tuned from the kept database (tasks it lacks are tuned first: conv/matmul at the profile's
trials, elementwise epilogues at ``--elementwise-trials``), then measured end to end at 1 thread
(thread CPU time primary, wall beside it), each policy timed against the uniform W8A8 build in
short interleaved chunks (``time_interleaved``; ``--whole-chunk CALLS,SETTLE``, ``--whole-rounds``),
vs the prediction from the TVM table (``--table``, ``lcpaq.profiler.predict.latency_model``, the
path of ``lcpaq predict``). Errors per policy (``lcpaq.profiler.backends.tvm_check``): "table" =
the prediction vs rel x the table's own W8A8 whole-model time (primary where the table has its
``__whole__`` reference rows), "run" = vs rel x this run's median W8A8, "raw" = vs the chunk time
now, and "calibrated" (the table rescaled per class on the uniform fp32 / W8A8 whole models of this
run). ``--reprofile OUT`` first profiles a fresh table into OUT (``lcpaq.profiler.run.profile``, the
path of ``lcpaq profile``) bracketed by the whole-model references, in the same lock hold, and
predicts from it. ``--kernels K`` adds TVM's per-kernel profile of the first K policies and the
references (what the whole build runs vs what the units charge).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

from lcpaq.policy import Policy  # noqa: E402
from lcpaq.profiler.backend import MeasureSettings, Unit, get_backend  # noqa: E402
from lcpaq.profiler.units import build_unit, workload_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
PROFILE = ROOT / "hw_profiles" / "host-cpu-tvm.toml"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def inventory(model: str):
    from lcpaq.graph import trace_named

    return trace_named(model)[1]


def unique_layers(inv):
    seen, uniq = set(), []
    for layer in inv.layers:
        k = workload_key(layer)
        if k not in seen:
            seen.add(k)
            uniq.append(layer)
    return uniq


def full_table(inv, hw, table_dir: Path, model: str, reprofile: bool = True) -> dict:
    """Phases 1-4 of the module doc; returns the figures."""
    from lcpaq.profiler.run import plan_units, profile

    out: dict = {"trials": hw.tvm["trials"], "candidates": [list(c) for c in hw.candidates]}
    t_start = time.perf_counter()
    plan = plan_units(inv, hw.candidates)
    be = get_backend("tvm", hw)
    units = [Unit(key, *build_unit(ly, pair, in_class), bits=pair) for key, ly, pair, in_class in plan]
    out["units"] = len(units)
    out["setup_s"] = round(time.perf_counter() - t_start, 1)
    info = be.tune(units)
    out.update(tune=info, load_after_tune=load())
    print("tuned:", json.dumps(info), "load", load(), flush=True)
    del be, units  # the table runs in profile()'s own worker process, as in `lcpaq profile`

    def table(name: str) -> float:
        path = table_dir / name
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        profile(inv, hw, path)
        dt = time.perf_counter() - t0
        rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        errors = [r["key"] for r in rows if r.get("error")]
        print(f"{name}: {dt:.1f} s, {len(rows)} rows, {len(errors)} errors, load {load()}", flush=True)
        out[name] = {"s": round(dt, 1), "rows": len(rows), "errors": errors[:5], "load_after": load()}
        return dt

    t_table = table(f"{model}.jsonl")
    out["full_table_s"] = round(time.perf_counter() - t_start, 1)
    out["full_table_min"] = round(out["full_table_s"] / 60, 2)
    out["table_s"] = round(t_table, 1)
    if not reprofile:
        return out
    table(f"{model}.reprofile-libs.jsonl")
    libs = Path(hw.tvm["work_dir"]) / "libs"
    aside = libs.with_name("libs.aside")
    shutil.rmtree(aside, ignore_errors=True)
    libs.rename(aside)
    try:
        table(f"{model}.reprofile-db.jsonl")
    finally:
        shutil.rmtree(libs, ignore_errors=True)
        aside.rename(libs)
    return out


def ratios(inv, hw, n_layers: int | None, rounds: int, only: str | None = None) -> list[dict]:
    """Interleaved ORT vs TVM on the dense 3x3 convs (module doc)."""
    import dataclasses

    hw = dataclasses.replace(hw, tvm={**hw.tvm, "flush_weights": False})  # warm vs warm, as ORT is timed
    dense = [ly for ly in unique_layers(inv) if ly.kind == "conv" and ly.groups == 1
             and ly.kernel_size == (3, 3) and ly.in_shape[1] > 3][:n_layers]
    tvm_be, ort_be = get_backend("tvm", hw), get_backend("ort", None)
    units = [(ly, bits, Unit(workload_key(ly), *build_unit(ly, bits, ic), bits=bits))
             for ly in dense for bits, ic in (((8, 8), "int8"), ((32, 32), "fp32"))
             if only in (None, "w8a8" if bits == (8, 8) else "fp32")]
    info = tvm_be.tune([u for _, _, u in units])  # no-op when the database has them all
    st = MeasureSettings(warmup=3, number=5, repeat=7, min_repeat_ms=20, metric="wall")
    rows = []
    for ly, bits, unit in units:
        first = tvm_be.measure(unit, st)  # compiles (or loads the kept library) outside the timing
        if not first.ok:
            print("TVM failed:", first.error, file=sys.stderr)
            continue
        ort_r, tvm_r = [], []
        for _ in range(rounds):
            ort_r.append(ort_be.measure(unit, st).median_ms)
            tvm_r.append(tvm_be.measure(unit, st).median_ms)
        row = {"workload": workload_key(ly), "bits": "w8a8" if bits == (8, 8) else "fp32",
               "ort_ms": min(ort_r), "tvm_ms": min(tvm_r), "tvm_over_ort": min(tvm_r) / min(ort_r),
               "ort_spread": (max(ort_r) - min(ort_r)) / min(ort_r),
               "tvm_spread": (max(tvm_r) - min(tvm_r)) / min(tvm_r), "tvm_kernel": first.kernel,
               "tuned_now_before": info["tuned_now"], "load": load()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


CANDIDATES = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]  # bench_predict.py's


def whole_chunk(text: str | None) -> tuple[int | None, int]:
    """``--whole-chunk CALLS,SETTLE`` -> (calls, settle); ConfigError names the form."""
    from lcpaq.errors import ConfigError

    if text is None:
        return None, 1
    try:
        calls, settle = (int(v) for v in text.split(","))
    except ValueError:
        calls = settle = -1
    if calls < 1 or settle < 0:
        raise ConfigError(f"--whole-chunk {text!r}: give CALLS,SETTLE with CALLS >= 1 and SETTLE >= 0, e.g. 3,1 or 1,0")
    return calls, settle


def predict_bench(hw, model_name: str, table: Path, n_policies: int, kernels: int = 0, *,
                  reprofile: Path | None = None, whole_rounds: int | None = None, calls: int | None = None,
                  settle: int = 1) -> dict:
    """Predicted (TVM table) vs measured (whole TVM build) on random mixed policies (module doc)."""
    import numpy as np
    import torch

    from lcpaq.models import default_input_shape, get_model
    from lcpaq.profiler.backends.tvm_check import (
        REFERENCES,
        build_whole,
        kernel_profile,
        profile_with_references,
        whole_vs_table,
    )
    from lcpaq.profiler.fidelity import random_class_policy
    from lcpaq.quant import quantizable_names

    torch.manual_seed(0)  # resnet18's weights are random: the same model in every run, so a rerun
    # finds its builds (libraries keyed by structure + activation scales) and tuned tasks again
    model = get_model(model_name).eval()
    shape = (1, *default_input_shape(model_name)[1:])
    names = quantizable_names(model)
    pols = {k: random_class_policy(names, np.random.default_rng(k), CANDIDATES) for k in range(n_policies)}
    small = int(np.prod(shape)) < 10_000  # the 0.2 ms embedded model: more calls per sample
    st = MeasureSettings(warmup=3, number=40 if small else 3, repeat=9 if small else 5, threads=1,
                         metric="thread_cpu")
    be = get_backend("tvm", hw)
    say = lambda s: print(s, flush=True)  # noqa: E731
    every = {**{k: Policy.uniform(names, *p) for k, p in REFERENCES.items()}, **pols}
    t0 = time.perf_counter()
    deps, build = build_whole(model, shape, hw, every, backend=be, log=say)
    out: dict = {"build_all_s": round(time.perf_counter() - t0, 1)}
    if reprofile is not None:
        reprofile.unlink(missing_ok=True)
        out["reprofile"] = profile_with_references(inventory(model_name), model, shape, hw, reprofile, deps=deps,
                                                   model_name=model_name, settings=st, log=say)
        table = reprofile
    inter = {k: v for k, v in (("rounds", whole_rounds), ("calls", calls), ("settle", settle)) if v is not None}
    res = whole_vs_table(model, shape, hw, table, pols, settings=st, backend=be, model_name=model_name, deps=deps,
                         interleave=inter, log=say)
    res["build"] = build
    deps = res.pop("deployments")
    out.update(res)
    out.update(model=model_name, table_path=str(table), policies=n_policies, elementwise_trials=be.elementwise_trials,
               tuned_tasks=getattr(be._tuner, "tasks_tuned", 0), tune_s=round(getattr(be._tuner, "tune_s", 0.0), 1))
    if kernels:
        x1 = np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)[:1]
        out["kernels"] = {str(k): kernel_profile(be, deps[k].artifact, x1)
                          for k in ["fp32", "w8a8", *range(min(kernels, n_policies))]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="tune + full table + re-profiles")
    ap.add_argument("--no-reprofile", action="store_true", help="--full without the two re-profile runs")
    ap.add_argument("--profile", default=str(PROFILE), help="device profile (default host-cpu-tvm)")
    ap.add_argument("--model", default="resnet18", help="registered model (resnet18; mnist_resnet for a smoke run)")
    ap.add_argument("--trials", type=int, default=None, help="MetaSchedule trials per task (profile's)")
    ap.add_argument("--layers", type=int, default=None, help="dense convs in the ratio phase (all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", default=None, help="tuning work dir (default: the profile's [tvm] work_dir)")
    ap.add_argument("--tables", default=str(RESULTS / "tvm_tables"), help="where --full writes tables")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--int8-intrin", choices=("auto", "off", "vnni", "avx2"), default=None,
                    help="the tensor-intrinsic int8 conv path (default: the profile's [tvm] int8_intrin)")
    ap.add_argument("--fp32-layout", choices=("nchw", "nchwc"), default=None,
                    help="float conv layout (default: the profile's [tvm] fp32_layout)")
    ap.add_argument("--epilogue", choices=("nchw", "nchwc", "vector"), default=None,
                    help="packed convs' epilogue layout (default: the profile's [tvm] epilogue)")
    ap.add_argument("--target", default=None, help="TVM target string (default: the profile's)")
    ap.add_argument("--bits", default=None, help="ratio phase: only these units, e.g. w8a8 or fp32")
    ap.add_argument("--predict", type=int, default=0, metavar="N",
                    help="issue 8: N random mixed policies built whole by TVM vs the table's prediction")
    ap.add_argument("--table", default=None, help="--predict: the TVM latency table "
                    "(default latency_tables/host-cpu-tvm/<model>.jsonl)")
    ap.add_argument("--elementwise-trials", type=int, default=None,
                    help="trials per elementwise task tuned for the whole builds (profile's, else = trials)")
    ap.add_argument("--kernels", type=int, default=0, help="--predict: per-kernel profile of the first K policies")
    ap.add_argument("--reprofile", default=None, metavar="OUT",
                    help="--predict: first profile a fresh table into OUT, bracketed by whole-model references, "
                    "and predict from it")
    ap.add_argument("--whole-chunk", default=None, metavar="CALLS,SETTLE",
                    help="--predict: timed calls per chunk and untimed calls after each switch (default number,1; "
                    "1,0 = call by call)")
    ap.add_argument("--whole-rounds", type=int, default=None, help="--predict: interleaved rounds (3 x repeat)")
    args = ap.parse_args(argv)
    import dataclasses

    from lcpaq.errors import ConfigError

    try:
        calls, settle = whole_chunk(args.whole_chunk)
    except ConfigError as e:
        ap.error(str(e))  # exit code 2

    from lcpaq.profiler.hwprofile import load_profile

    hw = load_profile(args.profile)
    tvm_cfg = dict(hw.tvm)
    if args.trials is not None:
        tvm_cfg["trials"] = args.trials
    if args.db:
        tvm_cfg["work_dir"] = args.db
    if args.int8_intrin:
        tvm_cfg["int8_intrin"] = args.int8_intrin
    if args.fp32_layout:
        tvm_cfg["fp32_layout"] = args.fp32_layout
    if args.epilogue:
        tvm_cfg["epilogue"] = args.epilogue
    if args.elementwise_trials is not None:
        tvm_cfg["elementwise_trials"] = args.elementwise_trials
    if tvm_cfg.get("work_dir"):
        tvm_cfg["work_dir"] = str((ROOT / tvm_cfg["work_dir"]).resolve())
    hw = dataclasses.replace(hw, tvm=tvm_cfg, target=args.target or hw.target)
    inv = inventory(args.model)
    res: dict = {"load_start": load(), "profile": str(args.profile), "work_dir": tvm_cfg.get("work_dir"),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": os.cpu_count()}
    if args.predict:
        table = Path(args.table) if args.table else ROOT / "latency_tables" / "host-cpu-tvm" / f"{args.model}.jsonl"
        res["predict"] = p = predict_bench(hw, args.model, table, args.predict, args.kernels,
                                           reprofile=Path(args.reprofile) if args.reprofile else None,
                                           whole_rounds=args.whole_rounds, calls=calls, settle=settle)
        res["load_end"] = load()
        print(f"{args.model} on TVM, {args.predict} policies, 1 thread (thread CPU), load "
              f"{p['load_timing_start']:.2f}-{p['load_timing_end']:.2f}; primary = {p['primary']}")
        for col in ("table", "run", "raw", "calibrated", "wall"):
            if col in p:
                print(f"  {col:10s} median |err| {p[col]['median_abs']:5.2f} %, max {p[col]['max_abs']:5.2f} %, "
                      f"within 5 %: {p[col]['within_5pct']}/{args.predict}, mean {p[col]['mean']:+.2f} %")
        name = f"bench_tvm_predict_{args.model}{args.tag}.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(json.dumps(res, indent=1, default=str))
        print("wrote", RESULTS / name)
        return 0
    if args.full:
        Path(args.tables).mkdir(parents=True, exist_ok=True)
        res["full"] = full_table(inv, hw, Path(args.tables), args.model, not args.no_reprofile)
    from lcpaq.profiler.backends.tvm import parse_target

    res["target"] = parse_target(hw.target)
    res["int8_intrin"] = tvm_cfg.get("int8_intrin", "auto")
    res["fp32_layout"] = tvm_cfg.get("fp32_layout", "nchw")
    res["epilogue"] = tvm_cfg.get("epilogue", "nchw")
    res["ratios"] = ratios(inv, hw, args.layers, args.rounds, args.bits)
    res["load_end"] = load()
    print(f"{'workload':58s} {'bits':5s} {'ORT ms':>8s} {'TVM ms':>8s} {'TVM/ORT':>8s}")
    for r in res["ratios"]:
        print(f"{r['workload']:58s} {r['bits']:5s} {r['ort_ms']:8.3f} {r['tvm_ms']:8.3f} {r['tvm_over_ort']:8.2f}")
    if "full" in res:
        f = res["full"]
        print(f"full table: {f['full_table_min']} min (setup {f['setup_s']} s, tune {f['tune']['tune_s']} s "
              f"for {f['tune']['tuned_now']}/{f['tune']['tasks']} tasks, table {f['table_s']} s, {f['units']} units)")
        if not args.no_reprofile:
            print(f"re-profile: kept libs {f[args.model + '.reprofile-libs.jsonl']['s']} s, "
                  f"database only {f[args.model + '.reprofile-db.jsonl']['s']} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"bench_tvm_{args.model}_{'full_' if args.full else ''}t{tvm_cfg.get('trials', 0)}{args.tag}.json"
    (RESULTS / name).write_text(json.dumps(res, indent=1))
    print("wrote", RESULTS / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
