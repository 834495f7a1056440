"""Checks the commands run on their options before any long work, and a guard for C-level output.

Each check raises a :class:`~lcpaq.errors.ConfigError` that names the option and says what to
change, so a bad ``--out`` fails in a second instead of after a ten-minute run.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lcpaq.errors import ConfigError


def out_path(path: Path, option: str = "--out", *, folder: bool = False,
             suffixes: tuple[str, ...] = (), keep_tables: bool = True) -> Path:
    """Fail early when ``path`` (a file, or a folder with ``folder=True``) cannot be written.

    The nearest existing folder is probed by creating (and removing) a temporary file in it, so a
    read-only file system or a path under a regular file is caught before the command works. A
    latency table is never overwritten by another command's output (``keep_tables``)."""
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; give a folder path")
    if not folder and path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path, e.g. {path / 'out.json'}")
    if keep_tables and not folder and _is_latency_table(path):
        raise ConfigError(f"{option} {path} is a latency table; writing there would replace it; "
                          "choose another path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path}: use one of the suffixes {', '.join(suffixes)}")
    base = path if folder else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: {base} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write in {base} ({e.strerror or e}); "
                          "choose a writable location") from None
    return path


def _is_latency_table(path: Path) -> bool:
    from lcpaq.profiler.table import TABLE_SCHEMA

    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return TABLE_SCHEMA.encode() in f.readline(4096)
    except OSError:
        return False


def positive(value: float | None, option: str) -> float | None:
    """A budget or limit: None, or a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} {value:g} must be a finite number > 0")
    return value


def bits_text(text: str | None, option: str = "--bits") -> str | None:
    """None (use the default) or a non-empty candidate list; an empty string is a mistake."""
    if text is not None and not text.replace(",", "").strip():
        raise ConfigError(f"{option} is empty; write e.g. {option} w4a8,w8a8,fp32 or leave it out")
    return text


def data_fits(model: str, data: str, dataset) -> None:
    """The data's images must have the channel count the model takes (mnist5k is 1-channel,
    torchvision models take 3): a ConfigError now instead of a conv error mid-run."""
    from lcpaq.models import default_input_shape

    want = default_input_shape(model)[1]
    try:
        got = int(dataset[0][0].shape[0])
    except (IndexError, AttributeError, TypeError):
        return  # an empty or unusual data set: the library reports it
    except (OSError, ValueError) as e:  # e.g. PIL's UnidentifiedImageError on a non-image file
        raise ConfigError(f"--data {data}: its first sample cannot be read ({type(e).__name__}: {e}); "
                          "check the files") from None
    if got != want:
        raise ConfigError(f"--data {data} has {got}-channel images but {model} takes {want}-channel "
                          "inputs; use a model made for this data (see `lcpaq models`) or data with "
                          f"{want}-channel images (imagefolder:PATH)")


def tracker_reachable(profile, hw: Path, timeout_s: float = 5.0) -> None:
    """A profile that measures through a TVM RPC tracker: the tracker must accept a connection
    now (TVM itself would retry it forever, after tuning every task)."""
    from lcpaq.profiler.rpc import check_tracker

    rpc = getattr(profile, "rpc", None)
    if rpc is not None:
        check_tracker(rpc, timeout_s, where=str(hw))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file-descriptor-level writes to stdout (e.g. the HiGHS banner printed from C++) to
    stderr while the block runs, so ``--json`` output on stdout stays parseable."""
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        os.dup2(2, fd)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)
