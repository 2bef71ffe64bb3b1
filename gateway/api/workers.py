"""Several gateway processes on one port, so that requests per second grow with cores.

One Python process serves requests on one event loop: on a machine with more cores than the loop and
the model threads can use, the rest idle. `icgate serve --workers N` binds the port once, then forks N
workers before anything is loaded (no threads, no models, no connections exist yet, so the fork is
safe); each worker builds its own gateway and serves on the shared listening socket, and the kernel
hands each new connection to whichever worker accepts it first.

What the workers share and what they don't (docs/performance.md has the figures):
- the database (request log, cache entries, keys, published models): each worker writes its own rows
  and reads the others' when it syncs, so a cache entry one worker stores serves the others after
  their next sync (`cache.sync_interval_s`);
- not the models: each worker loads its own embedder and cross-encoder graphs (onnxruntime sessions
  are not fork-safe, so they cannot be loaded before the fork and shared copy-on-write);
- not the limits kept in memory (per-tenant rate windows, admission's in-flight counts): each worker
  enforces them on its own share of the traffic, so a policy's limits hold per worker.

The parent only supervises: SIGTERM or SIGINT is passed on to every worker (each drains as one
gateway would), and when one worker exits the others are stopped too, so that the orchestrator above
(systemd, Kubernetes) sees one failure and restarts the whole, rather than a gateway at part strength.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("icgate.server")

STOP_GRACE_S = 60.0  # a worker drains for server.graceful_shutdown_s (30 s by default) before it exits


def listening_socket(host: str, port: int) -> socket.socket:
    """The port, bound once by the parent: a port in use fails here, before any worker starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(serve: Callable[[socket.socket], int], sock: socket.socket) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # the parent's forwarding handlers are not the worker's
        signal.signal(sig, signal.SIG_DFL)
    sys.exit(serve(sock))


def serve_workers(workers: int, sock: socket.socket, serve: Callable[[socket.socket], int]) -> int:
    """Run `serve(sock)` in `workers` forked processes until they stop; the first failure's status.

    Call before the process has started threads or loaded models: fork copies only the calling thread.
    """
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(target=_worker, args=(serve, sock), name=f"icgate-worker-{i}", daemon=False)
        for i in range(workers)
    ]
    stopping = stopping_by_signal = False

    def stop_all(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    def asked_to_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping_by_signal
        stopping_by_signal = True
        stop_all(signum, frame)

    previous = {sig: signal.signal(sig, asked_to_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for proc in procs:
            proc.start()
        log.info("%d workers serving on %s (pids %s)", workers, sock.getsockname(), [p.pid for p in procs])
        while not stopping and all(p.is_alive() for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs])
        if not stopping:
            failed = next(p for p in procs if not p.is_alive())
            log.error("worker %s exited with status %s: stopping the others", failed.pid, failed.exitcode)
            stop_all(signal.SIGTERM)
        for proc in procs:
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    # uvicorn drains on SIGTERM/SIGINT, then re-raises it: a worker that died of the signal it was asked
    # to stop with stopped cleanly
    asked = {-signal.SIGTERM, -signal.SIGINT} if stopping_by_signal else set()
    return next((abs(p.exitcode) for p in procs if p.exitcode and p.exitcode not in asked), 0)
