"""Prediction fidelity on ORT: 20 random mixed policies per model, predicted vs measured end to end.

For each model: cut units from the mixed QDQ graphs of a few *training* policies (uniform fp32,
uniform W8A8 and K random class mixes; lcpaq.profiler.fidelity), fit the additive LatencyModel
(unary + pairwise transition costs), calibrate its per-unit isolation overhead on the two uniform
whole-model references measured in the same run, then draw 20 *test* policies (other seeds, each
layer fp32 with p=0.5 else one of w2a8/w4a8/w6a8/w8a8), export each whole model with
export_qdq and measure it (same settings, same run). Reports per policy the % error, median and max.

1 intra-op thread uses the calling thread's CPU time (FINDINGS: stable); 2 threads use wall time.

    python benchmarks/bench_predict.py                       # all models, 1 then 2 threads
    python benchmarks/bench_predict.py --models resnet18 --threads 1 --policies 5
    python benchmarks/bench_predict.py --method blocks --threads 1,2   # block units (the best, session 5)
    python benchmarks/bench_predict.py --method blocks --rescore       # refit saved block tables
    python benchmarks/bench_predict.py --method blocks --pairs --threads 1,2c   # + block pairs; 2 threads
                                                                # on summed CPU time, spinning off

``--method blocks`` takes the shared bench lock (/tmp/lcpaq-bench.lock) itself, around the timing
only; ``cut`` and ``whole`` time everything and must run under ``flock /tmp/lcpaq-bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("const", "count", "size", "both", "edge", "weights", "count+weights", "both+weights")



def _settings(model_name: str, threads: int | str):
    """Frozen measurement settings: the 0.2 ms embedded model needs more calls per round; 1 thread
    times the calling thread's CPU, N threads wall time, "Nc" N threads with ORT's spin-waiting off
    and the whole process's CPU time (every worker summed; blocks.process_cpu_ms)."""
    from lcpaq.profiler.backend import MeasureSettings

    small = model_name == "mnist_resnet"
    tok = str(threads)
    n = int(tok.rstrip("c"))
    metric = "process_cpu" if tok.endswith("c") else "thread_cpu" if n == 1 else "wall"
    return MeasureSettings(warmup=3, number=40 if small else 3, repeat=9 if small else 5, threads=n,
                           metric=metric)


def _cached_export(cache: Path | None, model_name: str, model, pol, shape, x) -> bytes:
    """export_qdq(..., unshare=True), kept on disk by (model, policy): the ~200 exports of a model
    take 5-10 min and are the same in every run (fixed calibration input, deterministic exporter)."""
    import hashlib

    from lcpaq.profiler.onnx_export import export_qdq

    if cache is None:
        return export_qdq(model, pol, shape, calib=[x], unshare=True)
    key = hashlib.sha256(json.dumps(sorted((n, list(v)) for n, v in pol.items())).encode()).hexdigest()[:24]
    f = cache / model_name / f"{key}.onnx"
    if f.exists():
        return f.read_bytes()
    b = export_qdq(model, pol, shape, calib=[x], unshare=True)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_bytes(b)
    tmp.replace(f)
    return b

