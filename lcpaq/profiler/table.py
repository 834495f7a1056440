"""Latency tables: self-describing, append-only JSONL that pandas reads in one call.

Line 1 is the header ({"schema": "lcpaq.latency_table/1", profile, backend, versions, host, settings,
date}); every further line is one measured record keyed by ``key`` (workload + unit variant + bits),
with units in the field names (median_ms, p10_ms, p90_ms, n). Rows are appended and fsync'ed one
by one, so a killed run loses at most the row being written; such a torn trailing line is detected
(TableError) and can be dropped with ``repair=True`` before resuming.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcpaq.errors import TableError, TableSetupError

TABLE_SCHEMA = "lcpaq.latency_table/1"


def cpuinfo() -> dict[str, str]:
    """The first value of each /proc/cpuinfo field ({} where there is none, e.g. macOS)."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``)."""
    info = cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def host_cpu() -> str:
    name = cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{name} x{os.cpu_count()}"


# CPU features that change which kernels a runtime picks (int8 dot products, wide vectors).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
              "asimddp", "i8mm", "sve")


def host_isa() -> str:
    """CPU family/model and the ISA features kernels dispatch on, e.g.
    ``"x86_64 family 26 model 2: avx2 fma avx512f avx512bw avx512_vnni avx_vnni avx512_bf16"``.

    ``host_cpu()`` alone ("AMD EPYC x2") does not tell two VMs apart: here it named both an
    AVX2-only host and an AVX-512 VNNI one, whose int8 kernels differ."""
    info, flags = cpuinfo(), cpu_flags()
    fam = info.get("cpu family", "")
    head = platform.machine() + (f" family {fam} model {info.get('model', '')}" if fam else "")
    return f"{head}: {' '.join(f for f in _ISA_FLAGS if f in flags)}".rstrip(": ")


# Header fields that define what a table's rows measured; rows from two setups never mix.
IDENTITY_FIELDS = ("profile", "backend", "profile_version", "target", "threads", "settings", "versions",
                   "host_cpu", "host_isa")


def header_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every identity field present in both headers whose values differ
    (a field missing from an older table's header is unknown, not a change)."""
    return [(k, old[k], new[k]) for k in IDENTITY_FIELDS
            if k in old and k in new and json.dumps(old[k], sort_keys=True, default=str)
            != json.dumps(new[k], sort_keys=True, default=str)]


def keep_previous(path: str | Path) -> Path:
    """Rename an existing table to ``<stem>.<its header date>.jsonl`` (never overwriting) and
    return the new path, so a fresh profiling run can start at ``path``."""
    path = Path(path)
    try:
        date = str(read_table(path, repair=False).header.get("date") or "old")
    except TableError:
        date = "old"
    stamp = "".join(c if c.isalnum() or c in "-" else "-" for c in date)[:25]
    dest = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    i = 1
    while dest.exists():
        dest = path.with_name(f"{path.stem}.{stamp}-{i}{path.suffix}")
        i += 1
    os.replace(path, dest)
    return dest


@dataclass
class LatencyTable:
    path: Path
    header: dict[str, Any]
    rows: dict[str, dict[str, Any]]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows.values())


def _parse(path: Path, *, repair: bool) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    header, rows = None, {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:  # json.loads(bytes) would raise it too, untyped
            raise TableError(f"latency table {path}: line {i + 1} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start}); is this a latency table? (`lcpaq profile` writes them)") from None
        except json.JSONDecodeError:
            last = i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:])
            if last and repair:
                good = b"\n".join(lines[:i]) + (b"\n" if i else b"")
                tmp = path.with_suffix(path.suffix + ".repair")
                tmp.write_bytes(good)
                os.replace(tmp, path)
                break
            where = "trailing line (an interrupted write)" if last else f"line {i + 1}"
            raise TableError(
                f"latency table {path}: corrupt {where}; "
                + (f"`lcpaq profile --hw PROFILE --model MODEL --out {path} --repair` drops it and resumes "
                   "(or delete that line)" if last else "the table is damaged; regenerate it")
            ) from None
        if header is None:
            if rec.get("schema") != TABLE_SCHEMA:
                raise TableError(f"latency table {path}: schema {rec.get('schema')!r}, expected '{TABLE_SCHEMA}'")
            header = rec
        else:
            if "key" not in rec:
                raise TableError(f"latency table {path}: line {i + 1} has no 'key'")
            rows[rec["key"]] = rec  # a re-measured key supersedes the older row
    return header, rows


def read_table(path: str | Path, *, repair: bool = False) -> LatencyTable:
    """Load a table; TableError on a missing file, wrong schema or corrupt line."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"latency table {p} does not exist; make it with `lcpaq profile`")
    header, rows = _parse(p, repair=repair)
    if header is None:
        raise TableError(f"latency table {p} is empty (no header)")
    return LatencyTable(p, header, rows)


def read_dataframe(path: str | Path):
    """The table's records as a pandas DataFrame (header in ``df.attrs['header']``)."""
    import pandas as pd

    t = read_table(path)
    df = pd.DataFrame(list(t.rows.values()))
    df.attrs["header"] = t.header
    return df


class TableWriter:
    """Append-only writer. Opening an existing table checks its header matches and resumes."""

    def __init__(self, path: str | Path, header: Mapping[str, Any], *, repair: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            old = read_table(self.path, repair=repair)
            for k in ("profile", "backend"):
                if old.header.get(k) != header.get(k):
                    raise TableError(
                        f"{self.path} was made for {k}={old.header.get(k)!r}, not {header.get(k)!r}; "
                        "use another --out"
                    )
            changed = header_changes(old.header, header)
            if changed:  # resuming would mix rows measured on two setups
                what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
                raise TableSetupError(
                    f"{self.path} was measured on another setup ({what}); resuming would mix its rows "
                    "with new ones. Profile into another --out and compare with `lcpaq tables diff OLD "
                    "NEW`, or pass --fresh to keep the old table under a dated name and start again"
                )
            self.done = set(old.rows)
        else:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps({"schema": TABLE_SCHEMA, **header}) + "\n")
            os.replace(tmp, self.path)
            self.done = set()
        self._f = self.path.open("a")

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, default=float)
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(record["key"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
