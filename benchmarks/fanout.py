"""Fan-out benchmark: one publisher, N subscribers of one channel, over real websockets.

For each N it starts ``tidings serve`` as a subprocess on a free port (history on,
the default), connects N native-protocol subscribers with the ``websockets``
asyncio client (split over load-generator processes), and one publisher that:

1. warms up with a few messages;
2. publishes M messages at full speed (throughput phase, ``--repeat`` times,
   the best run is reported): deliveries/s is ``N*M / (last subscriber got the
   last message - first publish)``, and the server's CPU time (utime+stime from
   ``/proc/<pid>/stat``) over the phase gives server CPU microseconds per
   delivery;
3. publishes at a fixed rate for a few seconds (latency phase, 200 msg/s by
   default, at most ``--latency-load`` deliveries/s): p50/p99 of publish ->
   receive latency, from timestamps parsed on a sample of frames.

It also reports the server's RSS after connecting the N subscribers, the CPU
time of the load generator (subscriber processes plus the publisher), and the
CPU the rest of the machine used meanwhile ("other CPU", from ``/proc/stat``):
on a shared machine, other jobs skew every number, so look at that column.

Delivery must be lossless: every subscriber counts its frames and checks the
``seq`` of a sample (every 10th frame and the last). The publisher is paced so
the server's slow-client policy (disconnect past 1,000 queued frames) never
triggers: at most ``--window`` publishes await their reply, and the publisher is
never more than ``--max-ahead`` messages ahead of the slowest subscriber (the
load-generator processes report their slowest subscriber every few ms).

Timestamps are ``time.perf_counter_ns()``, which on Linux is CLOCK_MONOTONIC and
so comparable between the processes of one machine. Linux only (``/proc``).

Run from the repository root::

    python -m benchmarks.fanout [--quick] [--subscribers 1 100 1000] [--messages M]
                                [--json FILE]

Progress goes to stderr, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import IO, Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["main"]

CHANNEL = "bench/fanout"
PUBLICATION_PREFIX = b'{"type":"publication"'
REPLY_PREFIX = b'{"type":"reply"'
CLK_TCK = os.sysconf("SC_CLK_TCK")
DATA_BYTES = 100  # approximate size of each publication's JSON data
CONNECT_CONCURRENCY = 50  # handshakes in flight per load-generator process
STALL_SECONDS = 15.0  # give up on a phase when nothing moves for this long

# Targets from the project's issue 7 (memory broker): server CPU per delivery by
# N, and p99 latency at N=100 with 200 msg/s.
TARGET_CPU_US: dict[int, float] = {1: 4.0, 100: 4.0, 1000: 2.5}
TARGET_P99_MS: dict[int, float] = {100: 2.0}
TARGET_P99_RATE = 200.0


# -- small helpers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        stat = file.read()
    # the command name (field 2) may hold spaces: split after its closing ')'
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def proc_runtime_seconds(pid: int) -> float:
    """CPU time of a process from the scheduler (``/proc/<pid>/task/*/schedstat``, ns).

    Exact, unlike utime+stime, which the kernel may sample at each tick
    (CONFIG_TICK_CPU_ACCOUNTING), a bias when the process runs in short bursts.
    Threads that already exited are not counted. 0.0 where unavailable.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as file:
                total += int(file.read().split()[0])
        except (OSError, ValueError, IndexError):  # the thread just ended, or no schedstat
            continue
    return total / 1e9


def proc_rss_kib(pid: int) -> tuple[int, int]:
    """Resident set size of a process: (VmRSS, RssAnon), in KiB.

    VmRSS also counts the pages of shared libraries this process mapped, which
    depends on the page cache (fault-around); RssAnon (heap, stacks) does not.
    """
    rss = anon = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    return rss, anon


def system_cpu_seconds() -> float:
    """Busy CPU time of the whole machine (all CPUs) since boot, from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as file:
        fields = file.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted sequence (q in [0, 1])."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def pad_for(size: int) -> str:
    """Padding so that ``{"ts": ..., "seq": ..., "pad": ...}`` is about ``size`` bytes."""
    sample = orjson.dumps({"ts": time.perf_counter_ns(), "seq": 100_000, "pad": ""})
    return "x" * max(0, size - len(sample))


def split(n: int, parts: int) -> list[int]:
    """``n`` subscribers over ``parts`` processes, as evenly as possible."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- the server under test ----------------------------------------------------------


class ServerProcess:
    """A server under test in a subprocess (``proc``), its output in ``_log``."""

    proc: subprocess.Popen[bytes]
    _log: IO[bytes]

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Server(ServerProcess):
    """``tidings serve`` in a subprocess on a free port; output kept in a temp file."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidings.server.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidings serve exited with {self.proc.returncode}: "
                                   f"{self.output()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("tidings serve did not become healthy in 30 s")
            time.sleep(0.05)



# -- load-generator process: a group of subscribers ----------------------------------------


class SubscriberGroup:
    """``n`` subscribers in one process, driven by the controller over a pipe.

    Messages from the controller: ``("phase", id, target, sample_every, latency,
    interval)`` (count frames up to the cumulative ``target``; report progress
    every ``interval`` s), ``("collect", id)`` (report
    now, whatever arrived), ``("stop",)``. To the controller: ``("connected", k)``,
    ``("ready", k, errors)``, ``("started", id, min_count)``, ``("progress", id,
    min_count)``, ``("done", id, report)``.

    Frames are counted, not parsed: only every ``sample_every``-th frame of a
    subscriber (staggered by subscriber index) and the last frame of a phase are
    parsed to check their ``seq`` (and, in the latency phase, to time them).
    """

    def __init__(self, url: str, n: int, offset: int, pipe: Pipe) -> None:
        self.url = url
        self.n = n
        self.offset = offset  # global index of the first subscriber (sampling stagger)
        self.pipe = pipe
        self.sockets: list[ClientConnection] = []
        self.counts = [0] * n
        self.done_ns = [0] * n
        self.alive = [True] * n
        self.phase = -1
        self.target = 0
        self.sample = 10
        self.latency = False
        self.interval = 0.005  # seconds between progress reports
        self.remaining = 0
        self.reported = True
        self.latencies: list[int] = []
        self.errors: list[str] = []
        self.closes: Counter[str] = Counter()
        self.cpu0 = 0.0
        self.stop = asyncio.Event()

    # controller messages

    def _on_command(self) -> None:
        try:
            while self.pipe.poll():
                msg = self.pipe.recv()
                kind = msg[0]
                if kind == "phase":
                    self._start_phase(msg[1], msg[2], msg[3], msg[4], msg[5])
                elif kind == "collect":
                    if msg[1] == self.phase and not self.reported:
                        self._report_done()
                elif kind == "stop":
                    self.stop.set()
        except (EOFError, OSError):
            self.stop.set()

    def _start_phase(self, phase: int, target: int, sample: int, latency: bool,
                     interval: float) -> None:
        self.phase = phase
        self.interval = interval
        self.target = target
        self.sample = max(1, sample)
        self.latency = latency
        self.latencies = []
        self.errors = []
        self.done_ns = [0] * self.n
        self.remaining = sum(1 for c, a in zip(self.counts, self.alive, strict=True)
                             if a and c < target)
        self.cpu0 = time.process_time()
        self.reported = False
        self.pipe.send(("started", phase, self._min_alive()))
        if self.remaining == 0:
            self._report_done()

    def _min_alive(self) -> int:
        if all(self.alive):
            return min(self.counts)
        return min((c for c, a in zip(self.counts, self.alive, strict=True) if a),
                   default=self.target)

    def _report_done(self) -> None:
        finished = [t for t in self.done_ns if t]
        target = self.target
        self.pipe.send(("done", self.phase, {
            "first_ns": min(finished, default=0),
            "last_ns": max(finished, default=0),
            "received": sum(self.counts),
            "short": sum(1 for c in self.counts if c < target),
            "lost": sum(target - c for c in self.counts if c < target),
            "closed": dict(self.closes),
            "latencies": self.latencies,
            "errors": self.errors[:10],
            "n_errors": len(self.errors),
            "cpu": time.process_time() - self.cpu0,
        }))
        self.reported = True

    # subscribers

    async def _connect_one(self, limit: asyncio.Semaphore) -> ClientConnection:
        async with limit:
            ws = await connect(self.url, compression=None, max_size=None, ping_interval=None,
                               open_timeout=60, close_timeout=2)
            try:
                welcome = orjson.loads(await ws.recv(decode=False))
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"expected welcome, got {welcome!r}")
                await ws.send(orjson.dumps({"type": "subscribe", "id": 1, "channel": CHANNEL}),
                              text=True)
                reply = orjson.loads(await ws.recv(decode=False))
                if reply.get("type") != "reply" or reply.get("id") != 1:
                    raise RuntimeError(f"subscribe failed: {reply!r}")
            except BaseException:
                await ws.close()
                raise
            return ws

    async def _connect_all(self) -> list[str]:
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
        tasks = [asyncio.create_task(self._connect_one(limit)) for _ in range(self.n)]
        errors: list[str] = []
        for done, fut in enumerate(asyncio.as_completed(tasks), 1):
            try:
                await fut
            except Exception as exc:
                errors.append(repr(exc))
            if done % 50 == 0:
                self.pipe.send(("connected", done - len(errors)))
        self.sockets = [t.result() for t in tasks if not t.exception()]
        return errors

    async def _read(self, i: int, ws: ClientConnection) -> None:
        counts = self.counts
        stagger = self.offset + i
        prefix = PUBLICATION_PREFIX
        recv = ws.recv
        try:
            while True:
                frame = await recv(decode=False)
                if not frame.startswith(prefix):
                    self.errors.append(f"unexpected frame: {frame[:200]!r}")
                    continue
                c = counts[i] + 1
                counts[i] = c
                if (c + stagger) % self.sample == 0 or c == self.target:
                    self._check(i, c, frame)
        except ConnectionClosed as exc:
            self._closed(i, exc)

    def _check(self, i: int, c: int, frame: bytes) -> None:
        now = time.perf_counter_ns()
        data = orjson.loads(frame)["data"]
        if data["seq"] != c:
            self.errors.append(f"subscriber {self.offset + i}: frame {c} has seq {data['seq']}")
        if self.latency:
            self.latencies.append(now - data["ts"])
        if c == self.target and not self.reported:
            self.done_ns[i] = now
            self.remaining -= 1
            if self.remaining == 0:
                self._report_done()

    def _closed(self, i: int, exc: ConnectionClosed) -> None:
        self.alive[i] = False
        rcvd = exc.rcvd
        self.closes[f"{rcvd.code} {rcvd.reason}" if rcvd is not None else "no close frame"] += 1
        if self.counts[i] < self.target and not self.reported:
            self.remaining -= 1
            if self.remaining == 0:
                self._report_done()

    async def _report_progress(self) -> None:
        last = -1
        while True:
            await asyncio.sleep(self.interval)
            if self.reported:
                continue
            low = self._min_alive()
            if low != last:
                last = low
                self.pipe.send(("progress", self.phase, low))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_command)
        errors = await self._connect_all()
        self.n = len(self.sockets)
        self.counts = [0] * self.n
        self.done_ns = [0] * self.n
        self.alive = [True] * self.n
        readers = [asyncio.create_task(self._read(i, ws)) for i, ws in enumerate(self.sockets)]
        progress = asyncio.create_task(self._report_progress())
        self.pipe.send(("ready", self.n, errors[:10]))
        await self.stop.wait()
        progress.cancel()
        for task in readers:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True), 5)


def _worker_main(url: str, n: int, offset: int, pipe: Pipe) -> None:
    """Entry point of a load-generator process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us
    try:
        asyncio.run(SubscriberGroup(url, n, offset, pipe).run())
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(("error", repr(exc)))
        raise


# -- controller: the publisher and the bookkeeping --------------------------------------


@dataclass
class Worker:
    process: multiprocessing.process.BaseProcess
    pipe: Pipe
    size: int
    connected: int = 0
    ready: bool = False
    errors: list[str] = field(default_factory=list)
    progress: int = 0
    started: set[int] = field(default_factory=set)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: str | None = None


@dataclass
class PhaseResult:
    name: str
    messages: int
    rate: float | None  # msg/s asked for; None = full speed
    elapsed_s: float = 0.0  # first publish -> last subscriber got the last message
    publish_s: float = 0.0  # first publish -> last publish sent
    deliveries: int = 0  # expected: N * messages
    lost: int = 0
    short_subscribers: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    publish_errors: int = 0
    server_cpu_s: float = 0.0  # utime + stime
    server_runtime_s: float = 0.0  # schedstat
    loadgen_cpu_s: float = 0.0
    publisher_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # busy CPU of the machine minus server and load generator
    latency_samples: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    timed_out: bool = False

    @property
    def deliveries_per_s(self) -> float:
        return (self.deliveries - self.lost) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def server_cpu_us_per_delivery(self) -> float:
        done = self.deliveries - self.lost
        return self.server_cpu_s * 1e6 / done if done else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "messages": self.messages, "rate": self.rate,
            "elapsed_s": round(self.elapsed_s, 4), "publish_s": round(self.publish_s, 4),
            "deliveries": self.deliveries, "lost": self.lost,
            "short_subscribers": self.short_subscribers, "closed": self.closed,
            "errors": self.errors, "publish_errors": self.publish_errors,
            "deliveries_per_s": round(self.deliveries_per_s, 1),
            "server_cpu_s": round(self.server_cpu_s, 3),
            "server_cpu_us_per_delivery": round(self.server_cpu_us_per_delivery, 3),
            "server_schedstat_s": round(self.server_runtime_s, 4),
            "server_schedstat_us_per_delivery": round(
                self.server_runtime_s * 1e6 / (self.deliveries - self.lost), 3)
            if self.deliveries > self.lost else 0.0,
            "server_cpu_percent": round(100 * self.server_cpu_s / self.elapsed_s, 1)
            if self.elapsed_s else 0.0,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 3),
            "publisher_cpu_s": round(self.publisher_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3),
            "other_cpu_percent": round(100 * self.other_cpu_s / self.elapsed_s, 1)
            if self.elapsed_s else 0.0,
            "latency_samples": self.latency_samples, "latency_ms": self.latency_ms,
            "timed_out": self.timed_out,
        }


@dataclass
class CaseResult:
    subscribers: int
    procs: int
    server_pid: int = 0
    rss_start_kib: tuple[int, int] = (0, 0)  # server (VmRSS, RssAnon) before any subscriber
    rss_idle_kib: tuple[int, int] = (0, 0)  # after connecting the N subscribers
    rss_end_kib: tuple[int, int] = (0, 0)  # after the phases (history full)

    @property
    def kib_per_connection(self) -> float:
        """Growth of RssAnon per subscriber connection."""
        if not self.subscribers:
            return 0.0
        return (self.rss_idle_kib[1] - self.rss_start_kib[1]) / self.subscribers
    connect_s: float = 0.0
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    throughput_runs: list[PhaseResult] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "subscribers": self.subscribers, "loadgen_processes": self.procs,
            "server_pid": self.server_pid,
            "rss_start_kib": self.rss_start_kib[0], "rss_idle_kib": self.rss_idle_kib[0],
            "rss_end_kib": self.rss_end_kib[0], "rss_anon_start_kib": self.rss_start_kib[1],
            "rss_anon_idle_kib": self.rss_idle_kib[1], "rss_anon_end_kib": self.rss_end_kib[1],
            "rss_anon_per_connection_kib": round(self.kib_per_connection, 1),
            "connect_s": round(self.connect_s, 3), "loadavg_before": list(self.loadavg),
            "phases": {name: p.to_dict() for name, p in self.phases.items()},
            "throughput_runs": [p.to_dict() for p in self.throughput_runs],
            "error": self.error,
        }


class Progress:
    """A one-line text progress bar on stderr (plain lines when it is not a tty)."""

    WIDTH = 30

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.label = ""
        self.done = 0
        self.total = 0
        self._shown = False
        self._active = False  # between start() and finish()

    def start(self, label: str, total: int) -> None:
        self.finish()
        self.label, self.done, self.total = label, 0, total
        self._active = True
        if self.enabled and not self.tty:
            print(f"  {label} ...", file=sys.stderr, flush=True)
        self.render()

    def update(self, done: int) -> None:
        self.done = done

    def render(self) -> None:
        if not (self.enabled and self.tty and self._active):
            return
        frac = min(1.0, self.done / self.total) if self.total else 0.0
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sys.stderr.write(f"\r  {self.label:<32} [{bar}] {frac:4.0%} {self.done}/{self.total}  ")
        sys.stderr.flush()
        self._shown = True

    def finish(self, note: str = "") -> None:
        if not (self.enabled and self._active):
            return
        if self.tty and self._shown:
            self.done = self.total
            self.render()
            sys.stderr.write(f" {note}\n")
            sys.stderr.flush()
        elif note:
            print(f"  {self.label}: {note}", file=sys.stderr, flush=True)
        self._shown = False
        self._active = False

    def note(self, text: str) -> None:
        if self.enabled:
            self.finish()
            print(text, file=sys.stderr, flush=True)


class Controller:
    """Runs one case (one N) against a started server."""

    def __init__(self, server: Server, n: int, procs: int, args: argparse.Namespace,
                 progress: Progress) -> None:
        self.server = server
        self.n = n
        self.args = args
        self.progress = progress
        self.result = CaseResult(n, min(procs, n))
        self.workers: list[Worker] = []
        self._wake = asyncio.Event()
        self._phase_id = 0
        self._seq = 0  # last seq published (seq = per-subscriber cumulative frame count)
        self._base = 0  # last seq of the previous phase (for the progress bar)
        self._lost_cum = 0  # deliveries lost so far, all phases
        self.replied = 0
        self.publish_errors: list[str] = []
        self.pad = pad_for(DATA_BYTES)

    # worker plumbing

    def _spawn_workers(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        offset = 0
        for size in split(self.n, self.result.procs):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_worker_main, name=f"fanout-loadgen-{len(self.workers)}",
                                  args=(self.server.ws_url, size, offset, child), daemon=True)
            process.start()
            child.close()
            offset += size
            worker = Worker(process, parent, size)
            self.workers.append(worker)
            asyncio.get_running_loop().add_reader(parent.fileno(), self._on_pipe, worker)

    def _on_pipe(self, worker: Worker) -> None:
        try:
            while worker.pipe.poll():
                msg = worker.pipe.recv()
                kind = msg[0]
                if kind == "progress":
                    if msg[1] == self._phase_id:
                        worker.progress = msg[2]
                elif kind == "started":
                    worker.started.add(msg[1])
                    worker.progress = msg[2]
                elif kind == "done":
                    worker.done.setdefault(msg[1], msg[2])
                elif kind == "connected":
                    worker.connected = msg[1]
                elif kind == "ready":
                    worker.connected = msg[1]
                    worker.errors = msg[2]
                    worker.ready = True
                elif kind == "error":
                    worker.failed = msg[1]
        except (EOFError, OSError):
            worker.failed = worker.failed or "load-generator process exited"
            asyncio.get_running_loop().remove_reader(worker.pipe.fileno())
        self._wake.set()

    def _check_alive(self) -> None:
        for w in self.workers:
            if w.failed:
                raise RuntimeError(f"load generator failed: {w.failed}")
        if self.server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.server.proc.returncode}: "
                               f"{self.server.output()}")

    async def _wait_for(self, cond: Callable[[], bool], timeout: float, what: str,
                        moving: Callable[[], int] | None = None) -> None:
        """Wait until ``cond()``; time out after ``timeout`` s (or after
        STALL_SECONDS without change of ``moving()`` if given)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = moving() if moving else 0
        while not cond():
            self._check_alive()
            now = loop.time()
            if moving is not None:
                current = moving()
                if current != last:
                    last, deadline = current, now + STALL_SECONDS
            if now > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.25)

    def _min_progress(self) -> int:
        return min(w.progress for w in self.workers)

    async def _ticker(self) -> None:
        """Redraw the progress bar and wake waiters (for stall checks) at 10 Hz."""
        while True:
            await asyncio.sleep(0.1)
            if self.workers and all(w.ready for w in self.workers):
                self.progress.update(self._min_progress() - self._base)
            else:
                self.progress.update(self._connected())
            self.progress.render()
            self._wake.set()

    # the publisher

    async def _read_replies(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await ws.recv(decode=False)
                if not frame.startswith(REPLY_PREFIX):
                    msg = orjson.loads(frame)
                    if msg.get("type") != "error":
                        continue
                    self.publish_errors.append(f"{msg.get('code')}: {msg.get('message')}")
                self.replied += 1
                self._wake.set()

    async def _publish(self, ws: ClientConnection, count: int,
                       rate: float | None) -> tuple[int, int]:
        """Publish ``count`` messages; return (first, last) send times in ns."""
        window = self.args.window
        ahead = self.args.max_ahead
        pad = self.pad
        wake = self._wake
        interval = int(1e9 / rate) if rate else 0
        first_ns = last_ns = 0
        t0 = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        stall_deadline = loop.time() + STALL_SECONDS
        last_seen = (self.replied, self._min_progress())
        for i in range(count):
            seq = self._seq + 1
            if interval:
                due = t0 + i * interval
                now = time.perf_counter_ns()
                if due > now:
                    await asyncio.sleep((due - now) / 1e9)
            while seq - self.replied > window or seq - self._min_progress() > ahead:
                self._check_alive()
                seen = (self.replied, self._min_progress())
                if seen != last_seen:
                    last_seen, stall_deadline = seen, loop.time() + STALL_SECONDS
                elif loop.time() > stall_deadline:
                    raise TimeoutError(f"publisher stalled at seq {seq} (replies {self.replied},"
                                       f" slowest subscriber at {self._min_progress()})")
                wake.clear()
                await wake.wait()
            ts = time.perf_counter_ns()
            await ws.send(orjson.dumps({"type": "publish", "id": seq, "channel": CHANNEL,
                                        "data": {"ts": ts, "seq": seq, "pad": pad}}), text=True)
            self._seq = seq
            if not first_ns:
                first_ns = ts
            last_ns = ts
        return first_ns, last_ns

    async def _phase(self, ws: ClientConnection, name: str, count: int, rate: float | None,
                     sample: int, latency: bool, label: str = "") -> PhaseResult:
        self._phase_id += 1
        phase_id = self._phase_id
        base = self._seq
        target = base + count
        result = PhaseResult(name, count, rate, deliveries=self.n * count)
        label = f"N={self.n} {label or name}" + (f" @{rate:g}/s" if rate else "")
        self.progress.start(label, count)
        lost_before = self._lost_cum
        self._base = base
        # progress drives the publisher's credit at full speed; at a fixed rate
        # below capacity it is only for the progress bar, so report it rarely
        interval = 0.005 if rate is None else 0.05
        for w in self.workers:
            w.pipe.send(("phase", phase_id, target, sample, latency, interval))
        await self._wait_for(lambda: all(phase_id in w.started for w in self.workers), 30,
                             f"{name} start")
        errors_before = len(self.publish_errors)
        cpu0 = proc_cpu_seconds(self.server.pid)
        run0 = proc_runtime_seconds(self.server.pid)
        sys0 = system_cpu_seconds()
        pub_cpu0 = time.process_time()
        try:
            first_ns, last_ns = await self._publish(ws, count, rate)
            await self._wait_for(
                lambda: all(phase_id in w.done for w in self.workers),
                STALL_SECONDS, f"{name} deliveries",
                moving=lambda: sum(w.progress for w in self.workers))
        except TimeoutError as exc:
            result.timed_out = True
            result.errors.append(str(exc))
            for w in self.workers:
                w.pipe.send(("collect", phase_id))
            await self._wait_for(lambda: all(phase_id in w.done for w in self.workers), 10,
                                 f"{name} collect")
            first_ns = last_ns = 0
        cpu1 = proc_cpu_seconds(self.server.pid)
        result.server_runtime_s = proc_runtime_seconds(self.server.pid) - run0
        busy = system_cpu_seconds() - sys0
        result.publisher_cpu_s = time.process_time() - pub_cpu0
        result.server_cpu_s = cpu1 - cpu0
        reports = [w.done[phase_id] for w in self.workers]
        end_ns = max(r["last_ns"] for r in reports)
        if first_ns and end_ns > first_ns:
            result.elapsed_s = (end_ns - first_ns) / 1e9
            result.publish_s = (last_ns - first_ns) / 1e9
        lost_cum = sum(r["lost"] for r in reports)
        result.lost = lost_cum - lost_before
        self._lost_cum = lost_cum
        result.short_subscribers = sum(r["short"] for r in reports)
        closed: Counter[str] = Counter()
        for r in reports:
            closed.update(r["closed"])
            result.errors.extend(r["errors"])
        result.closed = dict(closed)
        result.publish_errors = len(self.publish_errors) - errors_before
        result.errors.extend(self.publish_errors[errors_before:errors_before + 5])
        result.loadgen_cpu_s = sum(r["cpu"] for r in reports) + result.publisher_cpu_s
        result.other_cpu_s = max(0.0, busy - result.server_cpu_s - result.loadgen_cpu_s)
        if latency:
            values = sorted(v for r in reports for v in r["latencies"])
            result.latency_samples = len(values)
            result.latency_ms = {
                "p50": round(percentile(values, 0.50) / 1e6, 3),
                "p90": round(percentile(values, 0.90) / 1e6, 3),
                "p99": round(percentile(values, 0.99) / 1e6, 3),
                "max": round(values[-1] / 1e6, 3) if values else 0.0,
            }
        note = f"{result.deliveries_per_s:,.0f} deliveries/s"
        if latency:
            note += f", p99 {result.latency_ms.get('p99', 0):.2f} ms"
        if result.lost:
            note += f", LOST {result.lost}"
        self.progress.update(count)
        self.progress.finish(note)
        return result

    async def run(self) -> CaseResult:
        args = self.args
        res = self.result
        res.server_pid = self.server.pid
        res.loadavg = os.getloadavg()
        res.rss_start_kib = proc_rss_kib(self.server.pid)
        ticker = asyncio.create_task(self._ticker())
        try:
            t0 = time.perf_counter()
            self.progress.start(f"N={self.n} connect ({res.procs} proc)", self.n)
            self._spawn_workers()
            await self._wait_for(
                lambda: all(w.ready for w in self.workers), 60, "subscribers to connect",
                moving=lambda: self._connected())
            res.connect_s = time.perf_counter() - t0
            connected = self._connected()
            if connected != self.n:
                errors = [e for w in self.workers for e in w.errors]
                raise RuntimeError(f"only {connected} of {self.n} subscribers connected: "
                                   f"{errors[:3]}")
            self.progress.update(connected)
            self.progress.finish(f"{res.connect_s:.1f} s")
            await asyncio.sleep(0.5)  # let the server settle before reading its RSS
            res.rss_idle_kib = proc_rss_kib(self.server.pid)
            async with connect(self.server.ws_url, compression=None, max_size=None,
                               ping_interval=None, close_timeout=2) as ws:
                welcome = orjson.loads(await ws.recv(decode=False))
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"publisher: expected welcome, got {welcome!r}")
                reader = asyncio.create_task(self._read_replies(ws))
                try:
                    res.phases["warmup"] = await self._phase(ws, "warmup", args.warmup, None,
                                                             10, False)
                    for i in range(args.repeat):
                        label = f"throughput {i + 1}/{args.repeat}" if args.repeat > 1 else ""
                        res.throughput_runs.append(await self._phase(
                            ws, "throughput", messages_for(args, self.n), None, 10, False, label))
                    # the best run: the least disturbed by other load on the machine
                    tput = max(res.throughput_runs, key=lambda r: r.deliveries_per_s)
                    res.phases["throughput"] = tput
                    rate = float(args.rate)
                    cap = args.latency_load / self.n
                    if rate > cap:
                        rate = max(1.0, float(int(cap)))
                        self.progress.note(
                            f"  N={self.n}: latency phase at {rate:g} msg/s, not {args.rate:g}: "
                            f"at most {args.latency_load:,.0f} deliveries/s (--latency-load)")
                    if tput.deliveries_per_s and rate * self.n > tput.deliveries_per_s / 2:
                        self.progress.note(
                            f"  N={self.n}: warning: the latency phase asks for more than half "
                            f"the measured throughput; its latency includes queueing")
                    count = max(1, int(rate * args.latency_seconds))
                    sample = 1 if self.n < 10 else 10
                    res.phases["latency"] = await self._phase(ws, "latency", count, rate,
                                                              sample, True)
                finally:
                    reader.cancel()
            res.rss_end_kib = proc_rss_kib(self.server.pid)
        except Exception as exc:  # a failed case is reported, the next N still runs
            res.error = f"{type(exc).__name__}: {exc}"
            self.progress.note(f"  N={self.n}: error: {exc}")
        finally:
            ticker.cancel()
            await self._stop_workers()
        return res

    def _connected(self) -> int:
        return sum(w.connected for w in self.workers)

    async def _stop_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(w.pipe.fileno())
            with contextlib.suppress(OSError, ValueError):
                w.pipe.send(("stop",))
        deadline = time.monotonic() + 10
        for w in self.workers:
            await asyncio.to_thread(w.process.join, max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
            w.process.join(1)
            w.pipe.close()


# -- running and reporting ---------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    import uvicorn
    from websockets.version import version as websockets_version

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "websockets": websockets_version,
        "uvicorn": uvicorn.__version__,
        "orjson": orjson.__version__,
        "clk_tck": CLK_TCK,
    }


def run_case(n: int, args: argparse.Namespace, progress: Progress) -> CaseResult:
    # The server needs a core of its own: on 2 CPUs, a second load-generator
    # process only competes with it (measured: lower and noisier throughput).
    procs = args.procs or (2 if n >= 100 and usable_cpus() > 2 else 1)
    try:
        server = Server(args.serve_arg)
    except (RuntimeError, TimeoutError) as exc:
        return CaseResult(n, procs, error=str(exc))
    progress.note(f"N={n}: tidings serve pid {server.pid} on port {server.port}")
    try:
        return asyncio.run(Controller(server, n, procs, args, progress).run())
    finally:
        status = server.stop()
        if status not in (0, None):
            progress.note(f"  N={n}: tidings serve exited with status {status}")


def messages_for(args: argparse.Namespace, n: int) -> int:
    """Messages of the throughput phase for N subscribers."""
    if args.messages:
        return int(args.messages)
    budget, cap, floor = (50_000, 5_000, 100) if args.quick else (300_000, 20_000, 200)
    return max(floor, min(cap, budget // n))


def _fmt_mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def markdown_table(cases: Sequence[CaseResult]) -> str:
    head = ("| N | messages | deliveries/s | server CPU µs/delivery | server CPU % | "
            "p50 ms | p99 ms | latency rate msg/s | server RSS MiB (anon KiB/conn) | "
            "load-gen CPU s (% of wall) | other CPU % | lost |")
    rows = [head, "|" + "|".join("---:" for _ in range(head.count("|") - 1)) + "|"]
    for case in cases:
        if case.error and "throughput" not in case.phases:
            rows.append(f"| {case.subscribers} | error: {case.error[:80]} |" + " |" * 10)
            continue
        t = case.phases.get("throughput")
        lat = case.phases.get("latency")
        if t is None:
            continue
        cpu_pct = 100 * t.server_cpu_s / t.elapsed_s if t.elapsed_s else 0.0
        lg_pct = 100 * t.loadgen_cpu_s / t.elapsed_s if t.elapsed_s else 0.0
        other_pct = 100 * t.other_cpu_s / t.elapsed_s if t.elapsed_s else 0.0
        lost = t.lost + (lat.lost if lat else 0)
        p50 = f"{lat.latency_ms.get('p50', 0):.2f}" if lat and lat.latency_samples else "-"
        p99 = f"{lat.latency_ms.get('p99', 0):.2f}" if lat and lat.latency_samples else "-"
        rate = f"{lat.rate:g}" if lat and lat.rate else "-"
        tput = f"{t.deliveries_per_s:,.0f}" + (" (lossy)" if t.lost else "")
        rows.append(
            f"| {case.subscribers} | {t.messages} | {tput} | "
            f"{t.server_cpu_us_per_delivery:.2f} | {cpu_pct:.0f} | {p50} | {p99} | {rate} | "
            f"{_fmt_mib(case.rss_idle_kib[0])} ({case.kib_per_connection:.0f}) | "
            f"{t.loadgen_cpu_s:.2f} ({lg_pct:.0f}) | {other_pct:.0f} | {lost} |")
    return "\n".join(rows)


def target_lines(cases: Sequence[CaseResult]) -> list[str]:
    """Issue 7 targets, met or not, for the N that were run."""
    lines: list[str] = []
    for case in cases:
        t = case.phases.get("throughput")
        if t is None:
            continue
        goal = TARGET_CPU_US.get(case.subscribers)
        if goal is not None:
            got = t.server_cpu_us_per_delivery
            verdict = "met" if got <= goal and not t.lost else "NOT met"
            lines.append(f"- N={case.subscribers}: server CPU per delivery <= {goal:g} µs: "
                         f"{verdict} ({got:.2f} µs)")
        p99_goal = TARGET_P99_MS.get(case.subscribers)
        lat = case.phases.get("latency")
        if p99_goal is not None and lat is not None and lat.latency_samples:
            got = lat.latency_ms["p99"]
            at = f"at {lat.rate:g} msg/s"
            if lat.rate != TARGET_P99_RATE:
                at += f", not the {TARGET_P99_RATE:g} msg/s of the target"
            verdict = "met" if got <= p99_goal and lat.rate == TARGET_P99_RATE else "NOT met"
            lines.append(f"- N={case.subscribers}: p99 <= {p99_goal:g} ms at "
                         f"{TARGET_P99_RATE:g} msg/s: {verdict} ({got:.2f} ms {at})")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fanout",
        description="Fan-out benchmark of tidings serve: 1 publisher, N websocket subscribers.")
    parser.add_argument("--quick", action="store_true",
                        help="N = 1 and 100, fewer messages: a run of under a minute")
    parser.add_argument("--subscribers", type=int, nargs="+", default=None, metavar="N",
                        help="subscriber counts to run (default 1 100 1000; --quick: 1 100)")
    parser.add_argument("--messages", type=int, default=None, metavar="M",
                        help="messages of the throughput phase (default: about 300,000 "
                             "deliveries per N, at most 20,000 messages; --quick: 50,000/5,000)")
    parser.add_argument("--rate", type=float, default=TARGET_P99_RATE,
                        help="messages/s of the latency phase (default 200, lowered for large "
                             "N by --latency-load)")
    parser.add_argument("--latency-load", type=float, default=20_000, metavar="D",
                        help="highest deliveries/s (rate x N) of the latency phase (default "
                             "20,000, the load of the N=100 target; a delivery costs server and "
                             "load generator several times more CPU at a low rate than at full "
                             "speed, so a higher load measures queueing, not latency)")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help="length of the latency phase (default 5; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="messages published before measuring (default 100; --quick: 50)")
    parser.add_argument("--procs", type=int, default=0,
                        help="load-generator processes for the subscribers (default: 2 for "
                             "N >= 100 on more than 2 CPUs, else 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the throughput phase this many times and report the best "
                             "(all runs are in the JSON)")
    parser.add_argument("--window", type=int, default=100,
                        help="publishes in flight (awaiting their reply) at most")
    parser.add_argument("--max-ahead", type=int, default=500,
                        help="messages the publisher may be ahead of the slowest subscriber "
                             "(keeps every outbox under the 1,000-frame disconnect limit)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `tidings serve` (repeatable), "
                             "e.g. --serve-arg=--history-size=0")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if sys.platform != "linux":
        print("benchmarks.fanout reads /proc: Linux only", file=sys.stderr)
        return 2
    quick: bool = args.quick
    subscribers: list[int] = args.subscribers or ([1, 100] if quick else [1, 100, 1000])
    if any(n < 1 for n in subscribers):
        print("--subscribers: every N must be >= 1", file=sys.stderr)
        return 2
    if (args.repeat < 1 or args.window < 1 or args.max_ahead < 1 or args.rate <= 0
            or args.latency_load <= 0):
        print("--repeat, --window, --max-ahead, --rate and --latency-load must be positive",
              file=sys.stderr)
        return 2
    if args.latency_seconds is None:
        args.latency_seconds = 2.0 if quick else 5.0
    if args.warmup is None:
        args.warmup = 50 if quick else 100
    progress = Progress(enabled=not args.no_progress)
    facts = machine_facts()
    progress.note(f"fan-out benchmark: {facts['cpu_model']}, {facts['cpus_usable']} CPUs, "
                  f"Python {facts['python']}, load average {os.getloadavg()[0]:.2f}")
    started = time.time()
    cases: list[CaseResult] = []
    try:
        for n in subscribers:
            cases.append(run_case(n, args, progress))
    except KeyboardInterrupt:
        progress.note("interrupted")
    table = markdown_table(cases)
    print(table)
    targets = target_lines(cases)
    if targets:
        print("\nTargets (issue 7):")
        print("\n".join(targets))
    if args.json_out:
        report = {
            "benchmark": "fanout",
            "command": "python -m benchmarks.fanout " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": facts,
            "settings": {
                "channel": CHANNEL, "data_bytes": DATA_BYTES, "rate": args.rate,
                "latency_seconds": args.latency_seconds, "latency_load": args.latency_load,
                "warmup": args.warmup,
                "window": args.window, "max_ahead": args.max_ahead,
                "serve_args": args.serve_arg, "procs": args.procs or "auto",
                "repeat": args.repeat,
            },
            "cases": [c.to_dict() for c in cases],
            "targets": targets,
            "table_markdown": table,
        }
        Path(args.json_out).write_text(
            orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n", "utf-8")
    failed = any(c.error for c in cases) or len(cases) < len(subscribers)
    lossy = any(p.lost for c in cases for p in [*c.phases.values(), *c.throughput_runs])
    return 1 if failed or lossy else 0


if __name__ == "__main__":
    sys.exit(main())