def _whole_chunk(spec: str) -> dict[str, int]:
    """``--whole-chunk CALLS,SETTLE`` -> OrtTimer.whole_row keywords."""
    if not spec:
        return {}
    try:
        calls, settle = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--whole-chunk wants CALLS,SETTLE (e.g. 3,1 or 1,0), got {spec!r}") from None
    return {"calls": calls, "settle": settle}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,mnist_resnet")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", type=int, default=20)
    ap.add_argument("--train", type=int, default=6)
    ap.add_argument("--whole", type=int, default=1000,
                    help="blocks: designed policies also timed whole, to fit the isolation correction (default all)")
    ap.add_argument("--retest", type=int, default=0,
                    help="blocks: time the saved test policies N more times (noise floor), score against the mean")
    ap.add_argument("--cache", default="/tmp/lcpaq_bench_exports",
                    help="blocks: folder keeping the exported policies between runs ('' for none)")
    ap.add_argument("--whole-chunk", default="",
                    help="blocks: CALLS,SETTLE of OrtTimer.whole_row (timed calls per chunk, untimed calls "
                         "after each switch; '' = its defaults: number,1; '1,0' = call by call)")
    ap.add_argument("--unit-passes", type=int, default=3,
                    help="blocks: time every unit this many times, in passes over all units; median")
    ap.add_argument("--pairs", action="store_true",
                    help="blocks: also cut and time every boundary's two blocks as one unit (lcpaq.profiler.pairs)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="blocks: statistic of the timing samples (min: the least disturbed sample)")
    ap.add_argument("--flush-mb", default="0",
                    help="blocks: comma list of cold-cache sizes in MB (OrtTimer(flush_bytes=)): each unit call "
                         "is preceded by a read through that many MB; 0 = warm (default). Every size times the "
                         "units in the same lock hold against the same whole rows; sizes > 0 add _flush<N>mb "
                         "to the result files")
    ap.add_argument("--tag", default="", help="blocks: suffix of the result files (e.g. _min)")
    ap.add_argument("--rescore", action="store_true",
                    help="blocks: refit the saved block tables and re-score the saved test measurements")
    ap.add_argument("--method", choices=["cut", "whole", "blocks"], default="cut",
                    help="cut: cut-unit context table (default); whole: additive model fitted on whole-model "
                         "times of uniform + single-flip + --train random policies (fidelity.profile_whole)")
    ap.add_argument("--compare-tables", action="store_true",
                    help="only re-score saved results with the per-layer tables in latency_tables/host-cpu-ort")
    ap.add_argument("--backend", choices=["ort", "tvm"], default="ort",
                    help="tvm: the first of --models built whole by TVM vs its TVM table, same policy generator "
                         "(benchmarks/bench_tvm.py --predict; run under flock /tmp/lcpaq-bench.lock)")
    args = ap.parse_args(argv)
    if args.backend == "tvm":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_tvm

        return bench_tvm.main(["--predict", str(args.policies), "--model", args.models.split(",")[0]])
    if args.compare_tables:
        return compare_tables(args)
    if args.method == "whole":
        return bench_whole(args)
    if args.method == "blocks":
        return retest_blocks(args) if args.retest else bench_blocks(args)

    import torch

    torch.set_num_threads(1)
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.backend import Unit
    from lcpaq.profiler.backends.ort import OrtBackend
    from lcpaq.profiler.fidelity import (
        ContextTable,
        calibrate_to_references,
        cut_units,
        fit_latency_model,
        predict_hybrid,
        random_class_policy,
    )
    from lcpaq.profiler.onnx_export import export_qdq, quantizable_names
    from lcpaq.profiler.units import overhead_unit

    cands = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]
    be = OrtBackend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for model_name in args.models.split(","):
            t0 = time.perf_counter()
            st = _settings(model_name, threads)
            model = get_model(model_name)
            names = quantizable_names(model)
            shape = default_input_shape(model_name)
            x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

            def timed(onnx_bytes: bytes, feeds, st=st) -> float:
                m = be.measure(Unit("b", onnx_bytes, feeds), st)
                if m.error:
                    raise RuntimeError(m.error)
                return m.median_ms

            ov = timed(*overhead_unit())
            ct = ContextTable()
            rng = np.random.default_rng(1000)
            train = [Policy.uniform(names, 32, 32), Policy.uniform(names, 8, 8)]
            train += [random_class_policy(names, rng, cands) for _ in range(args.train)]
            refs = {}
            for i, pol in enumerate(train):
                b = export_qdq(model, pol, shape, calib=[x])
                ct.add(cut_units(b, model, pol), pol, lambda u, timed=timed, ov=ov: timed(u.onnx, u.feeds) - ov)
                if i < 2:
                    refs[tuple(pol[names[0]])] = min(timed(b, {"input": x}) for _ in range(2))
            t_table = time.perf_counter() - t0
            raw = fit_latency_model(ct, cands)
            lm = calibrate_to_references(raw, refs)
            lm_half = calibrate_to_references(raw, refs, share=0.5)
            rows: list[dict] = []
            ref_b = export_qdq(model, train[1], shape, calib=[x])
            for k in range(args.policies):
                pol = random_class_policy(names, np.random.default_rng(k), cands)
                b = export_qdq(model, pol, shape, calib=[x])
                units = cut_units(b, model, pol)
                # A B A B: the policy and the uniform int8 reference, interleaved; fastest round kept.
                # The reference re-measured now vs. at table time rescales the prediction (drift).
                ms_pol, ms_ref = [], []
                for _ in range(2):
                    ms_ref.append(timed(ref_b, {"input": x}))
                    ms_pol.append(timed(b, {"input": x}))
                meas = min(ms_pol)
                drift = min(ms_ref) / refs[(8, 8)]
                pred, pred_raw = lm.predict(pol) * drift, raw.predict(pol) * drift
                miss = sum(1 for u in units.values() if u.key not in ct.ms)
                hyb = predict_hybrid(ct, lm, units, pol) * drift
                row = {
                    "threads": threads, "model": model_name, "policy": k,
                    "fp32_layers": sum(1 for n in names if pol[n] == (32, 32)), "layers": len(names),
                    "measured_ms": meas, "predicted_ms": pred, "error_pct": 100 * (pred / meas - 1),
                    "predicted_uncalibrated_ms": pred_raw, "error_uncalibrated_pct": 100 * (pred_raw / meas - 1),
                    "error_edge_share_pct": 100 * (lm_half.predict(pol) * drift / meas - 1),
                    "drift": drift,
                    "predicted_hybrid_ms": hyb, "error_hybrid_pct": 100 * (hyb / meas - 1), "error_no_drift_pct": 100 * (lm.predict(pol) / meas - 1),
                    "units_not_in_table": miss, "metric": st.metric,
                }
                rows.append(row)
                print(f"{threads}t {model_name:13s} #{k:2d} fp32 {row['fp32_layers']:2d}/{len(names)} "
                      f"meas {meas:8.3f} pred {pred:8.3f} err {row['error_pct']:+6.1f}% "
                      f"(hybrid {row['error_hybrid_pct']:+6.1f}%, uncal {row['error_uncalibrated_pct']:+6.1f}%, edge-share {row['error_edge_share_pct']:+6.1f}%) miss {miss}", flush=True)
            errs = [abs(r["error_pct"]) for r in rows]
            summ = {
                "threads": threads, "model": model_name, "policies": len(rows), "table_units": len(ct.ms),
                "table_build_s": round(t_table, 1), "refs_ms": {str(k): v for k, v in refs.items()},
                "median_abs_err_pct": statistics.median(errs), "max_abs_err_pct": max(errs),
                "within_5pct": sum(e <= 5 for e in errs),
                "median_abs_err_hybrid_pct": statistics.median(abs(r["error_hybrid_pct"]) for r in rows),
                "max_abs_err_hybrid_pct": max(abs(r["error_hybrid_pct"]) for r in rows),
                "median_abs_err_uncal_pct": statistics.median(abs(r["error_uncalibrated_pct"]) for r in rows),
                "median_abs_err_edge_share_pct": statistics.median(abs(r["error_edge_share_pct"]) for r in rows),
                "max_abs_err_edge_share_pct": max(abs(r["error_edge_share_pct"]) for r in rows),
                "per_unit_correction_ms": lm.meta.get("per_unit_correction_ms"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(summ), flush=True)
            all_rows.append({"summary": summ, "rows": rows})
            ct.save(RESULTS / f"bench_predict_context_{model_name}_{threads}t{args.tag}.json")
            out = RESULTS / f"bench_predict_{model_name}_{threads}t{args.tag}.json"
            out.write_text(json.dumps({"summary": summ, "rows": rows, "load": os.getloadavg()}, indent=1))
    print("\n model           thr  median|err|  max|err|  within±5%  (uncal. median)  hybrid median/max")
    for r in all_rows:
        s = r["summary"]
        print(f" {s['model']:15s} {s['threads']:3d}  {s['median_abs_err_pct']:9.2f}%  {s['max_abs_err_pct']:7.2f}%"
              f"  {s['within_5pct']:3d}/{s['policies']}     {s['median_abs_err_uncal_pct']:.2f}%"
              f"   {s['median_abs_err_hybrid_pct']:.2f}% / {s['max_abs_err_hybrid_pct']:.2f}%")
    return 0


def bench_whole(args: argparse.Namespace) -> int:
    """Whole-model regression (fidelity.profile_whole) scored on the same 20 test policies."""
    import torch

    torch.set_num_threads(1)
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.backend import Unit
    from lcpaq.profiler.backends.ort import OrtBackend
    from lcpaq.profiler.fidelity import profile_whole, random_class_policy
    from lcpaq.profiler.onnx_export import export_qdq, quantizable_names

    cands = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]
    be = OrtBackend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for model_name in args.models.split(","):
            t0 = time.perf_counter()
            st = _settings(model_name, threads)
            model, shape = get_model(model_name), default_input_shape(model_name)
            names = quantizable_names(model)
            x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
            load0 = os.getloadavg()
            lm, train_rows = profile_whole(model, shape, cands, n_random=args.train, settings=st, calib=[x])
            t_fit = time.perf_counter() - t0
            ref_b = export_qdq(model, Policy.uniform(names, 8, 8), shape, calib=[x])

            def timed(b: bytes, st=st, x=x) -> float:
                m = be.measure(Unit("b", b, {"input": x}), st)
                if m.error:
                    raise RuntimeError(m.error)
                return m.median_ms

            rows = []
            for k in range(args.policies):
                pol = random_class_policy(names, np.random.default_rng(k), cands)
                b = export_qdq(model, pol, shape, calib=[x])
                ms_pol, ms_ref = [], []
                for _ in range(2):
                    ms_ref.append(timed(ref_b))
                    ms_pol.append(timed(b))
                meas, drift = min(ms_pol), min(ms_ref) / lm.meta["ref_ms"]
                pred = lm.predict(pol) * drift
                rows.append({"threads": threads, "model": model_name, "policy": k, "measured_ms": meas,
                             "predicted_ms": pred, "error_pct": 100 * (pred / meas - 1), "drift": drift,
                             "fp32_layers": sum(1 for n in names if pol[n] == (32, 32)), "layers": len(names),
                             "metric": st.metric})
                print(f"{threads}t {model_name:13s} #{k:2d} meas {meas:8.3f} pred {pred:8.3f} "
                      f"err {rows[-1]['error_pct']:+6.1f}% drift {drift:.3f}", flush=True)
            errs = [abs(r["error_pct"]) for r in rows]
            summ = {"method": "whole", "threads": threads, "model": model_name, "policies": len(rows),
                    "train_policies": len(train_rows), "fit_rms_rel": lm.meta["fit_rms_rel"],
                    "fit_s": round(t_fit, 1), "median_abs_err_pct": statistics.median(errs),
                    "max_abs_err_pct": max(errs), "within_5pct": sum(e <= 5 for e in errs),
                    "wall_s": round(time.perf_counter() - t0, 1), "load_start": load0, "load_end": os.getloadavg()}
            print(json.dumps(summ), flush=True)
            table.append(summ)
            (RESULTS / f"bench_predict_whole_{model_name}_{threads}t{args.tag}.json").write_text(
                json.dumps({"summary": summ, "rows": rows, "train": train_rows}, indent=1))
    print("\n model           thr  median|err|  max|err|  within±5%  train  load")
    for s in table:
        print(f" {s['model']:15s} {s['threads']:3d}  {s['median_abs_err_pct']:9.2f}%  {s['max_abs_err_pct']:7.2f}%"
              f"  {s['within_5pct']:3d}/{s['policies']}   {s['train_policies']:4d}  {s['load_end'][0]:.1f}")
    return 0


