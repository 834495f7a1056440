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

from lcpaq.errors import TableError

TABLE_SCHEMA = "lcpaq.latency_table/1"


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


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
            rec = json.loads(line)
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
                + ("re-run with --repair to drop it and resume" if last else "the table is damaged; regenerate it")
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
