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
(thread CPU time primary, wall beside it), each policy interleaved with the uniform W8A8 reference
(ref pol ref pol, fastest of the rounds), vs the prediction from the TVM table (``--table``,
``lcpaq.profiler.predict.latency_model``, the path of ``lcpaq predict``). Errors per policy: raw
(the table as is), and calibrated (the table rescaled per class on the uniform fp32 / W8A8 whole
models measured in the same run, ``calibrate_to_references``, with the reference drift of each
policy's rounds divided out). ``--kernels K`` adds TVM's per-kernel profile of the first K
policies and the references (what the whole build runs vs what the units charge).
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


def predict_bench(hw, model_name: str, table: Path, n_policies: int, rounds: int = 2,
                  kernels: int = 0) -> dict:
    """Predicted (TVM table) vs measured (whole TVM build) on random mixed policies (module doc)."""
    import copy

    import numpy as np
    import torch

    from lcpaq.deploy.qdq import export_qdq
    from lcpaq.deploy.runtime import check_outputs, deploy_tvm_onnx
    from lcpaq.graph import trace
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.backends.ort import time_callable
    from lcpaq.profiler.fidelity import calibrate_to_references, random_class_policy
    from lcpaq.profiler.predict import latency_model
    from lcpaq.quant import apply_policy, quantizable_names

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model = get_model(model_name).eval()
    shape = (1, *default_input_shape(model_name)[1:])
    names = quantizable_names(model)
    lm = latency_model(table, trace(model, shape, name=model_name), CANDIDATES)
    x = np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    be = get_backend("tvm", hw)
    pols = {"fp32": Policy.uniform(names, 32, 32), "w8a8": Policy.uniform(names, 8, 8)}
    pols.update({k: random_class_policy(names, np.random.default_rng(k), CANDIDATES) for k in range(n_policies)})
    deps, build = {}, {}
    for k, pol in pols.items():  # export, lower, tune what the database lacks, compile (or load the kept build)
        t0 = time.perf_counter()
        fq = apply_policy(copy.deepcopy(model), pol, calib_loader=[torch.from_numpy(x)], calib_batches=1).eval()
        dep = deploy_tvm_onnx(export_qdq(fq, shape, calib_inputs=[x], dynamic_batch=False), x[:1], hw, backend=be)
        chk = check_outputs(dep, fq, x[:2])
        deps[k] = dep
        build[k] = {"s": round(time.perf_counter() - t0, 1), "max_abs_err": chk["max_abs_err"],
                    "top1_agreement": chk["top1_agreement"], "notes": dep.notes, "load": load()}
        print(f"built {k}: {build[k]['s']} s, |out - fake-quant| {chk['max_abs_err']:.3g}, load {load()}",
              flush=True)
    t_build = time.perf_counter() - t_start
    small = model_name == "mnist_resnet" or int(np.prod(shape)) < 10_000
    st = MeasureSettings(warmup=3, number=40 if small else 3, repeat=9 if small else 5, threads=1,
                         metric="thread_cpu")

    def timed(k) -> tuple[float, float]:
        cpu, wall = time_callable(deps[k].call, st)
        return float(np.median(cpu)), float(np.median(wall))

    load0, t1 = load(), time.perf_counter()
    ref = {k: min(timed(k) for _ in range(rounds)) for k in ("fp32", "w8a8", "fp32", "w8a8")}  # A B A B
    rows = []
    for k in range(n_policies):
        pol_ms, ref_ms = [], []
        for _ in range(rounds):  # ref pol ref pol
            ref_ms.append(timed("w8a8"))
            pol_ms.append(timed(k))
        meas, wall = min(pol_ms)
        rows.append({"policy": k, "measured_ms": meas, "measured_wall_ms": wall, "ref_ms": min(ref_ms)[0],
                     "fp32_layers": sum(1 for n in names if pols[k][n] == (32, 32)), "layers": len(names)})
    ref_end = {k: min(timed(k) for _ in range(rounds)) for k in ("fp32", "w8a8")}
    load1, t_time = load(), time.perf_counter() - t1
    ref0 = {(32, 32): ref["fp32"][0], (8, 8): ref["w8a8"][0]}
    cal = calibrate_to_references(lm, ref0)
    for r in rows:
        pol = pols[r["policy"]]
        drift = r["ref_ms"] / ref0[(8, 8)]
        pred, pred_cal = lm.predict(pol), cal.predict(pol) * drift
        r.update(predicted_ms=pred, error_pct=100 * (pred / r["measured_ms"] - 1),
                 error_wall_pct=100 * (pred / r["measured_wall_ms"] - 1), drift=drift,
                 predicted_calibrated_ms=pred_cal, error_calibrated_pct=100 * (pred_cal / r["measured_ms"] - 1))
        print(f"#{r['policy']:2d} fp32 {r['fp32_layers']:2d}/{r['layers']} meas {r['measured_ms']:7.3f} "
              f"(wall {r['measured_wall_ms']:7.3f}) pred {pred:7.3f} err {r['error_pct']:+6.1f}% "
              f"calibrated {r['error_calibrated_pct']:+6.1f}% drift {drift:.3f}", flush=True)

    def stats(col: str) -> dict:
        e = [abs(r[col]) for r in rows]
        return {"median_abs": float(np.median(e)), "max_abs": max(e), "within_5pct": sum(v <= 5 for v in e),
                "mean": float(np.mean([r[col] for r in rows]))}

    uni = {k: {"measured_ms": ref[k][0], "measured_wall_ms": ref[k][1], "end_ms": ref_end[k][0],
               "predicted_ms": lm.predict(pols[k])} for k in ("fp32", "w8a8")}
    out = {"model": model_name, "table": str(table), "policies": n_policies, "rounds": rounds,
           "settings": {"warmup": st.warmup, "number": st.number, "repeat": st.repeat, "metric": st.metric},
           "uniform": uni, "raw": stats("error_pct"), "wall": stats("error_wall_pct"),
           "calibrated": stats("error_calibrated_pct"), "build_s": round(t_build, 1), "timing_s": round(t_time, 1),
           "load_timing_start": load0, "load_timing_end": load1, "build": build, "rows": rows,
           "elementwise_trials": be.elementwise_trials, "tuned_tasks": getattr(be._tuner, "tasks_tuned", 0),
           "tune_s": round(getattr(be._tuner, "tune_s", 0.0), 1)}
    if kernels:
        out["kernels"] = {str(k): kernel_profile(be, deps[k].artifact, x[:1])
                          for k in ["fp32", "w8a8", *range(min(kernels, n_policies))]}
    return out


def kernel_profile(be, onnx_bytes: bytes, x1, runs: int = 5) -> dict[str, float]:
    """Per-kernel thread-CPU us of one inference, by kernel name (median of ``runs``): the Relax
    VM's instrument hook around every call instruction (a few us of Python per call included)."""
    import numpy as np
    import tvm
    from tvm import relax

    ex, _, params, _ = be.compile(Unit("deploy:whole-model", onnx_bytes, {"x": x1}, {}, (8, 8)))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = be._args(Unit("p", onnx_bytes, {"x": x1}), params, dev)
    tot: dict[str, float] = {}
    start: dict[str, int] = {}

    def instrument(func, name, before, ret, *a):  # noqa: ARG001 - the VM's callback signature
        if before:
            start[str(name)] = time.thread_time_ns()
        else:
            tot[str(name)] = tot.get(str(name), 0.0) + (time.thread_time_ns() - start.pop(str(name))) / 1e3
        return 0

    vm.set_instrument(instrument)
    per: dict[str, list[float]] = {}
    for _ in range(runs + 1):
        tot.clear()
        vm["main"](*args)
        for k, v in tot.items():
            per.setdefault(k, []).append(v)
    return {k: float(np.median(v[1:])) for k, v in sorted(per.items(), key=lambda kv: -np.median(kv[1][1:]))}


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
    ap.add_argument("--epilogue", choices=("nchw", "nchwc"), default=None,
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
    args = ap.parse_args(argv)
    import dataclasses

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
        res["predict"] = p = predict_bench(hw, args.model, table, args.predict, args.rounds, args.kernels)
        res["load_end"] = load()
        print(f"{args.model} on TVM, {args.predict} policies, 1 thread (thread CPU): median |err| "
              f"{p['raw']['median_abs']:.2f} %, max {p['raw']['max_abs']:.2f} %, within 5 %: "
              f"{p['raw']['within_5pct']}/{args.predict}; calibrated on the uniform references: median "
              f"{p['calibrated']['median_abs']:.2f} %, max {p['calibrated']['max_abs']:.2f} % "
              f"({p['calibrated']['within_5pct']}/{args.predict}); load {p['load_timing_start']}-{p['load_timing_end']}")
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
