"""From a measured latency table to a :class:`~lcpaq.latency.LatencyModel` for one model.

unary[l][pair]            = T(l, pair, input in its own class) - per-call overhead
pairwise[(p, c)][(pp, pc)] = (T(c, pc, input in class(pp)) - T(c, pc, input in class(pc))) / n_producers(c)
                             (the convert op at the boundary: Quantize or Dequantize)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lcpaq.errors import MissingLatencyError, TableError
from lcpaq.inventory import Inventory
from lcpaq.latency import LatencyModel
from lcpaq.policy import BitPair, format_bits
from lcpaq.profiler.run import OVERHEAD_KEY
from lcpaq.profiler.table import TABLE_SCHEMA, LatencyTable, read_table
from lcpaq.profiler.units import precision_class, unit_key

if TYPE_CHECKING:  # torch-free at import: the kernels module is only named here
    from lcpaq.profiler.backends.kernels_check import SegmentTable


def latency_model(table: str | Path | LatencyTable, inventory: Inventory, candidates: Sequence[BitPair], *,
                  subtract_overhead: bool = True) -> LatencyModel:
    """LatencyModel of ``inventory`` over ``candidates``; MissingLatencyError lists what to profile.

    A ``.json`` table is read by its ``schema``: a block table (``lcpaq.block_table/1``, from
    :func:`lcpaq.profiler.blocks.profile_blocks` or ``benchmarks/bench_predict.py --method blocks``)
    gives :func:`~lcpaq.profiler.blocks.fit_block_model`; a kernels segment table
    (``lcpaq.kernel_segments/1``, ``latency_segments.json`` of a ``lcpaq demo`` report) gives
    :func:`~lcpaq.profiler.backends.kernels_check.fit_segment_model`, as the demo builds it."""
    if not isinstance(table, LatencyTable) and Path(table).suffix == ".json":
        return json_latency_model(table, inventory, candidates)
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
                        meta={"table": str(t.path), "overhead_ms": overhead, "profile": t.header.get("profile"),
                              **_table_reference(t)})


def _table_reference(t: LatencyTable) -> dict:
    """``{"reference": {"bits", "ms", "whole"}}`` when the table holds a uniform-W8A8 whole-model row
    (``__whole__|w8a8``, written by ``lcpaq profile --references``,
    :func:`lcpaq.profiler.references.profile_and_references`): validate then times the policy
    against that model and compares in the table's time. Empty otherwise."""
    from lcpaq.profiler.references import table_references

    ms = table_references(t).get("w8a8")
    return {"reference": {"bits": [8, 8], "ms": ms, "whole": "warm"}} if ms else {}


def json_latency_model(path: str | Path, inventory: Inventory, candidates: Sequence[BitPair]) -> LatencyModel:
    """The JSON table at ``path`` (block or kernels segment table, told apart by ``schema``) as a
    LatencyModel for ``inventory``; TableError for any other file, naming what it is."""
    import json

    from lcpaq.profiler.backends.kernels_check import SEGMENT_SCHEMA
    from lcpaq.profiler.blocks import BLOCK_SCHEMA

    p = Path(path)
    if not p.is_file():
        raise TableError(f"latency table {p} does not exist; make it with `lcpaq profile`")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"latency table {p} is not valid JSON ({e}); pass a table made by `lcpaq profile` "
                         f"(.jsonl), a block table or a kernels segment table (.json)") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema == BLOCK_SCHEMA:
        return block_latency_model(p, inventory, candidates, doc=doc)
    if schema == SEGMENT_SCHEMA:
        return segment_latency_model(p, inventory, candidates, doc=doc)
    what = f"a {schema} file" if isinstance(schema, str) else "a JSON file without a 'schema' field"
    raise TableError(f"{p} is {what}, not a latency table; pass a table made by `lcpaq profile` (.jsonl, "
                     f"'{TABLE_SCHEMA}'), a block table ('{BLOCK_SCHEMA}') or a kernels segment table "
                     f"('{SEGMENT_SCHEMA}', latency_segments.json of a `lcpaq demo` report)")


def _same_layers(kind: str, path: Path, inventory: Inventory, layers: Sequence[str]) -> None:
    names = {ly.name for ly in inventory}
    if names != set(layers):
        differ = sorted(names ^ set(layers))
        raise TableError(f"{kind} table {path} was measured on other layers than '{inventory.model}' "
                         f"(differ: {', '.join(differ[:4])}); profile this model")


def block_latency_model(path: str | Path, inventory: Inventory, candidates: Sequence[BitPair], *,
                        doc: dict | None = None) -> LatencyModel:
    """The block table at ``path`` as a LatencyModel for ``inventory`` (same layers required)."""
    from lcpaq.profiler.blocks import BlockTable, fit_block_model

    bt = BlockTable.from_dict(doc) if doc is not None else BlockTable.load(path)
    _same_layers("block", Path(path), inventory, bt.plan.layers)
    lm = fit_block_model(bt, candidates)
    return LatencyModel(lm.unary, lm.pairwise, lm.constant_ms, meta={**lm.meta, "table": str(path)}, groups=lm.groups)


def segment_latency_model(path: str | Path, inventory: Inventory, candidates: Sequence[BitPair], *,
                          doc: dict | None = None) -> LatencyModel:
    """The kernels segment table at ``path`` as a LatencyModel for ``inventory``: the additive
    unit table with the default (``trans``: a constant plus a cost per float/integer switch between
    consecutive layers) correction, the model ``lcpaq demo`` predicts with."""
    from lcpaq.profiler.backends.kernels_check import SegmentTable, fit_segment_model

    st = SegmentTable.from_dict(doc) if doc is not None else SegmentTable.load(path)
    _same_layers("segment", Path(path), inventory, st.plan.layers)
    # the correction is fitted on the table's rows, whose policies use every candidate it was profiled
    # at, whatever subset the caller asks for (validate asks for the policy's own pairs)
    cands = list(dict.fromkeys([*(tuple(c) for c in st.meta.get("candidates", [])), *(tuple(c) for c in candidates)]))
    lm = with_segment_reference(fit_segment_model(st, cands), st)
    return LatencyModel(lm.unary, lm.pairwise, lm.constant_ms, meta={**lm.meta, "table": str(path)}, groups=lm.groups)


def with_segment_reference(lm: LatencyModel, table: SegmentTable) -> LatencyModel:
    """``lm`` (fitted on a kernels segment table) with the table's uniform-W8A8 reference in its
    meta (:func:`lcpaq.profiler.blocks.reference_meta`), so validate can divide the drift out."""
    import dataclasses

    from lcpaq.profiler.blocks import reference_meta

    return dataclasses.replace(lm, meta={**lm.meta, **reference_meta(table.rows)})


def describe_missing(pair: BitPair) -> str:
    return format_bits(pair)
