"""Child process that times units for :class:`lcpaq.profiler.run.IsolatedRunner`.

Protocol on the inherited pipes: 8-byte little-endian length + pickle, both ways. The protocol
stream is a private copy of fd 1; everything the runtime prints goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO


def send(f: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def recv(f: BinaryIO) -> Any:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("peer closed")
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def main() -> None:  # pragma: no cover - runs in the child
    # Ctrl-C reaches the whole process group: the parent handles it and closes our pipe, which
    # ends the loop below (EOF); a KeyboardInterrupt here would only print a second traceback.
    # A no-op handler rather than SIG_IGN: processes a runtime execs (TVM's tuning pool) reset
    # it to the default, while an ignored SIGINT would be inherited by them.
    signal.signal(signal.SIGINT, lambda *_: None)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from runtimes must not corrupt the protocol
    inp = sys.stdin.buffer
    try:
        _serve(inp, out)
    except (EOFError, BrokenPipeError):  # the parent went away (closed its pipe, or was killed)
        pass


def _serve(inp: BinaryIO, out: BinaryIO) -> None:  # pragma: no cover - runs in the child
    backend_name, profile = recv(inp)
    from lcpaq.profiler.backend import get_backend

    be = get_backend(backend_name, profile)
    send(out, ("ready", be.versions()))
    while True:
        try:
            msg = recv(inp)
        except EOFError:
            return
        if msg is None:
            return
        if msg[0] == "prepare":  # ("prepare", units): the backend's optional whole-run step
            prep = getattr(be, "prepare", None)
            try:
                send(out, ("ok", prep(msg[1]) if prep is not None else {}))
            except Exception as e:  # noqa: BLE001 - reported as data; measure() still works
                send(out, ("ok", {"error": f"{type(e).__name__}: {e}"}))
            continue
        unit, settings = msg
        send(out, ("ok", be.measure(unit, settings)))


if __name__ == "__main__":
    main()
