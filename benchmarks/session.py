"""One stack under test for ``benchmarks.compare``: its server processes (one,
or two nodes on one broker), the load-generator processes that hold its
subscribers (``benchmarks/loadgen.py``), its publishers, and one measured
phase at a time.

Publishers (in this, the controller process):

- ``batched``: unpaced frames go out 32 to a ``transport.write``, as a client
  that pipelines its messages sends them (one system call per frame made the
  publisher the limit at N = 1);
- ``single``: one frame per write, then what ``await ws.send()`` does (wait
  while the transport is paused) and a turn of the event loop, as a producer
  that emits each message as it happens: the server sees lone frames.

A paced (latency) phase sends each frame alone when it is due, either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import IO, Any

from benchmarks.fanout import Progress, ServerProcess, pad_for, system_cpu_seconds
from benchmarks.loadgen import Publisher, client_frame, watch_pipe, worker_main
from benchmarks.procfs import (
    connection_owners,
    proc_tree,
    tree_cpu_seconds,
    tree_cpu_split,
    tree_runtime_seconds,
)
from benchmarks.report import Phase, percentiles_ms
from benchmarks.stacks import (
    CHANNEL,
    EXTRACT,
    PREFIX,
    PUB_STEPS,
    SUB_STEPS,
    Stack,
    broker_pids,
    free_port,
    publication,
)

__all__ = ["Server", "Session"]

ROOT = Path(__file__).resolve().parent.parent
DATA_BYTES = 100
STALL_SECONDS = 15.0
BATCH = 32  # frames per write of the batched publisher

Payload = Callable[[str, int, int], bytes]  # (channel, ts, seq) -> a publisher frame's payload


class Server(ServerProcess):
    def __init__(self, stack: Stack, tag: str) -> None:
        self.stack = stack
        self.port = free_port()
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [env.get("PYTHONPATH", "")])])
        self.proc = subprocess.Popen(stack.argv(self.port, tag), cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.stack.key} exited with {self.proc.returncode}: "
                                   f"{self.output()}")
            with socket.socket() as sock:
                sock.settimeout(1)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.stack.key} did not listen within {timeout:g} s")
            time.sleep(0.05)


@dataclass
class Worker:
    process: multiprocessing.process.BaseProcess
    pipe: Pipe
    hello: bool = False
    connected: int = 0
    connect_report: dict[str, Any] | None = None
    progress: int = 0
    started: set[int] = field(default_factory=set)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: str | None = None


class Session:
    """The started servers of a stack, its load-generator processes and publishers.

    ``channel_steps``: the many-channels scenario, subscriber k subscribes to
    channel ``k % len(channel_steps)`` (interleaved over the processes)."""

    def __init__(self, stack: Stack, opts: argparse.Namespace, progress: Progress,
                 procs: int = 1, nofile: int = 0,
                 channel_steps: Sequence[list[tuple[str, bytes]]] = ()) -> None:
        self.stack = stack
        self.opts = opts
        self.progress = progress
        self.procs = procs
        self.nofile = nofile
        self.channel_steps = list(channel_steps)
        self.tag = uuid.uuid4().hex[:8]
        self.servers: list[Server] = []
        self.workers: list[Worker] = []
        self.wake = asyncio.Event()
        self.pubs: list[tuple[Publisher, list[str]]] = []  # each with the channels it feeds
        self.payload: Payload = self._stack_payload
        self.publisher = "batched"
        self.phase_id = 0
        self.seq = 0
        self.n = 0
        self.pad = pad_for(DATA_BYTES)
        self.broker_pids: list[int] = []

    @property
    def server(self) -> Server | None:
        """The node the subscribers are on (the last one)."""
        return self.servers[-1] if self.servers else None

    @property
    def pub(self) -> Publisher | None:
        return self.pubs[0][0] if self.pubs else None

    def _stack_payload(self, channel: str, ts: int, seq: int) -> bytes:
        return publication(self.stack.kind, ts, seq, self.pad)

    # plumbing

    async def start(self) -> None:
        for _ in range(self.stack.nodes):
            self.servers.append(Server(self.stack, self.tag))
        for server in self.servers:
            await asyncio.to_thread(server.wait_ready)
        mine = {p for s in self.servers for p in proc_tree(s.pid)}
        self.broker_pids = broker_pids(self.stack.broker, exclude=mine)
        assert self.server is not None
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.procs):
            parent, child = ctx.Pipe()
            kind = self.stack.kind
            spec = {
                "host": "127.0.0.1", "port": self.server.port, "sub_path": self.stack.sub_path,
                "steps": SUB_STEPS[kind], "prefix": PREFIX[kind], "extract": EXTRACT[kind],
                "ping_text": kind == "socketio", "proto": "nats" if kind == "nats" else "ws",
                "offset": i * 1_000_000, "nofile": self.nofile,
                "channel_steps": self.channel_steps, "start": i, "stride": self.procs,
                "policy": getattr(self.opts, "loadgen_policy", "normal"),
            }
            process = ctx.Process(target=worker_main, args=(child, spec), daemon=True,
                                  name=f"bench-loadgen-{i}")
            process.start()
            child.close()
            worker = Worker(process, parent)
            self.workers.append(worker)
            watch_pipe(parent, self._on_pipe, worker)
        await self.wait_for(lambda: all(w.hello for w in self.workers), 30, "load generator")

    def _on_pipe(self, worker: Worker) -> None:
        try:
            while worker.pipe.poll():
                msg = worker.pipe.recv()
                kind = msg[0]
                if kind == "progress":
                    if msg[1] == self.phase_id:
                        worker.progress = msg[2]
                elif kind == "started":
                    worker.started.add(msg[1])
                    worker.progress = 0
                elif kind == "done":
                    worker.done.setdefault(msg[1], msg[2])
                elif kind == "connected":
                    worker.connected = msg[1]
                elif kind == "connect_done":
                    worker.connect_report = msg[1]
                    worker.connected = msg[1]["total"]
                elif kind == "hello":
                    worker.hello = True
                elif kind == "error":
                    worker.failed = msg[1]
        except (EOFError, OSError):
            worker.failed = worker.failed or "load-generator process exited"
            asyncio.get_running_loop().remove_reader(worker.pipe.fileno())
        self.wake.set()

    def check_alive(self) -> None:
        for w in self.workers:
            if w.failed:
                raise RuntimeError(f"load generator failed: {w.failed}")
        for server in self.servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}: "
                                   f"{server.output()}")

    async def wait_for(self, cond: Callable[[], bool], timeout: float, what: str,
                       moving: Callable[[], int] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = moving() if moving else 0
        while not cond():
            self.check_alive()
            now = loop.time()
            if moving is not None:
                current = moving()
                if current != last:
                    last, deadline = current, now + STALL_SECONDS
            if now > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.1)
            self.progress.render()

    def _connected(self) -> int:
        return sum(w.connected for w in self.workers)

    def _min_progress(self) -> int:
        return min(w.progress for w in self.workers)

    def server_cpu(self) -> tuple[float, float]:
        """(utime + stime, utime) of the server processes, read once."""
        splits = [tree_cpu_split(s.pid) for s in self.servers]
        return sum(u + k for u, k in splits), sum(u for u, _ in splits)

    def broker_cpu(self) -> float:
        return sum(tree_cpu_seconds(p) for p in self.broker_pids)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for pub, _ in self.pubs:
            if pub.transport is not None:
                pub.transport.abort()
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(w.pipe.fileno())
            with contextlib.suppress(OSError, ValueError):
                w.pipe.send(("stop",))
        deadline = time.monotonic() + 15
        for w in self.workers:
            await asyncio.to_thread(w.process.join, max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
            w.process.join(1)
            w.pipe.close()
        for server in self.servers:
            status = await asyncio.to_thread(server.stop)
            if status not in (0, None, -signal.SIGTERM):
                self.progress.note(f"  {self.stack.key}: server exited with status {status}")

    # connections

    async def connect(self, count: int, label: str, sources: Sequence[str] = (),
                      concurrency: int = 100, stamped: bool = False) -> dict[str, Any]:
        """Open ``count`` more subscribers over the workers; the merged report.
        ``stamped``: timed by the kernel's receive timestamp (latency subscribers)."""
        for w in self.workers:
            w.connect_report = None
        shares = [count // len(self.workers) + (1 if i < count % len(self.workers) else 0)
                  for i in range(len(self.workers))]
        before = self._connected()
        for i, (w, share) in enumerate(zip(self.workers, shares, strict=True)):
            src = [sources[i % len(sources)]] if sources else []
            w.pipe.send(("connect", share, src, concurrency, stamped))
        self.progress.start(label, before + count)
        tick = asyncio.create_task(self._tick(lambda: self._connected()))
        try:
            await self.wait_for(lambda: all(w.connect_report for w in self.workers), 120,
                                "subscribers to connect", moving=self._connected)
        finally:
            tick.cancel()
        reports = [w.connect_report or {} for w in self.workers]
        errors: Counter[str] = Counter()
        for r in reports:
            errors.update(r.get("errors", {}))
        merged = {
            "ok": sum(r["ok"] for r in reports), "failed": sum(r["failed"] for r in reports),
            "seconds": max(r["seconds"] for r in reports), "errors": dict(errors),
            "cpu": sum(r["cpu"] for r in reports),
        }
        self.n = self._connected()
        self.progress.update(self.n)
        note = f"{merged['ok'] / merged['seconds']:,.0f} conn/s" if merged["seconds"] else ""
        if merged["failed"]:
            note += f", {merged['failed']} FAILED: {next(iter(errors))}"
        self.progress.finish(note)
        return merged

    async def _tick(self, value: Callable[[], int]) -> None:
        while True:
            self.progress.update(value())
            self.progress.render()
            await asyncio.sleep(0.1)

    async def open_publisher(self, path: str | None = None,
                             channels: Sequence[str] = (CHANNEL,),
                             steps: Sequence[tuple[str, bytes]] | None = None) -> Publisher:
        """A publisher on the first node (``path``: the stack's publish socket)."""
        loop = asyncio.get_running_loop()
        kind = self.stack.kind
        port = self.servers[0].port
        pub = Publisher("127.0.0.1", port, path or self.stack.pub_path,
                        PUB_STEPS[kind] if steps is None else steps, kind == "socketio")
        pub.nats = kind == "nats"
        await loop.create_connection(lambda: pub, "127.0.0.1", port)
        await asyncio.wait_for(pub.ready, 30)
        self.pubs.append((pub, list(channels)))
        return pub

    def drop_publishers(self) -> None:
        for pub, _ in self.pubs:
            if pub.transport is not None:
                pub.transport.abort()
        self.pubs.clear()

    def placement(self) -> tuple[int | None, Counter[int]]:
        """``--workers``: the worker pid holding the first publisher, and how many
        subscribers each worker holds."""
        assert self.server is not None
        owners = connection_owners(proc_tree(self.server.pid), self.server.port)
        mine = set()
        for pub, _ in self.pubs:
            if pub.transport is not None:
                mine.add(pub.transport.get_extra_info("sockname")[1])
        first = self.pub
        pub_port = (first.transport.get_extra_info("sockname")[1]
                    if first is not None and first.transport is not None else None)
        subs = Counter(pid for port, pid in owners.items() if port not in mine)
        return owners.get(pub_port) if pub_port is not None else None, subs

    def placement_note(self) -> str:
        pub_pid, subs = self.placement()
        if pub_pid is None:
            return ""
        same = subs.get(pub_pid, 0)
        return (f"{same} of {sum(subs.values())} subscribers on the publisher's worker, "
                f"{sum(subs.values()) - same} across the relay")

    async def publisher_off_subscribers(self, tries: int = 40) -> str:
        """``--workers``: reopen the publisher until it lands on a worker that holds
        no subscriber, so that every delivery crosses the relay (N = 1)."""
        for _ in range(tries):
            pub_pid, subs = self.placement()
            if pub_pid is not None and not subs.get(pub_pid):
                return self.placement_note()
            self.drop_publishers()
            await self.open_publisher()
        return self.placement_note() + " (could not separate them)"

    # publishing

    async def _publish(self, count: int, rate: float | None, max_s: float) -> tuple[int, int]:
        """Publish up to ``count`` rounds (one message to every channel of every
        publisher); (first send time in ns, rounds sent)."""
        pubs = self.pubs
        assert pubs
        payload = self.payload
        single = self.publisher == "single"
        # at most --max-ahead rounds and --max-backlog deliveries not yet received
        ahead = max(2, min(self.opts.max_ahead, self.opts.max_backlog // max(1, self.n)))
        wake = self.wake
        interval = int(1e9 / rate) if rate else 0
        loop = asyncio.get_running_loop()
        perf_ns = time.perf_counter_ns
        t0 = perf_ns()
        deadline = t0 + int(max_s * 1e9)
        first = 0
        sent = 0
        last_seen: tuple[int, bool] = (-1, False)
        stall = loop.time() + STALL_SECONDS
        frames: dict[Publisher, list[bytes]] = {pub: [] for pub, _ in pubs}
        # a round in channel order (interleaves the publishers); paced, its frames
        # are spread over the interval, not sent as one burst
        order = sorted(((pub, ch) for pub, chans in pubs for ch in chans), key=lambda x: x[1])
        step = interval // len(order) if interval else 0

        def flush() -> None:
            for pub, out in frames.items():
                if out:
                    pub.send_frames(out)
                    out.clear()

        def writable() -> bool:
            return all(pub.writable.is_set() for pub, _ in pubs)

        for i in range(count):
            if interval:
                due = t0 + i * interval
                now = perf_ns()
                if due > now:
                    await asyncio.sleep((due - now) / 1e9)
            elif i & (BATCH - 1) == 0:
                flush()
                if i and perf_ns() > deadline:
                    break
                await asyncio.sleep(0)
            while i - self._min_progress() >= ahead or not writable():
                flush()
                self.check_alive()
                seen = (self._min_progress(), writable())
                if seen != last_seen:
                    last_seen, stall = seen, loop.time() + STALL_SECONDS
                elif loop.time() > stall:
                    raise TimeoutError(f"publisher stalled at message {i} (slowest subscriber "
                                       f"at {self._min_progress()})")
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.05)
            self.seq += 1
            seq = self.seq
            for k, (pub, channel) in enumerate(order):
                if not pub.alive:
                    raise RuntimeError(f"the server closed the publisher ({pub.close_code})")
                if step and k:
                    due = t0 + i * interval + k * step
                    now = perf_ns()
                    if due > now:
                        await asyncio.sleep((due - now) / 1e9)
                ts = perf_ns()
                if not first:
                    first = ts
                frame = client_frame(payload(channel, ts, seq))
                if single or interval:  # a producer's `await ws.send(message)`
                    pub.send_frames([frame])
                    await pub.drain()
                    if single:
                        await asyncio.sleep(0)
                else:
                    frames[pub].append(frame)
            sent += 1
        flush()
        return first, sent

    async def phase(self, name: str, count: int, *, rate: float | None = None,
                    max_s: float = 1e9, sample: int = 10, latency: bool = False,
                    warmup: bool = False) -> Phase:
        """One measured phase of ``count`` rounds (``rate`` per second, or unpaced)."""
        assert self.server is not None
        self.phase_id += 1
        pid = self.phase_id
        base = self.seq
        result = Phase(name, self.n, count, rate,
                       publisher="paced" if rate else self.publisher,
                       channels=sum(len(c) for _, c in self.pubs))
        interval = 0.001 if rate is None else 0.05
        for w in self.workers:
            w.progress = 0
            w.pipe.send(("phase", pid, base, count, sample, latency, warmup, interval))
        await self.wait_for(lambda: all(pid in w.started for w in self.workers), 30,
                            f"{name} start")
        label = (f"{self.stack.key} N={self.n} {name}"
                 + (f" @{rate:g}/s" if rate else f" ({self.publisher})" if not warmup else ""))
        self.progress.start(label, count)
        tick = asyncio.create_task(self._tick(self._min_progress))
        cpu0, user0 = self.server_cpu()
        run0 = sum(tree_runtime_seconds(s.pid) for s in self.servers)
        red0 = self.broker_cpu()
        sys0 = system_cpu_seconds()
        me0 = time.process_time()
        first = 0
        gc.disable()  # the publishers too: no collection pause inside a phase
        try:
            first, sent = await self._publish(count, rate, max_s)
            result.messages = sent
            if sent < count:
                for w in self.workers:
                    w.pipe.send(("retarget", pid, sent))
            await self.wait_for(lambda: all(pid in w.done for w in self.workers),
                                STALL_SECONDS, f"{name} deliveries",
                                moving=lambda: sum(w.progress for w in self.workers))
        except TimeoutError as exc:
            result.timed_out = True
            result.errors.append(str(exc))
            for w in self.workers:
                w.pipe.send(("collect", pid))
            await self.wait_for(lambda: all(pid in w.done for w in self.workers), 10,
                                f"{name} collect")
        finally:
            gc.enable()
            tick.cancel()
        cpu1, user1 = self.server_cpu()
        result.server_cpu_s, result.server_user_s = cpu1 - cpu0, user1 - user0
        result.server_sched_s = sum(tree_runtime_seconds(s.pid) for s in self.servers) - run0
        result.broker_cpu_s = self.broker_cpu() - red0
        busy = system_cpu_seconds() - sys0
        reports = [w.done[pid] for w in self.workers]
        result.publisher_cpu_s = time.process_time() - me0
        result.loadgen_cpu_s = sum(r["cpu"] for r in reports) + result.publisher_cpu_s
        result.other_cpu_s = max(0.0, busy - result.server_cpu_s - result.loadgen_cpu_s
                                 - result.broker_cpu_s)
        end = max(r["last_rx"] for r in reports)
        if first and end > first:
            result.elapsed_s = (end - first) / 1e9
        result.deliveries = self.n * result.messages
        result.lost = sum(r["lost"] for r in reports)
        result.short = sum(r["short"] for r in reports)
        closed: Counter[str] = Counter()
        for r in reports:
            closed.update(r["closed"])
            result.errors.extend(r["errors"])
        result.closed = dict(closed)
        if latency:
            result.stamped = any(r["stamped"] for r in reports)
            kernel = [v for r in reports for v in r["latencies"]]
            result.samples = len(kernel)
            result.latency_ms = percentiles_ms(kernel)
            result.user_latency_ms = percentiles_ms(
                [v for r in reports for v in r["user_latencies"]])
        self.progress.update(result.messages)
        self.progress.finish(_note(result, warmup, latency))
        return result


def _note(result: Phase, warmup: bool, latency: bool) -> str:
    if warmup:
        return "ok" if not result.short else f"{result.short} subscribers missed the end"
    note = f"{result.per_s:,.0f} deliveries/s, {result.us:.2f} µs/delivery"
    if latency:
        user = result.user_latency_ms
        note += f", user p50 {user.get('p50', 0):.2f} p99 {user.get('p99', 0):.2f} ms"
        if result.stamped:
            kern = result.latency_ms
            note += f" (kernel p50 {kern.get('p50', 0):.2f} p99 {kern.get('p99', 0):.2f})"
    if result.lost:
        note += f", LOST {result.lost}"
    return note
