"""``tidings serve --workers N``: one listening socket, N worker processes, one relay.

The supervisor binds the TCP socket once and hands it to every worker (the
kernel then spreads accepted connections over them), so no port juggling
and no load balancer. Each worker is a full hub with its own node id. Unless
an external broker URL is given, the supervisor also runs the
:class:`tidings.brokers.ipc.relay.Relay` on a Unix socket in a fresh private temp
directory and every worker connects to it with ``ipc://``, so all workers
share publications, offsets, history, presence and direct messages.

Workers are started with the ``spawn`` method (a clean interpreter, no
inherited event loop or threads); the listening socket crosses over through
multiprocessing's pickling, which passes the file descriptor itself, as
uvicorn's own multiprocess supervisor does.

Signals: SIGINT/SIGTERM make the supervisor send SIGTERM to every worker
(each closes its websockets with 1001 and exits 0), wait for them (about
5 s in all, then SIGKILL), stop the relay and remove its directory; then
``run_workers`` returns 0. A worker that dies on its own is restarted after
a short backoff; if workers keep dying (more than ``2 * workers + 3``
restarts within a minute) the supervisor gives up and returns 1 rather than
spin.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any
from urllib.parse import urlsplit

from tidings.server.lean import bind_listeners

__all__ = ["run_workers"]

log = logging.getLogger("tidings.supervisor")

SHUTDOWN_GRACE = 4.5  # seconds workers get after SIGTERM, before SIGKILL (SPEC: stop in 5 s)
RESTART_WINDOW = 60.0


def run_workers(hub_factory_kwargs: dict[str, Any], *, host: str, port: int, workers: int,
                broker: str | None, log_level: str, server: str = "tidings",
                loop: str = "auto") -> int:
    """Serve ``workers`` hubs on ``host:port`` until SIGINT/SIGTERM; return the exit status.

    ``hub_factory_kwargs`` are passed to every worker's ``Hub(broker_url, **kwargs)``
    (they cross a process boundary, so they must pickle; ``node`` is refused since
    every worker needs its own). ``broker`` None (or a ``memory://`` URL, which
    cannot span processes) means the built-in relay.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if "node" in hub_factory_kwargs:
        raise ValueError("every worker is its own node: do not pass `node`")
    _check(hub_factory_kwargs, broker)
    # bound and listening once, here, so workers restart without refusing connections
    socks = bind_listeners(host, port, backlog=2048)
    try:
        for sock in socks:
            sock.set_inheritable(True)
        supervisor = _Supervisor(hub_factory_kwargs, socks, host=host, port=port,
                                 workers=workers, broker=broker, log_level=log_level,
                                 server=server, loop=loop)
        return asyncio.run(supervisor.run())
    finally:
        for sock in socks:
            sock.close()


def _check(hub_kwargs: dict[str, Any], broker: str | None) -> None:
    """Fail here, once, on a bad URL or bad settings, not in N crash-looping workers.

    Building a hub or a broker object connects nothing, so this is cheap.
    Raises what ``Hub(...)`` raises (ValueError, TypeError, ImportError), and
    TypeError when the settings do not pickle.
    """
    from tidings.brokers import create_broker
    from tidings.hub import Hub

    Hub("memory://", **hub_kwargs)
    try:  # they cross to the workers pickled (spawn)
        pickle.dumps(hub_kwargs)
    except Exception as exc:
        raise TypeError(f"hub settings must pickle to reach the worker processes: {exc}"
                        ) from exc
    if broker is not None and urlsplit(broker).scheme != "memory":
        create_broker(broker)


