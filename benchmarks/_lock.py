"""The shared timing lock of the benchmarks: the same file and flock(2) as
``flock /tmp/lcpaq-bench.lock CMD``, so scripts that take it themselves queue with shell users."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

LOCK = "/tmp/lcpaq-bench.lock"


@contextlib.contextmanager
def bench_lock(indent: str = "") -> Iterator[None]:
    """Hold the lock for the block; print how long it took to get it and the load average."""
    with open(LOCK, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        print(f"{indent}bench lock taken after {time.perf_counter() - t0:.0f} s; load {os.getloadavg()}", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
