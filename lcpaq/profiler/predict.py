"""From a measured latency table to a :class:`~lcpaq.latency.LatencyModel` for one model.

unary[l][pair]            = T(l, pair, input in its own class) - per-call overhead
pairwise[(p, c)][(pp, pc)] = (T(c, pc, input in class(pp)) - T(c, pc, input in class(pc))) / n_producers(c)
                             (the convert op at the boundary: Quantize or Dequantize)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lcpaq.errors import MissingLatencyError
from lcpaq.inventory import Inventory
from lcpaq.latency import LatencyModel
from lcpaq.policy import BitPair, format_bits
from lcpaq.profiler.run import OVERHEAD_KEY
from lcpaq.profiler.table import LatencyTable, read_table
from lcpaq.profiler.units import precision_class, unit_key


def latency_model(table: str | Path | LatencyTable, inventory: Inventory, candidates: Sequence[BitPair], *,
                  subtract_overhead: bool = True) -> LatencyModel:
    """LatencyModel of ``inventory`` over ``candidates``; MissingLatencyError lists what to profile.

    A block table (JSON, schema ``lcpaq.block_table/1``, from :func:`lcpaq.profiler.blocks.profile_blocks`
    or ``benchmarks/bench_predict.py --method blocks``) gives :func:`~lcpaq.profiler.blocks.fit_block_model`."""
    if not isinstance(table, LatencyTable) and Path(table).suffix == ".json":
        return block_latency_model(table, inventory, candidates)
    t = table if isinstance(table, LatencyTable) else read_table(table)
    ov_row = t.get(OVERHEAD_KEY)
    overhead = float(ov_row["median_ms"]) if (ov_row and subtract_overhead and not ov_row.get("error")) else 0.0
    missing: list[str] = []

    def ms(key: str) -> float:
        row = t.get(key)
        if row is None or row.get("error") or row.get("median_ms") is None:
            missing.append(key)
            return 0.0
        return max(float(row["median_ms"]) - overhead, 0.0)

    unary = {}
    for ly in inventory:
        unary[ly.name] = {tuple(p): ms(unit_key(ly, p, precision_class(p))) for p in candidates}
    n_prod: dict[str, int] = {}
    for _, c in inventory.edges:
        n_prod[c] = n_prod.get(c, 0) + 1
    pairwise = {}
    for p, c in inventory.edges:
        ly = inventory[c]
        tab = {}
        for pp in candidates:
            for pc in candidates:
                cp, cc = precision_class(pp), precision_class(pc)
                if cp == cc:
                    continue
                delta = ms(unit_key(ly, pc, cp)) - ms(unit_key(ly, pc, cc))
                tab[(tuple(pp), tuple(pc))] = delta / n_prod[c]
        pairwise[(p, c)] = tab
    if missing:
        uniq = sorted(set(missing))
        bits = sorted({k.split("|")[1] for k in uniq if "|" in k})
        raise MissingLatencyError(
            f"latency table {t.path} lacks {len(uniq)} workload(s) for '{inventory.model}', e.g. "
            + "; ".join(uniq[:3])
            + f"\nprofile them with: lcpaq profile --hw hw_profiles/{t.header.get('profile', 'PROFILE')}.toml "
            f"--model {inventory.model or 'MODEL'} --bits {','.join(bits) or 'w8a8'} --out {t.path}"
        )
    return LatencyModel(unary, pairwise, constant_ms=0.0,
                        meta={"table": str(t.path), "overhead_ms": overhead, "profile": t.header.get("profile")})


def block_latency_model(path: str | Path, inventory: Inventory, candidates: Sequence[BitPair]) -> LatencyModel:
    """The block table at ``path`` as a LatencyModel for ``inventory`` (same layers required)."""
    from lcpaq.errors import TableError
    from lcpaq.profiler.blocks import BlockTable, fit_block_model

    bt = BlockTable.load(path)
    names = [ly.name for ly in inventory]
    if set(names) != set(bt.plan.layers):
        extra = sorted(set(names) ^ set(bt.plan.layers))
        raise TableError(f"block table {path} was measured on other layers than '{inventory.model}' "
                         f"(differ: {', '.join(extra[:4])}); profile this model's blocks")
    lm = fit_block_model(bt, candidates)
    return LatencyModel(lm.unary, lm.pairwise, lm.constant_ms, meta={**lm.meta, "table": str(path)}, groups=lm.groups)


def describe_missing(pair: BitPair) -> str:
    return format_bits(pair)
