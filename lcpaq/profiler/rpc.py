"""A loopback TVM RPC tracker + server, for tests and for users who want a local "board".

``local_tracker()`` starts ``python -m tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server
--tracker 127.0.0.1:PORT --key KEY`` as child processes on 127.0.0.1, waits until the server has
registered its key, yields the RpcConfig to put in a profile, and stops both on exit (even on an
exception). TVM is not imported in this process until the readiness check.

Example:
    >>> from lcpaq.profiler.rpc import local_tracker
    >>> with local_tracker(key="loopback") as rpc:  # doctest: +SKIP
    ...     backend = get_backend("tvm", dataclasses.replace(profile, rpc=rpc))
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from lcpaq.errors import BackendUnavailableError
from lcpaq.profiler.hwprofile import RpcConfig


def check_tracker(rpc: RpcConfig, timeout_s: float = 5.0, where: str = "the device profile") -> None:
    """The TVM RPC tracker named by ``rpc`` must accept a connection now: TVM itself retries a
    missing tracker forever (and MetaSchedule's RPC runner only after tuning every task).
    Raises BackendUnavailableError saying how to start one."""
    try:
        socket.create_connection((rpc.host, rpc.port), timeout=timeout_s).close()
    except OSError as e:
        raise BackendUnavailableError(
            f"no TVM RPC tracker answers at {rpc.host}:{rpc.port} ([rpc] in {where}: {e.strerror or e}); start "
            f"one (python -m tvm.exec.rpc_tracker --port {rpc.port}) with the board's server registered "
            f"as --key {rpc.key}, or fix [rpc] host/port") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    """Stop a child started in its own session, with its children (the tracker and the server
    each fork a worker that keeps the port open if only the parent dies)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group id is the child's pid (start_new_session=True)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue


def wait_for_key(host: str, port: int, key: str, timeout_s: float = 180.0) -> None:
    """Block until a server with ``key`` is free on the tracker (BackendUnavailableError if not)."""
    from tvm import rpc

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:  # plain socket probe first: connect_tracker itself retries only every 5 s
            socket.create_connection((host, port), timeout=1).close()
        except OSError as e:
            last = f"tracker not listening yet: {e}"
            time.sleep(0.2)
            continue
        try:
            summary = rpc.connect_tracker(host, port).summary()
            for q in summary.get("queue_info", {}) or {}:
                if q == key and summary["queue_info"][q].get("free", 0) > 0:
                    return
            last = f"tracker up, key '{key}' not registered yet: {summary.get('queue_info')}"
        except Exception as e:  # noqa: BLE001 - tracker not up yet
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.3)
    raise BackendUnavailableError(
        f"no TVM RPC server with key '{key}' on tracker {host}:{port} after {timeout_s:.0f} s ({last}); "
        f"start one with `python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")


@contextlib.contextmanager
def local_tracker(key: str = "loopback", *, port: int | None = None, timeout_s: float = 180.0,
                  python: str | None = None) -> Iterator[RpcConfig]:
    """Run a TVM RPC tracker and one server on 127.0.0.1; yield its RpcConfig; stop both after."""
    py = python or sys.executable
    port = port or free_port()
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", env.get("OMP_NUM_THREADS", "1"))
    sport = free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [py, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
             "--port-end", str(port + 1)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        procs.append(subprocess.Popen(
            [py, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport),
             "--port-end", str(sport + 20), "--tracker", f"127.0.0.1:{port}", "--key", key],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for_key("127.0.0.1", port, key, timeout_s)
        yield RpcConfig(host="127.0.0.1", port=port, key=key)
    finally:
        for p in reversed(procs):
            _stop(p)
