"""A minimal device profile on the fake backend, shared by the profiler tests."""

from __future__ import annotations

import textwrap

FAKE_PROFILE = textwrap.dedent("""
    [device]
    name = "t"
    [backend]
    name = "fake"
    threads = 1
    [candidates]
    bits = ["w8a8", "fp32"]
    [measure]
    warmup = 1
    number = 1
    repeat = 2
""")
