"""`lcpaq validate` itself on 20 random mixed policies: the user's check, not the benchmark's.

``bench_predict.py --method blocks`` scores the block model with its own exports and timing loop.
This one goes through the library end to end, as a user would: ``profile_blocks`` with the
exporter validate deploys (:func:`lcpaq.deploy.qdq.export_policy`), whole rows timed in the chosen
mode (``--whole warm|stream``), then :func:`lcpaq.deploy.validate.validate` for each of 20 held-out
policies (seeds 0..19, each layer fp32 with p = 0.5 else one of w2a8/w4a8/w6a8/w8a8: bench_predict's
generator) against the fitted model, on the device profile (default ``hw_profiles/host-cpu-ort.toml``:
1 thread, the calling thread's CPU time). Reported per policy: the raw error (prediction vs the
measurement now) and the drift-free error (vs ``relative x`` the reference's time when the table was
made), median and max of each, and how many within +-5 %.

Takes the shared bench lock (/tmp/lcpaq-bench.lock) around the profiling and the validation (the
block profiler exports and times in one pass); the load average is printed beside the figures.

    python benchmarks/bench_validate.py --models mobilenet_v2 --whole stream
    python benchmarks/bench_validate.py --models mnist_resnet,resnet18 --whole warm --policies 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lock import bench_lock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CANDS = [(32, 32), (2, 8), (4, 8), (6, 8), (8, 8)]  # bench_predict.py's


def _stats(rows: list[dict], key: str) -> dict[str, float]:
    e = [abs(r[key]) for r in rows]
    return {"median_abs": statistics.median(e), "max_abs": max(e), "within_5pct": sum(v <= 5 for v in e),
            "signed_median": statistics.median(r[key] for r in rows)}


def bench(model_name: str, whole: str, n_policies: int, hw_path: Path, rounds: int, tag: str,
          number: int | None = None) -> dict:
    import dataclasses

    import torch

    from lcpaq.deploy.qdq import export_policy, torch_to_onnx
    from lcpaq.deploy.validate import validate
    from lcpaq.models import default_input_shape, get_model
    from lcpaq.profiler.blocks import profile_blocks
    from lcpaq.profiler.fidelity import random_class_policy
    from lcpaq.profiler.hwprofile import load_profile

    torch.set_num_threads(1)
    hw = load_profile(hw_path)
    # the block units of a 0.1 ms model last ~10 us: 40 calls per sample, as lcpaq demo and
    # bench_predict time them (with the profile's 5, mnist_resnet missed by up to 12 %)
    number = number or (40 if model_name == "mnist_resnet" else hw.settings.number)
    unit_settings = dataclasses.replace(hw.settings, number=number)
    model, shape = get_model(model_name).eval(), default_input_shape(model_name)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    export = functools.partial(export_policy, float_onnx=torch_to_onnx(model, shape))
    t0 = time.perf_counter()
    with bench_lock():
        load0 = os.getloadavg()
        table, lm = profile_blocks(model, shape, CANDS, settings=unit_settings, calib=[x], export=export, whole=whole,
                                   progress=lambda i, n: print(f"  profiled {i}/{n}", flush=True) if i % 40 == 0 else None)
        t_profile = time.perf_counter() - t0
        load1 = os.getloadavg()
        print(f"{model_name}: {len(table.ms)} block units, {len(table.whole)} whole rows ({whole}) in {t_profile:.0f} s, "
              f"correction {lm.meta['correction_features']}, reference {lm.meta['reference']['ms']:.4f} ms; "
              f"load {load0[0]:.2f} -> {load1[0]:.2f}", flush=True)
        rows = []
        for k in range(n_policies):
            pol = random_class_policy(table.plan.layers, np.random.default_rng(k), CANDS)
            rep = validate(model, pol, hw, lm, calib=[x], rounds=rounds, per_layer=False, model_name=model_name,
                           input_shape=shape)
            rows.append({"policy": k, "fp32_layers": sum(1 for n in table.plan.layers if pol[n] == (32, 32)),
                         "predicted_ms": rep.predicted_ms, "measured_ms": rep.measured_ms,
                         "reference_ms": rep.reference_ms, "relative": rep.relative,
                         "measured_table_ms": rep.measured_table_ms, "spread_pct": rep.spread_pct,
                         "error_pct": rep.error_pct, "error_drift_free_pct": rep.error_drift_free_pct,
                         "whole_mode": rep.whole_mode, "load": os.getloadavg()[0]})
            print(f"  #{k:2d} fp32 {rows[-1]['fp32_layers']:2d}/{len(table.plan.layers)} pred {rep.predicted_ms:.4f} "
                  f"meas {rep.measured_ms:.4f} (table time {rep.measured_table_ms:.4f}) err {rep.error_pct:+6.2f} % "
                  f"drift-free {rep.error_drift_free_pct:+6.2f} %", flush=True)
        load2 = os.getloadavg()
    summ = {"model": model_name, "whole": whole, "policies": n_policies, "rounds": rounds, "profile": hw.name,
            "metric": hw.settings.metric, "profile_number": number, "block_units": len(table.ms), "whole_rows": len(table.whole),
            "correction": lm.meta["correction_features"], "table_reference_ms": lm.meta["reference"]["ms"],
            "drift_free": _stats(rows, "error_drift_free_pct"), "raw": _stats(rows, "error_pct"),
            "profile_s": round(t_profile, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "load_start": load0, "load_after_profile": load1, "load_end": load2}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_validate_{model_name}_{whole}{tag}.json"
    out.write_text(json.dumps({"summary": summ, "rows": rows}, indent=1))
    print(json.dumps(summ), flush=True)
    return summ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist_resnet,mobilenet_v2")
    ap.add_argument("--whole", default="warm", help="comma list of whole-row modes: warm, stream")
    ap.add_argument("--policies", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="validate's measurement rounds")
    ap.add_argument("--hw", default=str(ROOT / "hw_profiles" / "host-cpu-ort.toml"))
    ap.add_argument("--number", type=int, default=None,
                    help="calls per sample when profiling (default: 40 for mnist_resnet, else the profile's)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from lcpaq.profiler.backends.ort import WHOLE_MODES

    modes = args.whole.split(",")
    bad = [m for m in modes if m not in WHOLE_MODES]
    if bad or args.policies < 1:
        print(f"error: --whole takes {', '.join(WHOLE_MODES)} (got {args.whole!r}); --policies >= 1", file=sys.stderr)
        return 2
    out = [bench(m, w, args.policies, Path(args.hw), args.rounds, args.tag, args.number)
           for m in args.models.split(",") for w in modes]
    print("\n model           whole   drift-free median  max    within±5%  | raw median  max    within  | load")
    for s in out:
        d, r = s["drift_free"], s["raw"]
        print(f" {s['model']:15s} {s['whole']:6s}  {d['median_abs']:8.2f}%  {d['max_abs']:6.2f}%  {d['within_5pct']:3d}/"
              f"{s['policies']}     | {r['median_abs']:6.2f}%  {r['max_abs']:6.2f}%  {r['within_5pct']:3d}/{s['policies']}"
              f"  | {s['load_start'][0]:.1f}-{s['load_end'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