def _bench_lock():
    """The shared timing lock (benchmarks/_lock.py)."""
    from _lock import bench_lock

    return bench_lock()


def bench_blocks(args: argparse.Namespace) -> int:
    """Block units (lcpaq.profiler.blocks): every block timed in every context of the designed
    policies, plus an isolation correction fitted on whole-model references; scored on the same 20
    test policies. Exports and cutting run once per model outside the bench lock; all timing for one
    thread count runs inside one hold. ``--rescore`` refits saved tables without measuring."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.blocks import BlockTable, OrtTimer, block_plan, design_policies
    from lcpaq.profiler.fidelity import cut_groups, random_class_policy
    from lcpaq.profiler.pairs import pair_groupings, record_pairs

    cands = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    table_out = []
    threads_list = args.threads.split(",")
    cache = Path(args.cache) if args.cache else None
    for model_name in args.models.split(","):
        if args.rescore:
            for threads in threads_list:
                table = BlockTable.load(RESULTS / f"bench_predict_blocks_table_{model_name}_{threads}t{args.tag}.json")
                if not table.plan.weight_numel:  # tables saved before the fp32-weight feature
                    import dataclasses

                    mods = dict(get_model(model_name).named_modules())
                    table.plan = dataclasses.replace(
                        table.plan, weight_numel={n: int(mods[n].weight.numel()) for n in table.plan.layers})
                old = json.loads((RESULTS / f"bench_predict_blocks_{model_name}_{threads}t{args.tag}.json").read_text())
                tests = [(r["policy"], random_class_policy(table.plan.layers, np.random.default_rng(r["policy"]),
                                                           cands), {"ms": r["measured_ms"], "ref_ms": r["ref_ms"],
                                                                    **({"rel": r["rel"]} if r.get("rel") else {})},
                          r["blocks_not_matching_table"]) for r in old["rows"]]
                extra = {k: old["summary"][k] for k in ("designed_policies", "block_units", "export_s", "unit_timing_s",
                                                        "locked_s", "wall_s", "load_start", "load_end", "overhead_ms")}
                table_out.append(_score_blocks(table, tests, cands, model_name, threads, extra, args.tag))
            continue
        t0 = time.perf_counter()
        model, shape = get_model(model_name), default_input_shape(model_name)
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        plan = block_plan(model, shape, calib=[x])
        pols = design_policies(plan, cands, np.random.default_rng(1000))
        n_whole = min(args.whole, len(pols))
        whole_idx = set(np.linspace(0, len(pols) - 1, n_whole).round().astype(int).tolist())
        print(f"{model_name}: {len(plan.blocks)} blocks, contexts up to "
              f"{max(len(c) for c in plan.context.values())} layers, {len(pols)} designed policies", flush=True)
        keys = BlockTable(plan)
        todo: list = []
        tmp = Path(tempfile.mkdtemp(prefix="bench_blocks_"))
        whole_files = []
        for i, pol in enumerate(pols):
            b = _cached_export(cache, model_name, model, pol, shape, x)
            todo += keys.add(cut_groups(b, model, pol, plan.groups), pol)
            keys.ms.update({u.key: float("nan") for u in todo})  # seen: do not collect twice
            for grouping in pair_groupings(plan) if args.pairs else []:
                todo += record_pairs(keys, cut_groups(b, model, pol, grouping), pol)
                keys.ms.update({u.key: float("nan") for u in todo})
            if i in whole_idx:
                (tmp / f"train{i}.onnx").write_bytes(b)
                whole_files.append((pol, tmp / f"train{i}.onnx"))
            if (i + 1) % 40 == 0:
                print(f"  exported {i + 1}/{len(pols)}, {len(todo)} units, {time.perf_counter() - t0:.0f} s", flush=True)
        tests_files = []
        for k in range(args.policies):
            pol = random_class_policy(plan.layers, np.random.default_rng(k), cands)
            b = _cached_export(cache, model_name, model, pol, shape, x)
            units = cut_groups(b, model, pol, plan.groups)
            mismatch = [g for g, u in units.items() if keys.keys[g].get(plan.context_of(pol, g)) != u.key]
            (tmp / f"test{k}.onnx").write_bytes(b)
            tests_files.append((k, pol, tmp / f"test{k}.onnx", mismatch))
        ref_b = _cached_export(cache, model_name, model, Policy.uniform(plan.layers, 8, 8), shape, x)
        t_export = time.perf_counter() - t0
        print(f"  {len(todo)} block units to time; exports took {t_export:.0f} s", flush=True)
        timed = []
        flushes = [float(v) for v in args.flush_mb.split(",")]
        with _bench_lock():  # one hold per model for every thread count (fewer waits in the queue)
            for threads in threads_list:
                st = _settings(model_name, threads)
                load0, t1 = os.getloadavg(), time.perf_counter()
                variants = []
                for mb in flushes:
                    table = BlockTable(plan, {}, {b: dict(v) for b, v in keys.keys.items()}, [],
                                       {g: list(v) for g, v in keys.pairs.items()})
                    tu = time.perf_counter()
                    timer = OrtTimer(st, x, args.stat, flush_bytes=int(mb * 2 ** 20))
                    samples: dict[str, list[float]] = {u.key: [] for u in todo}
                    for _ in range(args.unit_passes):  # passes spread in time: a burst hits one pass
                        for u in todo:
                            samples[u.key].append(timer.unit(u))
                    table.ms.update({k: float(np.median(v)) for k, v in samples.items()})
                    variants.append((mb, table, timer.overhead_ms, round(time.perf_counter() - tu, 1)))
                    print(f"  {threads}t flush {mb:g} MB: units timed in {variants[-1][3]:.0f} s, "
                          f"overhead {timer.overhead_ms * 1e3:.1f} us, load {os.getloadavg()}", flush=True)
                warm = OrtTimer(st, x, args.stat)  # whole rows: always warm, shared by every flush size
                wk = _whole_chunk(args.whole_chunk)
                whole = [warm.whole_row(pol, f.read_bytes(), ref_b, **wk) for pol, f in whole_files]
                tests = [(k, pol, warm.whole_row(pol, f.read_bytes(), ref_b, **wk), mm) for k, pol, f, mm in tests_files]
                load1, t_timed = os.getloadavg(), time.perf_counter() - t1
                for mb, table, overhead, t_units in variants:
                    table.whole.extend(whole)
                    extra = {"designed_policies": len(pols), "block_units": len(todo), "export_s": round(t_export, 1),
                             "unit_timing_s": t_units, "locked_s": round(t_timed, 1),
                             "wall_s": round(time.perf_counter() - t0, 1), "load_start": load0, "load_end": load1,
                             "overhead_ms": overhead, "flush_mb": mb}
                    tag = args.tag + (f"_flush{mb:g}mb" if mb else "")
                    timed.append((threads, table, tests, extra, tag))
        for threads, table, tests, extra, tag in timed:
            table.save(RESULTS / f"bench_predict_blocks_table_{model_name}_{threads}t{tag}.json")
            table_out.append(_score_blocks(table, tests, cands, model_name, threads, extra, tag))
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    print("\n model           thr  flushMB  median|err|  max|err|  within±5%  correction  load")
    for s in table_out:
        print(f" {s['model']:15s} {s['threads']:>3s}  {s.get('flush_mb', 0):7g}  {s['median_abs_err_pct']:9.2f}%  {s['max_abs_err_pct']:7.2f}%"
              f"  {s['within_5pct']:3d}/{s['policies']}   {s['correction']:9s}  {s['load_end'][0]:.1f}")
    return 0


def _score_blocks(table, tests, cands, model_name: str, threads: str, extra: dict, tag: str = "") -> dict:
    """Fit the block model (every correction variant) and score it on the measured test policies."""
    from lcpaq.profiler.blocks import fit_block_model, smooth_drift

    plan = table.plan
    ref0 = float(np.median([r["ref_ms"] for r in table.whole]))
    variants = {v: fit_block_model(table, cands, features=v)
                for v in ("auto", *VARIANTS)}
    variants["pairs"] = fit_block_model(table, cands, pairs=True)
    # drift of the machine since the table: the test references' running median (smooth_drift),
    # relative to the training references' median; per-policy and no rescaling are reported beside it
    # rows timed call by call against the reference carry their ratio: drift = ms / (rel * ref0)
    test_refs = [r["ref_ms"] for _, _, r, _ in tests]
    smooth = smooth_drift(test_refs) * float(np.median(test_refs)) / ref0
    smooth = np.array([r["ms"] / (r["rel"] * ref0) if "rel" in r else d
                       for (_, _, r, _), d in zip(tests, smooth.tolist(), strict=True)])
    rows = []
    for (k, pol, r, mismatch), drift in zip(tests, smooth.tolist(), strict=True):
        blocks_sum = sum(table.block_ms(pol).values())
        preds = {v: lm.predict(pol) * drift for v, lm in variants.items()}
        additive = variants["auto"]
        add_pred = (additive.predict(pol) - sum(g.cost(pol) for g in additive.groups)) * drift
        row = {"threads": threads, "model": model_name, "policy": k, "measured_ms": r["ms"],
               "ref_ms": r["ref_ms"], "rel": r.get("rel"), "drift": drift, "predicted_ms": preds["auto"],
               "error_pct": 100 * (preds["auto"] / r["ms"] - 1),
               "error_uncorrected_pct": 100 * (blocks_sum * drift / r["ms"] - 1),
               "error_pairs_uncorrected_pct": 100 * ((blocks_sum + sum(
                   g.cost(pol) for g in variants["pairs"].groups if g.name.startswith("pair:"))) * drift / r["ms"] - 1),
               "error_additive_pct": 100 * (add_pred / r["ms"] - 1),
               "error_row_drift_pct": 100 * (preds["auto"] / drift * r["ref_ms"] / ref0 / r["ms"] - 1),
               "error_no_drift_pct": 100 * (preds["auto"] / drift / r["ms"] - 1),
               **{f"error_{v}_pct": 100 * (p / r["ms"] - 1) for v, p in preds.items() if v != "auto"},
               "blocks_not_matching_table": mismatch,
               "fp32_layers": sum(1 for n in plan.layers if pol[n] == (32, 32)), "layers": len(plan.layers),
               "metric": _settings(model_name, threads).metric}
        rows.append(row)
        print(f"{threads}t {model_name:13s} #{k:2d} fp32 {row['fp32_layers']:2d}/{len(plan.layers)} meas "
              f"{r['ms']:8.3f} pred {preds['auto']:8.3f} err {row['error_pct']:+6.1f}% (uncorr "
              f"{row['error_uncorrected_pct']:+6.1f}%, additive {row['error_additive_pct']:+6.1f}%) drift "
              f"{drift:.3f} mismatch {len(mismatch)}", flush=True)
    errs = [abs(r["error_pct"]) for r in rows]
    lm = variants["auto"]
    names = ("uncorrected", "pairs_uncorrected", "additive", "row_drift", "no_drift", *VARIANTS, "pairs")
    summ = {"method": "blocks", "threads": str(threads), "model": model_name, "policies": len(rows),
            "blocks": len(plan.blocks), "whole_rows": len(table.whole), "correction": lm.meta["correction_features"],
            "correction_coef": lm.meta["correction"], "fit_rms_rel": lm.meta["fit_rms_rel"],
            "median_abs_err_pct": statistics.median(errs), "max_abs_err_pct": max(errs),
            "within_5pct": sum(e <= 5 for e in errs),
            **{f"median_abs_err_{v}_pct": statistics.median(abs(r[f"error_{v}_pct"]) for r in rows) for v in names},
            **{f"max_abs_err_{v}_pct": max(abs(r[f"error_{v}_pct"]) for r in rows) for v in names},
            **extra}
    print(json.dumps(summ), flush=True)
    (RESULTS / f"bench_predict_blocks_{model_name}_{threads}t{tag}.json").write_text(
        json.dumps({"summary": summ, "rows": rows}, indent=1))
    return summ


def retest_blocks(args: argparse.Namespace) -> int:
    """Noise floor: re-export the saved test policies, time each ``--retest`` more times (A B A B
    against the uniform-int8 reference, in one lock hold), and score the saved block model against
    the mean of all measurements of a policy. The spread of one policy's measurements is the part of
    the error no predictor can remove."""
    import torch

    torch.set_num_threads(1)
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.policy import Policy
    from lcpaq.profiler.blocks import BlockTable, OrtTimer, fit_block_model, smooth_drift
    from lcpaq.profiler.fidelity import random_class_policy

    cands = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]
    for model_name in args.models.split(","):
        for threads in args.threads.split(","):
            table = BlockTable.load(RESULTS / f"bench_predict_blocks_table_{model_name}_{threads}t{args.tag}.json")
            saved = json.loads((RESULTS / f"bench_predict_blocks_{model_name}_{threads}t{args.tag}.json").read_text())
            model, shape = get_model(model_name), default_input_shape(model_name)
            x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
            pols = [random_class_policy(table.plan.layers, np.random.default_rng(r["policy"]), cands)
                    for r in saved["rows"]]
            cache = Path(args.cache) if args.cache else None
            blobs = [_cached_export(cache, model_name, model, p, shape, x) for p in pols]
            ref_b = _cached_export(cache, model_name, model, Policy.uniform(table.plan.layers, 8, 8), shape, x)
            with _bench_lock():
                load0 = os.getloadavg()
                timer = OrtTimer(_settings(model_name, threads), x, args.stat)
                reps = [[timer.whole_row(p, b, ref_b, **_whole_chunk(args.whole_chunk))
                         for p, b in zip(pols, blobs, strict=True)]
                        for _ in range(args.retest)]
                load1 = os.getloadavg()
            ref0 = float(np.median([r["ref_ms"] for r in table.whole]))
            lm = fit_block_model(table, cands)
            rows = []
            for i, (p, r0) in enumerate(zip(pols, saved["rows"], strict=True)):
                # each measurement rescaled to the table's time by its own run's smoothed drift
                ms = [r0["measured_ms"] / r0["drift"]]
                for rep in reps:
                    d = smooth_drift([q["ref_ms"] for q in rep]) * float(np.median([q["ref_ms"] for q in rep])) / ref0
                    ms.append(rep[i]["rel"] * ref0 if "rel" in rep[i] else rep[i]["ms"] / float(d[i]))
                pred = lm.predict(p)
                rows.append({"policy": r0["policy"], "ms": ms, "spread_pct": 100 * (max(ms) / min(ms) - 1),
                             "error_vs_mean_pct": 100 * (pred / float(np.mean(ms)) - 1),
                             "first_vs_rest_pct": 100 * (ms[0] / float(np.mean(ms[1:])) - 1)})
            err = [abs(r["error_vs_mean_pct"]) for r in rows]
            summ = {"model": model_name, "threads": threads, "retest": args.retest,
                    "median_spread_pct": statistics.median(r["spread_pct"] for r in rows),
                    "max_spread_pct": max(r["spread_pct"] for r in rows),
                    "median_abs_first_vs_rest_pct": statistics.median(abs(r["first_vs_rest_pct"]) for r in rows),
                    "median_abs_err_vs_mean_pct": statistics.median(err), "max_abs_err_vs_mean_pct": max(err),
                    "within_5pct_vs_mean": sum(e <= 5 for e in err), "load_start": load0, "load_end": load1}
            print(json.dumps(summ), flush=True)
            (RESULTS / f"bench_predict_blocks_retest_{model_name}_{threads}t{args.tag}.json").write_text(
                json.dumps({"summary": summ, "rows": rows}, indent=1))
    return 0


def compare_tables(args: argparse.Namespace) -> int:
    """Score the isolated-unit tables (lcpaq profile) on the same 20 policies and measurements.

    The policies are regenerated from their seeds; the measured whole-model times come from the
    saved results of the fidelity run. Reported raw and rescaled on the uniform references."""
    from lcpaq.graph import trace_named
    from lcpaq.policy import Policy
    from lcpaq.profiler.fidelity import random_class_policy
    from lcpaq.profiler.predict import latency_model

    cands = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]
    root = Path(__file__).resolve().parent.parent / "latency_tables" / "host-cpu-ort"
    print(" model           thr  table median|err|  max|err|  within±5%   | ref-rescaled median  max")
    out = []
    for model_name in args.models.split(","):
        for threads in [int(t) for t in args.threads.split(",")]:
            res = RESULTS / f"bench_predict_{model_name}_{threads}t{args.tag}.json"
            if not res.exists():
                continue
            data = json.loads(res.read_text())
            model, inv = trace_named(model_name)
            from lcpaq.profiler.onnx_export import quantizable_names

            names = quantizable_names(model)
            lm = latency_model(root / f"{model_name}.jsonl", inv, cands)
            refs = {eval(k): v for k, v in data["summary"]["refs_ms"].items()}  # noqa: S307 - our own tuple keys
            scale = {p: refs[p] / lm.predict(Policy.uniform(names, *p)) for p in refs}
            errs, errs_s = [], []
            for row in data["rows"]:
                pol = random_class_policy(names, np.random.default_rng(row["policy"]), cands)
                pred = lm.predict(pol)
                frac = row["fp32_layers"] / row["layers"]
                pred_s = pred * (frac * scale[(32, 32)] + (1 - frac) * scale[(8, 8)])
                errs.append(100 * (pred / row["measured_ms"] - 1))
                errs_s.append(100 * (pred_s / row["measured_ms"] - 1))
            a, b = [abs(e) for e in errs], [abs(e) for e in errs_s]
            summ = {"model": model_name, "threads": threads, "median_abs_err_pct": statistics.median(a),
                    "max_abs_err_pct": max(a), "within_5pct": sum(e <= 5 for e in a),
                    "rescaled_median_abs_err_pct": statistics.median(b), "rescaled_max_abs_err_pct": max(b),
                    "errors_pct": errs, "rescaled_errors_pct": errs_s}
            out.append(summ)
            print(f" {model_name:15s} {threads:3d}  {summ['median_abs_err_pct']:10.2f}%  {max(a):7.2f}%  "
                  f"{summ['within_5pct']:3d}/{len(a)}      | {statistics.median(b):8.2f}%  {max(b):7.2f}%")
    (RESULTS / "bench_predict_isolated_tables.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
