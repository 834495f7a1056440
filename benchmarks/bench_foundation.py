"""Foundation figures: embedded model accuracy under uniform fake-quant (bits x calibration
method) and trace times of the registered models.

    .venv/bin/python benchmarks/bench_foundation.py   # ~1-2 min on 2 cores

Writes benchmarks/results/foundation_accuracy.json and prints the tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lcpaq.data import get_loader
from lcpaq.graph import trace_named
from lcpaq.models import EMBEDDED, accuracy, get_model, list_models
from lcpaq.policy import FLOAT_BITS, Policy
from lcpaq.quant import CALIB_METHODS, apply_policy, quantizable_names

OUT = Path(__file__).parent / "results" / "foundation_accuracy.json"


def main() -> None:
    torch.set_num_threads(1)
    val = get_loader("mnist5k", "val", batch_size=500)
    cal = get_loader("mnist5k", "train", batch_size=128)
    fp32 = accuracy(get_model(EMBEDDED), val)
    rows = []
    pairs = [(b, b) for b in (8, 6, 4, 3, 2)] + [(b, FLOAT_BITS) for b in (4, 2)] + [(FLOAT_BITS, b) for b in (4, 2)]
    for w, a in pairs:
        for method in CALIB_METHODS if a != FLOAT_BITS else ("-",):
            m = get_model(EMBEDDED)
            apply_policy(m, Policy.uniform(quantizable_names(m), w, a), calib_loader=cal,
                         calib_batches=4, method=method if method != "-" else "minmax")
            acc = accuracy(m, val)
            rows.append({"w_bits": w, "a_bits": a, "method": method, "val_acc": acc, "drop": fp32 - acc})
    print(f"{EMBEDDED} fp32 val accuracy: {fp32:.2f}% (mnist5k val, 1000 images)")
    print(f"{'w':>3} {'a':>3} {'calib':>10} {'acc %':>7} {'drop':>6}")
    for r in rows:
        print(f"{r['w_bits']:>3} {r['a_bits']:>3} {r['method']:>10} {r['val_acc']:7.2f} {r['drop']:6.2f}")
    traces = []
    for name in list_models():
        t0 = time.perf_counter()
        _, inv = trace_named(name)
        traces.append({"model": name, "layers": len(inv), "gmacs": inv.total_macs / 1e9,
                       "tie_groups": len(inv.tie_groups), "edges": len(inv.edges),
                       "trace_s": time.perf_counter() - t0})
    print(f"\n{'model':20s} {'layers':>6} {'GMACs':>7} {'ties':>5} {'edges':>6} {'trace s':>8}")
    for t in traces:
        print(f"{t['model']:20s} {t['layers']:6d} {t['gmacs']:7.3f} {t['tie_groups']:5d} {t['edges']:6d} {t['trace_s']:8.2f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"fp32_val_acc": fp32, "fake_quant": rows, "traces": traces,
                               "note": "1 thread; other helpers were loading the 2-core VM"}, indent=1))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