class _Supervisor:
    def __init__(self, hub_kwargs: dict[str, Any], socks: list[socket.socket], *, host: str,
                 port: int, workers: int, broker: str | None, log_level: str,
                 server: str = "tidings", loop: str = "auto") -> None:
        self.hub_kwargs = hub_kwargs
        self.socks = socks
        self.host = host
        self.port = port
        self.workers = workers
        self.broker = broker
        self.log_level = log_level.lower()
        self.server = server
        self.loop = loop
        self.url = broker or ""  # what workers connect to; the relay's ipc:// URL by default
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess | None] = [None] * workers
        self.ended: dict[int, asyncio.Future[None]] = {}  # pid -> done when it exits
        self.restarts: collections.deque[float] = collections.deque()
        self.slot_restarts: list[collections.deque[float]] = [
            collections.deque() for _ in range(workers)]
        self.stopping = asyncio.Event()
        self.exited: asyncio.Queue[int] = asyncio.Queue()  # slots whose process ended

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        relay = None
        tmpdir = None
        status = 0
        try:
            if self.broker is None or urlsplit(self.broker).scheme == "memory":
                if self.broker is not None:
                    log.info("memory:// cannot span processes: the %d workers share the "
                             "built-in relay instead", self.workers)
                from tidings.brokers.ipc.relay import Relay

                tmpdir = tempfile.mkdtemp(prefix="tidings-relay-")  # 0700: ours only
                path = os.path.join(tmpdir, "relay.sock")
                relay = Relay(path)
                await relay.start()
                url = f"ipc://{path}"
            else:
                url = self.broker
            self.url = url
            for slot in range(self.workers):
                self._spawn(slot)
            log.info("tidings supervisor %d: %d workers on http://%s:%d (broker %s)",
                     os.getpid(), self.workers, self.host, self.port, url)
            status = await self._watch()
        finally:
            await self._stop_workers()
            if relay is not None:
                await relay.stop()
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        log.info("tidings supervisor %d stopped", os.getpid())
        return status

    def _on_signal(self, sig: int) -> None:
        if not self.stopping.is_set():
            log.info("received %s: stopping %d workers", signal.Signals(sig).name,
                     self.workers)
        self.stopping.set()

    def _spawn(self, slot: int) -> None:
        proc = self.ctx.Process(
            target=_worker_main, name=f"tidings-worker-{slot}", daemon=True,
            args=(self.url, self.hub_kwargs, self.host, self.port, self.log_level, self.server,
                  self.loop, self.socks, slot, os.getpid()),
        )
        proc.start()
        self.procs[slot] = proc
        loop = asyncio.get_running_loop()
        sentinel = proc.sentinel

        ended_future: asyncio.Future[None] = loop.create_future()
        assert proc.pid is not None
        self.ended[proc.pid] = ended_future

        def ended() -> None:
            loop.remove_reader(sentinel)
            if not ended_future.done():
                ended_future.set_result(None)
            self.exited.put_nowait(slot)

        loop.add_reader(sentinel, ended)
        log.debug("worker %d started (pid %s)", slot, proc.pid)

    async def _watch(self) -> int:
        """Until a signal: restart workers that die; 1 if they keep dying."""
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while True:
                died = asyncio.ensure_future(self.exited.get())
                done, _ = await asyncio.wait({stop, died}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    died.cancel()
                    return 0
                slot = died.result()
                proc = self.procs[slot]
                if proc is None:
                    continue
                proc.join(1.0)
                now = time.monotonic()
                for window in (self.restarts, self.slot_restarts[slot]):
                    window.append(now)
                    while window and now - window[0] > RESTART_WINDOW:
                        window.popleft()
                if len(self.restarts) > 2 * self.workers + 3:
                    log.error("workers keep dying (%d restarts within %.0f s): giving up",
                              len(self.restarts), RESTART_WINDOW)
                    return 1
                delay = min(5.0, 0.25 * 2 ** (len(self.slot_restarts[slot]) - 1))
                log.warning("worker %d (pid %s) exited unexpectedly with status %s; "
                            "restarting it in %.2f s", slot, proc.pid, proc.exitcode, delay)
                self.procs[slot] = None
                if proc.pid is not None:
                    self.ended.pop(proc.pid, None)
                if proc.exitcode is not None:
                    proc.close()  # releases its sentinel fd
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop), delay)
                if self.stopping.is_set():
                    return 0
                self._spawn(slot)
        finally:
            stop.cancel()

    async def _stop_workers(self) -> None:
        """SIGTERM every worker, wait up to SHUTDOWN_GRACE, SIGKILL the rest."""
        live = [p for p in self.procs if p is not None and p.exitcode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                if proc.pid is not None:
                    os.kill(proc.pid, signal.SIGTERM)
        waits = [self.ended[p.pid] for p in live if p.pid in self.ended]
        if waits:
            await asyncio.wait(waits, timeout=SHUTDOWN_GRACE)
        for proc in live:
            if proc.exitcode is None:
                log.warning("worker pid %s did not stop in %.1f s: killing it", proc.pid,
                            SHUTDOWN_GRACE)
                proc.kill()
            proc.join(1.0)
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            proc.close()
        self.procs = [None] * self.workers
        self.ended.clear()


def _worker_main(url: str, hub_kwargs: dict[str, Any], host: str, port: int, log_level: str,
                 server: Any, loop: str,
                 socks: list[socket.socket], slot: int, parent: int) -> None:
    """Entry point of a worker process (module level so ``spawn`` can import it)."""
    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [worker {slot}] %(name)s: %(message)s")
    _watch_parent(parent)
    from tidings.hub import Hub
    from tidings.server.runner import run

    hub = Hub(url, **hub_kwargs)
    run(hub, host=host, port=port, log_level=log_level, sockets=socks, server=server,
        loop=loop)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _watch_parent(parent: int) -> None:
    """Get SIGTERM if the supervisor dies without telling us (SIGKILL), so the
    worker stops cleanly instead of serving on with a dead relay. On Linux the
    kernel sends it (``PR_SET_PDEATHSIG``; it fires when the thread that started
    the worker ends, and the supervisor starts them from its main thread), which
    keeps the worker one thread (a process with threads pays more for every
    socket system call); elsewhere a thread polls the parent's pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            asked = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):
            asked = False
        if asked:
            if os.getppid() != parent:  # it died before we asked
                os.kill(os.getpid(), signal.SIGTERM)
            return
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name="tidings-parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    """If the supervisor dies without telling us (SIGKILL), stop cleanly instead of
    serving on with a dead relay."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
