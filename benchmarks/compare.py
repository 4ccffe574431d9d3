"""tidings side by side with its peers, in one run on one machine (issue 7).

Every stack is a server started here as a subprocess on a free port: the peer
servers of ``benchmarks/peers/`` (a bare ``websockets`` server with
``websockets.broadcast``, FastAPI + uvicorn with a loop of ``send_text``,
FastAPI + encode/broadcaster on memory and on Redis, fastapi-distributed-websocket,
python-socketio) and tidings itself (``tidings serve`` on memory and on Redis,
and tidings embedded in the FastAPI app of ``examples/fastapi_app.py`` under
uvicorn, the plain ASGI path). One load generator (``benchmarks/loadgen.py``:
bare asyncio websocket clients that count frames and parse a sample) drives them
all:

- **fan-out** at N = 1, 100, 1000 subscribers of one channel (one server per
  stack, subscribers added between the sizes): a warm-up, then M messages of
  ~100 bytes of JSON at full speed from one publisher. Server CPU per delivery
  is the utime+stime of the server process (and its children) from
  ``/proc/<pid>/stat`` over the phase, divided by the deliveries;
  deliveries/s is N*M over first publish -> last frame received. Delivery must
  be lossless: each subscriber counts its frames and checks the ``seq`` of a
  sample; the publisher is paced to stay at most ``--max-ahead`` messages ahead
  of the slowest subscriber.
- **latency** at N = 100, 200 msg/s: p50/p99 of publish -> receive.
- **idle memory** and **connect rate**: on a fresh server, 2,000 subscribed idle
  connections; RssAnon growth per connection and connections/s while opening them.
- ``--huge``: 50,000 idle connections to ``tidings serve``, client sockets spread
  over 127.0.0.x source addresses, RLIMIT_NOFILE raised as far as the machine
  allows; RSS and connect rate.

The publisher sends fire-and-forget to each stack's publish socket (``/pub`` of a
peer; tidings' raw stream ``/ws/pub/<channel>``), while tidings subscribers use
the native protocol (``/ws``: welcome, subscribe, reply, then publication
envelopes). Reported besides: the load generator's CPU and the CPU the rest of
the machine used meanwhile ("other CPU", from ``/proc/stat``), and the Redis
server's CPU for the Redis stacks. Linux only.

    python -m benchmarks.compare [--quick] [--stacks KEY ...] [--subscribers N ...]
                                 [--huge] [--json FILE]

Progress goes to stderr, markdown tables and the issue 7 targets to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import IO, Any

import orjson

from benchmarks.fanout import (
    CLK_TCK,
    Progress,
    ServerProcess,
    machine_facts,
    pad_for,
    percentile,
    proc_runtime_seconds,
    system_cpu_seconds,
)
from benchmarks.loadgen import (
    Publisher,
    client_frame,
    loop_name,
    raise_nofile,
    run_fast,
    watch_pipe,
    worker_main,
)

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = "bench/fanout"
DATA_BYTES = 100
STALL_SECONDS = 15.0
REDIS_URL = os.environ.get("TIDINGS_REDIS_URL", "redis://127.0.0.1:6379/0")

# issue 7 targets
T_CPU_US = {1000: 2.5, 100: 4.0, 1: 4.0}
T_P99_MS = 2.0
T_IDLE_KIB = 10.0
T_EMBEDDED_US = 8.0
T_REDIS_N1_RATIO = 10.0
T_REDIS_N1000_RATIO = 1.3
T_HUGE_CONNS = 50_000
T_HUGE_RSS_MIB = 1024.0


# -- the stacks -----------------------------------------------------------------------


@dataclass
class Stack:
    key: str
    label: str
    argv: Callable[[int, str], list[str]]  # (port, run tag) -> command
    kind: str  # raw | fdw | tidings | socketio: the subscribe steps and frame shapes
    sub_path: str = "/sub"
    pub_path: str = "/pub"
    sizes: tuple[int, ...] = (1, 100, 1000)
    redis: bool = False
    peer: bool = True
    requires: tuple[str, ...] = ("fastapi",)  # modules the server imports (the bench extra)


def _peer(module: str, *extra: str) -> Callable[[int, str], list[str]]:
    def argv(port: int, tag: str) -> list[str]:
        args = [arg.replace("{tag}", tag) for arg in extra]
        return [sys.executable, "-m", f"benchmarks.peers.{module}", "--port", str(port), *args]
    return argv


def _tidings(*extra: str) -> Callable[[int, str], list[str]]:
    def argv(port: int, tag: str) -> list[str]:
        args = [arg.replace("{tag}", tag) for arg in extra]
        return [sys.executable, "-m", "tidings.server.cli", "serve", "--port", str(port),
                "--log-level", "warning", *args]
    return argv


def _tidings_fastapi(*extra: str) -> Callable[[int, str], list[str]]:
    def argv(port: int, tag: str) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port",
                str(port), "--log-level", "warning", *extra]
    return argv


STACKS: dict[str, Stack] = {s.key: s for s in [
    Stack("picows", "picows server, loop of `transport.send`", _peer("picows_loop"), "raw",
          requires=("picows",)),
    Stack("websockets", "`websockets` server + `websockets.broadcast`",
          _peer("websockets_broadcast"), "raw", requires=("websockets",)),
    Stack("fastapi-loop", "FastAPI + uvicorn, loop of `await ws.send_text`",
          _peer("fastapi_loop"), "raw"),
    Stack("broadcaster", "FastAPI + encode/broadcaster (memory)",
          _peer("fastapi_broadcaster"), "raw", requires=("fastapi", "broadcaster")),
    Stack("fdw", "fastapi-distributed-websocket (memory)", _peer("fastapi_distributed"), "fdw",
          requires=("fastapi", "distributed_websocket")),
    Stack("socketio", "python-socketio room emit", _peer("socketio_room"), "socketio",
          sub_path="/socket.io/?EIO=4&transport=websocket&role=sub",
          pub_path="/socket.io/?EIO=4&transport=websocket&role=pub", requires=("socketio",)),
    Stack("broadcaster-redis", "broadcaster with Redis",
          _peer("fastapi_broadcaster", "--url", REDIS_URL, "--channel", "bench-{tag}"), "raw",
          sizes=(1,), redis=True, requires=("fastapi", "broadcaster", "redis")),
    Stack("tidings", "**tidings serve** (memory)", _tidings(), "tidings",
          sub_path="/ws", pub_path=f"/ws/pub/{CHANNEL}", peer=False, requires=()),
    Stack("tidings-fastapi", "**tidings in FastAPI** (uvicorn, `hub.router`)", _tidings_fastapi(),
          "tidings", sub_path="/rt/ws", pub_path=f"/rt/ws/pub/{CHANNEL}", peer=False),
    Stack("tidings-fastapi-direct",
          "**tidings in FastAPI**, uvicorn `--ws tidings.server.wsproto:DirectWSProtocol`",
          _tidings_fastapi("--ws", "tidings.server.wsproto:DirectWSProtocol"),
          "tidings", sub_path="/rt/ws", pub_path=f"/rt/ws/pub/{CHANNEL}", peer=False),
    Stack("tidings-redis", "**tidings serve --broker redis**",
          _tidings("--broker", f"{REDIS_URL}?prefix=bench{{tag}}"), "tidings",
          sub_path="/ws", pub_path=f"/ws/pub/{CHANNEL}", sizes=(1, 1000), redis=True,
          peer=False, requires=("redis",)),
]}
QUICK_STACKS = ("picows", "websockets", "fastapi-loop", "tidings", "tidings-fastapi",
                "tidings-fastapi-direct")

SUB_STEPS: dict[str, list[tuple[str, bytes]]] = {
    "raw": [("recv", b'{"type":"subscribed"')],
    "fdw": [("recv", b'{"type":"subscribed"')],
    "tidings": [("recv", b'{"type":"welcome"'),
                ("send", orjson.dumps({"type": "subscribe", "id": 1, "channel": CHANNEL})),
                ("recv", b'{"type":"reply"')],
    "socketio": [("recv", b"0{"), ("send", b"40"), ("recv", b"40")],
}
PUB_STEPS: dict[str, list[tuple[str, bytes]]] = {
    "raw": [], "fdw": [], "tidings": [],
    "socketio": [("recv", b"0{"), ("send", b"40"), ("recv", b"40")],
}
PREFIX = {"raw": b'{"ts"', "fdw": b'{"ts"', "tidings": b'{"type":"publication"',
          "socketio": b'42["msg"'}
EXTRACT = {"raw": "raw", "fdw": "raw", "tidings": "tidings", "socketio": "socketio"}


def publication(kind: str, ts: int, seq: int, pad: str) -> bytes:
    if kind == "fdw":
        return orjson.dumps({"type": "send", "topic": "bench", "ts": ts, "seq": seq, "pad": pad})
    body = orjson.dumps({"ts": ts, "seq": seq, "pad": pad})
    if kind == "socketio":
        return b'42["pub",' + body + b"]"
    return body


# -- /proc ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as file:
                out.extend(int(c) for c in file.read().split())
    except OSError:
        pass
    return out


def proc_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its descendants, in seconds."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def tree_runtime_seconds(pid: int) -> float:
    """Scheduler CPU time (schedstat, ns-exact) of a process and its descendants."""
    return sum(proc_runtime_seconds(p) for p in proc_tree(pid))


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in KiB of a process and its descendants."""
    rss = anon = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as file:
                for line in file:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
        except OSError:
            continue
    return rss, anon


def redis_pid() -> int | None:
    try:
        import redis
    except ImportError:
        return None
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        pid = int(client.info("server")["process_id"])
        client.close()
    except Exception:
        return None
    return pid if os.path.exists(f"/proc/{pid}/stat") else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a server under test -----------------------------------------------------------------


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



# -- results ---------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    n: int
    messages: int
    rate: float | None = None
    elapsed_s: float = 0.0
    deliveries: int = 0
    lost: int = 0
    short: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    server_cpu_s: float = 0.0
    server_sched_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    timed_out: bool = False

    @property
    def per_s(self) -> float:
        return (self.deliveries - self.lost) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def us(self) -> float:
        done = self.deliveries - self.lost
        return self.server_cpu_s * 1e6 / done if done > 0 else 0.0

    def pct(self, cpu: float) -> float:
        return 100 * cpu / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "subscribers": self.n, "messages": self.messages,
            "rate": self.rate, "elapsed_s": round(self.elapsed_s, 4),
            "deliveries": self.deliveries, "lost": self.lost, "short_subscribers": self.short,
            "closed": self.closed, "errors": self.errors[:10],
            "deliveries_per_s": round(self.per_s, 1),
            "server_cpu_s": round(self.server_cpu_s, 3),
            "server_cpu_us_per_delivery": round(self.us, 3),
            "server_cpu_percent": round(self.pct(self.server_cpu_s), 1),
            "server_schedstat_us_per_delivery": round(
                self.server_sched_s * 1e6 / (self.deliveries - self.lost), 3)
            if self.deliveries > self.lost else 0.0,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 3),
            "loadgen_cpu_percent": round(self.pct(self.loadgen_cpu_s), 1),
            "loadgen_us_per_delivery": round(self.loadgen_cpu_s * 1e6 / self.deliveries, 3)
            if self.deliveries else 0.0,
            "broker_cpu_s": round(self.broker_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3),
            "other_cpu_percent": round(self.pct(self.other_cpu_s), 1),
            "latency_ms": self.latency_ms, "latency_samples": self.samples,
            "timed_out": self.timed_out,
        }


@dataclass
class Idle:
    connections: int
    opened: int = 0
    failed: int = 0
    seconds: float = 0.0
    rss0_kib: tuple[int, int] = (0, 0)
    rss1_kib: tuple[int, int] = (0, 0)
    server_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    nofile: tuple[int, int] = (0, 0)
    note: str = ""

    @property
    def per_s(self) -> float:
        return self.opened / self.seconds if self.seconds > 0 else 0.0

    @property
    def kib_per_conn(self) -> float:
        return (self.rss1_kib[1] - self.rss0_kib[1]) / self.opened if self.opened else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections, "opened": self.opened, "failed": self.failed,
            "seconds": round(self.seconds, 3), "connections_per_s": round(self.per_s, 1),
            "rss_before_kib": self.rss0_kib[0], "rss_after_kib": self.rss1_kib[0],
            "rss_anon_before_kib": self.rss0_kib[1], "rss_anon_after_kib": self.rss1_kib[1],
            "rss_anon_kib_per_connection": round(self.kib_per_conn, 2),
            "rss_kib_per_connection": round((self.rss1_kib[0] - self.rss0_kib[0])
                                            / self.opened, 2) if self.opened else 0.0,
            "server_cpu_us_per_connection": round(self.server_cpu_s * 1e6 / self.opened, 1)
            if self.opened else 0.0,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3), "errors": self.errors,
            "nofile": list(self.nofile), "note": self.note,
        }


@dataclass
class StackResult:
    stack: Stack
    phases: list[Phase] = field(default_factory=list)
    idle: Idle | None = None
    huge: Idle | None = None
    errors: list[str] = field(default_factory=list)

    def throughput(self, n: int) -> Phase | None:
        return next((p for p in self.phases if p.name == "throughput" and p.n == n), None)

    def latency(self) -> Phase | None:
        return next((p for p in self.phases if p.name == "latency"), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack.key, "label": self.stack.label, "peer": self.stack.peer,
            "phases": [p.to_dict() for p in self.phases],
            "idle": self.idle.to_dict() if self.idle else None,
            "huge": self.huge.to_dict() if self.huge else None,
            "errors": self.errors,
        }


# -- the controller ---------------------------------------------------------------------


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
    """One started server of a stack, its load-generator processes and a publisher."""

    def __init__(self, stack: Stack, opts: argparse.Namespace, progress: Progress,
                 procs: int = 1, nofile: int = 0) -> None:
        self.stack = stack
        self.opts = opts
        self.progress = progress
        self.procs = procs
        self.nofile = nofile
        self.tag = uuid.uuid4().hex[:8]
        self.server: Server | None = None
        self.workers: list[Worker] = []
        self.wake = asyncio.Event()
        self.pub: Publisher | None = None
        self.phase_id = 0
        self.seq = 0
        self.n = 0
        self.pad = pad_for(DATA_BYTES)
        self.redis_pid = redis_pid() if stack.redis else None

    # plumbing

    async def start(self) -> None:
        self.server = Server(self.stack, self.tag)
        await asyncio.to_thread(self.server.wait_ready)
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.procs):
            parent, child = ctx.Pipe()
            spec = {
                "host": "127.0.0.1", "port": self.server.port, "sub_path": self.stack.sub_path,
                "steps": SUB_STEPS[self.stack.kind], "prefix": PREFIX[self.stack.kind],
                "extract": EXTRACT[self.stack.kind], "ping_text": self.stack.kind == "socketio",
                "offset": i * 1_000_000, "nofile": self.nofile,
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
        if self.server is not None and self.server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.server.proc.returncode}: "
                               f"{self.server.output()}")

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

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self.pub is not None and self.pub.transport is not None:
            self.pub.transport.abort()
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
        if self.server is not None:
            status = await asyncio.to_thread(self.server.stop)
            if status not in (0, None, -signal.SIGTERM):
                self.progress.note(f"  {self.stack.key}: server exited with status {status}")

    # scenarios

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

    async def open_publisher(self) -> None:
        assert self.server is not None
        loop = asyncio.get_running_loop()
        kind = self.stack.kind
        pub = Publisher("127.0.0.1", self.server.port, self.stack.pub_path, PUB_STEPS[kind],
                        kind == "socketio")
        await loop.create_connection(lambda: pub, "127.0.0.1", self.server.port)
        await asyncio.wait_for(pub.ready, 30)
        self.pub = pub

    async def _publish(self, count: int, rate: float | None, max_s: float) -> tuple[int, int]:
        """Publish up to ``count`` messages; (first send time in ns, messages sent)."""
        pub = self.pub
        assert pub is not None
        kind = self.stack.kind
        pad = self.pad
        # at most --max-ahead messages and --max-backlog deliveries not yet received
        ahead = max(2, min(self.opts.max_ahead, self.opts.max_backlog // max(1, self.n)))
        wake = self.wake
        interval = int(1e9 / rate) if rate else 0
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        deadline = t0 + int(max_s * 1e9)
        first = 0
        sent = 0
        last_seen = (-1, -1)
        stall = loop.time() + STALL_SECONDS
        # unpaced, frames go out 32 to a write, as a pipelining client sends them:
        # a system call per frame would make the publisher the limit at N = 1
        frames: list[bytes] = []
        for i in range(count):
            if interval:
                due = t0 + i * interval
                now = time.perf_counter_ns()
                if due > now:
                    await asyncio.sleep((due - now) / 1e9)
            elif i & 31 == 0:
                if frames:
                    pub.send_frames(frames)
                    frames.clear()
                if i and time.perf_counter_ns() > deadline:
                    break
                await asyncio.sleep(0)
            while i - self._min_progress() >= ahead or not pub.writable.is_set():
                if frames:
                    pub.send_frames(frames)
                    frames.clear()
                self.check_alive()
                seen = (self._min_progress(), pub.writable.is_set())
                if seen != last_seen:
                    last_seen, stall = seen, loop.time() + STALL_SECONDS
                elif loop.time() > stall:
                    raise TimeoutError(f"publisher stalled at message {i} (slowest subscriber "
                                       f"at {self._min_progress()})")
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.05)
            if not pub.alive:
                raise RuntimeError(f"the server closed the publisher ({pub.close_code})")
            ts = time.perf_counter_ns()
            self.seq += 1
            frames.append(client_frame(publication(kind, ts, self.seq, pad)))
            if interval:
                pub.send_frames(frames)
                frames.clear()
            sent += 1
            if not first:
                first = ts
        if frames:
            pub.send_frames(frames)
        return first, sent

    async def phase(self, name: str, count: int, *, rate: float | None = None,
                    max_s: float = 1e9, sample: int = 10, latency: bool = False,
                    warmup: bool = False) -> Phase:
        assert self.server is not None
        self.phase_id += 1
        pid = self.phase_id
        base = self.seq
        result = Phase(name, self.n, count, rate)
        interval = 0.001 if rate is None else 0.05
        for w in self.workers:
            w.progress = 0
            w.pipe.send(("phase", pid, base, count, sample, latency, warmup, interval))
        await self.wait_for(lambda: all(pid in w.started for w in self.workers), 30,
                            f"{name} start")
        label = f"{self.stack.key} N={self.n} {name}" + (f" @{rate:g}/s" if rate else "")
        self.progress.start(label, count)
        tick = asyncio.create_task(self._tick(self._min_progress))
        cpu0 = tree_cpu_seconds(self.server.pid)
        run0 = tree_runtime_seconds(self.server.pid)
        red0 = tree_cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        sys0 = system_cpu_seconds()
        me0 = time.process_time()
        first = 0
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
            tick.cancel()
        result.server_cpu_s = tree_cpu_seconds(self.server.pid) - cpu0
        result.server_sched_s = tree_runtime_seconds(self.server.pid) - run0
        if self.redis_pid:
            result.broker_cpu_s = tree_cpu_seconds(self.redis_pid) - red0
        busy = system_cpu_seconds() - sys0
        reports = [w.done[pid] for w in self.workers]
        result.loadgen_cpu_s = sum(r["cpu"] for r in reports) + time.process_time() - me0
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
            values = sorted(v for r in reports for v in r["latencies"])
            result.samples = len(values)
            result.latency_ms = {
                "p50": round(percentile(values, 0.50) / 1e6, 3),
                "p90": round(percentile(values, 0.90) / 1e6, 3),
                "p99": round(percentile(values, 0.99) / 1e6, 3),
                "max": round(values[-1] / 1e6, 3) if values else 0.0,
            }
        if warmup:
            note = "ok" if not result.short else f"{result.short} subscribers missed the end"
        else:
            note = f"{result.per_s:,.0f} deliveries/s, {result.us:.2f} µs/delivery"
            if latency:
                note += (f", p50 {result.latency_ms.get('p50', 0):.2f} "
                         f"p99 {result.latency_ms.get('p99', 0):.2f} ms")
            if result.lost:
                note += f", LOST {result.lost}"
        self.progress.update(result.messages)
        self.progress.finish(note)
        return result


# -- scenarios --------------------------------------------------------------------------


def messages_for(opts: argparse.Namespace, n: int) -> int:
    """Messages of a throughput phase: enough that even the fastest stack runs for
    about ``--max-seconds`` (the publisher stops at that time cap), so that the
    10 ms ticks of utime+stime stay well under 1 % of the server's CPU time."""
    budget = int(1_500_000 * opts.max_seconds)
    return max(100, min(100_000, budget // n))


async def fanout(stack: Stack, opts: argparse.Namespace, progress: Progress,
                 res: StackResult) -> None:
    sizes = sorted(set(s for s in stack.sizes if s in opts.subscribers))
    want_latency = opts.latency_seconds > 0 and 100 in opts.subscribers
    steps = sorted(set(sizes) | ({100} if want_latency else set()))
    if not steps:
        return
    session = Session(stack, opts, progress)
    try:
        await session.start()
        for n in steps:
            # the latency phase times the subscribers added for N = 100 by the
            # kernel's receive time (the N = 1 one reads through uvloop: its
            # phase is not slowed by the Python read path; its frames are not timed)
            await session.connect(n - session.n, f"{stack.key} connect N={n}",
                                  stamped=want_latency and n == 100)
            if session.n < n:
                raise RuntimeError(f"only {session.n} of {n} subscribers connected")
            if session.pub is None or not session.pub.alive:
                if session.pub is not None:  # e.g. a ping timeout after an overload
                    res.errors.append(f"N={n}: publisher reopened, the server had closed it "
                                      f"({session.pub.close_code})")
                    session.pub = None
                await session.open_publisher()
            warm = await session.phase("warmup", opts.warmup, warmup=True)
            if warm.short or warm.timed_out:
                raise RuntimeError(f"warm-up: {warm.short} subscribers did not get every "
                                   f"message ({warm.errors[:2]})")
            if n in sizes:
                res.phases.append(await best_of(opts.repeat, partial(
                    session.phase, "throughput", messages_for(opts, n),
                    max_s=opts.max_seconds)))
            if n == 100 and want_latency:
                rate = opts.rate
                res.phases.append(await best_of(opts.repeat, partial(
                    session.phase, "latency", max(1, int(rate * opts.latency_seconds)),
                    rate=rate, sample=1, latency=True)))
    except Exception as exc:
        res.errors.append(f"fan-out: {type(exc).__name__}: {exc}")
        progress.note(f"  {stack.key}: fan-out error: {exc}")
    finally:
        await session.close()


async def best_of(repeat: int, run: Callable[[], Awaitable[Phase]]) -> Phase:
    """Run a phase ``repeat`` times and keep the best run, as timeit does (the
    machine's other work only ever adds): the lowest server CPU per delivery,
    or for a latency phase the lowest p99. Losses are never hidden: a run that
    lost messages or timed out is the one kept."""
    runs = [await run() for _ in range(repeat)]
    bad = [p for p in runs if p.lost or p.timed_out or p.errors]
    if bad:
        return bad[0]
    if runs[0].latency_ms:
        return min(runs, key=lambda p: p.latency_ms.get("p99", float("inf")))
    return min(runs, key=lambda p: p.us)


async def idle(stack: Stack, opts: argparse.Namespace, progress: Progress, n: int,
               huge: bool = False) -> Idle:
    """Fresh server, a few warm-up connections, then ``n`` more held idle."""
    result = Idle(n)
    procs, sources, nofile = 1, [], 0
    if huge:
        nofile = n + 4096
        result.nofile = raise_nofile(nofile)  # inherited by the server
        if result.nofile[0] < nofile:
            cap = result.nofile[0] - 512
            result.note = (f"RLIMIT_NOFILE is {result.nofile[0]} (hard {result.nofile[1]}): "
                           f"{cap} connections at most, not {n}")
            n = result.connections = cap
        per_source = 25_000  # loopback has ~28k ephemeral ports per source address
        procs = max(1, -(-n // 12_500))
        sources = [f"127.0.0.{2 + i}" for i in range(max(procs, -(-n // per_source)))]
    session = Session(stack, opts, progress, procs=procs, nofile=nofile)
    try:
        await session.start()
        assert session.server is not None
        await session.connect(10, f"{stack.key} idle warm-up", sources)
        await asyncio.sleep(0.3)
        result.rss0_kib = tree_rss_kib(session.server.pid)
        cpu0 = tree_cpu_seconds(session.server.pid)
        sys0 = system_cpu_seconds()
        rep = await session.connect(n, f"{stack.key} idle x{n:,}", sources,
                                    concurrency=200 if huge else 100)
        result.server_cpu_s = tree_cpu_seconds(session.server.pid) - cpu0
        result.loadgen_cpu_s = rep["cpu"]
        result.other_cpu_s = max(0.0, system_cpu_seconds() - sys0 - result.server_cpu_s
                                 - result.loadgen_cpu_s)
        result.opened, result.failed = rep["ok"], rep["failed"]
        result.seconds, result.errors = rep["seconds"], rep["errors"]
        await asyncio.sleep(1.0)  # let the server settle before reading its RSS
        result.rss1_kib = tree_rss_kib(session.server.pid)
    except Exception as exc:
        result.note = (result.note + "; " if result.note else "") + f"{type(exc).__name__}: {exc}"
        progress.note(f"  {stack.key}: idle error: {exc}")
    finally:
        await session.close()
    return result


async def run_stack(stack: Stack, opts: argparse.Namespace, progress: Progress) -> StackResult:
    res = StackResult(stack)
    missing = [m for m in stack.requires if importlib.util.find_spec(m) is None]
    if missing:
        res.errors.append(f"skipped: {', '.join(missing)} not installed "
                          "(pip install -e '.[bench]')")
        progress.note(f"  {stack.key}: {res.errors[-1]}")
        return res
    if stack.redis and redis_pid() is None:
        res.errors.append(f"skipped: no Redis server at {REDIS_URL} (TIDINGS_REDIS_URL)")
        progress.note(f"  {stack.key}: {res.errors[-1]}")
        return res
    if opts.idle > 0:
        res.idle = await idle(stack, opts, progress, opts.idle)
        if res.idle.note:
            res.errors.append(f"idle: {res.idle.note}")
    await fanout(stack, opts, progress, res)
    return res


# -- reporting --------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None or value == 0 else fmt.format(value)


def main_table(results: Sequence[StackResult]) -> str:
    head = ("| stack | server CPU µs per delivery (N = 1000) | deliveries/s seen (N = 1000) | "
            "idle KiB/conn | p99 ms at N=100, 200 msg/s (p50) | µs/delivery N = 1 | "
            "µs/delivery N = 100 | connects/s | load-gen CPU % | other CPU % | lost |")
    rows = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in results:
        big = r.throughput(1000)
        label = r.stack.label
        if big is None:
            sizes = [p.n for p in r.phases if p.name == "throughput"]
            big = r.throughput(max(sizes)) if sizes else None
            if big is not None:
                label += f", N = {big.n}"
        lat = r.latency()
        p99 = (f"{lat.latency_ms['p99']:.2f} ({lat.latency_ms['p50']:.2f})"
               if lat and lat.samples else "-")
        n1, n100 = r.throughput(1), r.throughput(100)
        phases = [p for p in r.phases if p.name != "warmup"]
        lost: int | str = sum(p.lost for p in phases)
        if any(p.timed_out for p in phases):
            lost = f"{lost} (timed out)"
        lg = max((p.pct(p.loadgen_cpu_s) for p in phases if p.name == "throughput"), default=0)
        other = max((p.pct(p.other_cpu_s) for p in phases), default=0)
        idle_kib = _f(r.idle.kib_per_conn, "{:.1f}") if r.idle and r.idle.opened else "-"
        conn_s = _f(r.idle.per_s, "{:,.0f}") if r.idle and r.idle.opened else "-"
        if r.errors and not phases:
            label += " (error)"
        rows.append(
            f"| {label} | {_f(big.us if big else None)} | "
            f"{_f(big.per_s if big else None, '{:,.0f}')} | {idle_kib} | {p99} | "
            f"{_f(n1.us if n1 else None)} | {_f(n100.us if n100 else None)} | {conn_s} | "
            f"{lg:.0f} | {other:.0f} | {lost if phases else '-'} |")
    return "\n".join(rows)


def detail_table(results: Sequence[StackResult]) -> str:
    head = ("| stack | phase | N | messages | deliveries/s | server µs/delivery | server CPU % | "
            "load-gen CPU % | broker CPU % | other CPU % | p50 / p99 ms | lost |")
    rows = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for r in results:
        for p in r.phases:
            lat = (f"{p.latency_ms['p50']:.2f} / {p.latency_ms['p99']:.2f}"
                   if p.samples else "-")
            rate = f" @{p.rate:g}/s" if p.rate else ""
            rows.append(
                f"| {r.stack.key} | {p.name}{rate} | {p.n} | {p.messages} | {p.per_s:,.0f} | "
                f"{p.us:.2f} | {p.pct(p.server_cpu_s):.0f} | {p.pct(p.loadgen_cpu_s):.0f} | "
                f"{p.pct(p.broker_cpu_s):.0f} | {p.pct(p.other_cpu_s):.0f} | {lat} | "
                f"{p.lost}{' (timed out)' if p.timed_out else ''} |")
    return "\n".join(rows)


def huge_table(results: Sequence[StackResult]) -> str:
    rows = ["| stack | connections opened (asked) | connects/s | server RSS MiB | "
            "RssAnon KiB/conn | server CPU µs/conn | RLIMIT_NOFILE | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        h = r.huge
        if h is None:
            continue
        d = h.to_dict()
        rows.append(f"| {r.stack.key} | {h.opened:,} ({h.connections:,}) | {h.per_s:,.0f} | "
                    f"{h.rss1_kib[0] / 1024:.0f} | {h.kib_per_conn:.1f} | "
                    f"{d['server_cpu_us_per_connection']} | {h.nofile[0]} | {h.note or ''} |")
    return "\n".join(rows)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(results: Sequence[StackResult]) -> list[dict[str, Any]]:
    """Each issue 7 target that this run measured: met or not, with the ratio."""
    by = {r.stack.key: r for r in results}
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, ok: bool, ratio: str) -> None:
        out.append({"target": target, "measured": measured, "met": ok, "ratio": ratio})

    peers = [r for r in results if r.stack.peer and r.throughput(1000)]
    best = min(peers, key=lambda r: r.throughput(1000).us) if peers else None  # type: ignore[union-attr]
    t = by.get("tidings")
    if t is not None:
        for n in (1000, 100, 1):
            p = t.throughput(n)
            if p is None or not p.us:
                continue
            goal = T_CPU_US[n]
            extra = ""
            if n == 1000 and best is not None:
                b = best.throughput(1000)
                assert b is not None
                extra = (f"; {b.us / p.us:.1f}x better than the best peer "
                         f"({best.stack.key}, {b.us:.2f} µs; the target asks 2.6x)")
            add(f"`tidings serve` N = {n}: ≤ {goal:g} µs server CPU per delivery, lossless",
                f"{p.us:.2f} µs, lost {p.lost}", p.us <= goal and not p.lost,
                f"{p.us / goal:.2f}x the target{extra}")
        lat = t.latency()
        if lat is not None and lat.samples:
            p99 = lat.latency_ms["p99"]
            peer_p99 = [(r.latency().latency_ms["p99"], r.stack.key) for r in results  # type: ignore[union-attr]
                        if r.stack.peer and r.latency() and r.latency().samples]  # type: ignore[union-attr]
            extra = ""
            if peer_p99:
                bp, bk = min(peer_p99)
                extra = f"; best peer {bk} {bp:.2f} ms"
            add(f"latency at N = 100, {lat.rate:g} msg/s: p99 ≤ {T_P99_MS:g} ms",
                f"p99 {p99:.2f} ms (p50 {lat.latency_ms['p50']:.2f})",
                p99 <= T_P99_MS and not lat.lost, f"{p99 / T_P99_MS:.2f}x the target{extra}")
        if t.idle is not None and t.idle.opened:
            kib = t.idle.kib_per_conn
            peer_kib = [(r.idle.kib_per_conn, r.stack.key) for r in results
                        if r.stack.peer and r.idle and r.idle.opened]
            extra = ""
            if peer_kib:
                low, name = min(peer_kib)
                extra = f"; best peer {name} {low:.1f} KiB"
            add(f"idle connections: ≤ {T_IDLE_KIB:g} KiB each ({t.idle.opened:,} subscribed)",
                f"{kib:.1f} KiB/conn", kib <= T_IDLE_KIB,
                f"{kib / T_IDLE_KIB:.2f}x the target{extra}")
    for key, how in (("tidings-fastapi-direct", "uvicorn --ws tidings.server.wsproto:"
                                                "DirectWSProtocol"),
                     ("tidings-fastapi", "uvicorn's default websocket protocol")):
        e = by.get(key)
        if e is not None and (p := e.throughput(1000)) is not None and p.us:
            add(f"embedded in FastAPI under uvicorn: ≤ {T_EMBEDDED_US:g} µs per delivery, "
                f"N = 1000 ({how})",
                f"{p.us:.2f} µs, lost {p.lost}", p.us <= T_EMBEDDED_US and not p.lost,
                f"{p.us / T_EMBEDDED_US:.2f}x the target")
    tr, br = by.get("tidings-redis"), by.get("broadcaster-redis")
    if tr is not None and br is not None:
        a, b = tr.throughput(1), br.throughput(1)
        if a is not None and b is not None and a.per_s and b.per_s:
            ratio = a.per_s / b.per_s
            add(f"Redis broker, N = 1: ≥ {T_REDIS_N1_RATIO:g}x the throughput of broadcaster "
                "with Redis",
                f"{a.per_s:,.0f} vs {b.per_s:,.0f} deliveries/s",
                ratio >= T_REDIS_N1_RATIO and not a.lost, f"{ratio:.1f}x")
    if tr is not None and t is not None:
        a, b = tr.throughput(1000), t.throughput(1000)
        if a is not None and b is not None and a.us and b.us:
            ratio = a.us / b.us
            add(f"Redis broker, N = 1000: ≤ {T_REDIS_N1000_RATIO:g}x the per-delivery cost on "
                "memory", f"{a.us:.2f} vs {b.us:.2f} µs", ratio <= T_REDIS_N1000_RATIO
                and not a.lost, f"{ratio:.2f}x")
    h = t.huge if t is not None else None
    if h is not None:
        mib = h.rss1_kib[0] / 1024
        measured = f"{h.opened:,} connections, {mib:.0f} MiB RSS, {h.per_s:,.0f} connects/s"
        if 0 < h.opened < T_HUGE_CONNS:
            per = (h.rss1_kib[0] - h.rss0_kib[0]) / h.opened
            at = (h.rss0_kib[0] + per * T_HUGE_CONNS) / 1024
            measured += f"; {per:.1f} KiB/conn would make {at:,.0f} MiB at {T_HUGE_CONNS:,}"
        add(f"{T_HUGE_CONNS:,} concurrent idle connections, ≤ {T_HUGE_RSS_MIB:g} MiB RSS",
            measured,
            h.opened >= T_HUGE_CONNS and mib <= T_HUGE_RSS_MIB,
            f"{mib / T_HUGE_RSS_MIB:.2f}x the RSS budget"
            + (f" with {h.opened / T_HUGE_CONNS:.0%} of the connections"
               if h.opened < T_HUGE_CONNS else ""))
    return out


def target_lines(items: Sequence[dict[str, Any]]) -> list[str]:
    return [f"- {i['target']}: {_verdict(i['met'])} ({i['measured']}; {i['ratio']})"
            for i in items]


# -- main ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="tidings and its peers side by side: fan-out, latency, idle memory, "
                    "connect rate (issue 7).")
    parser.add_argument("--quick", action="store_true",
                        help=f"stacks {', '.join(QUICK_STACKS)}; N = 1, 100; shorter phases; "
                             "500 idle connections: under a minute")
    parser.add_argument("--stacks", nargs="+", default=None, metavar="KEY",
                        help=f"stacks to run (default: all; keys: {', '.join(STACKS)})")
    parser.add_argument("--subscribers", type=int, nargs="+", default=None, metavar="N",
                        help="fan-out sizes (default 1 100 1000; --quick: 1 100)")
    parser.add_argument("--idle", type=int, default=None, metavar="N",
                        help="idle connections for the memory/connect-rate scenario "
                             "(default 2000; --quick: 500; 0: skip)")
    parser.add_argument("--rate", type=float, default=200.0, help="msg/s of the latency phase")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help="length of the latency phase (default 4; --quick: 1.5; 0: skip)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time cap of one throughput phase (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up messages (default 100)")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run each throughput and latency phase K times and keep the "
                             "best run (losses are never hidden)")
    parser.add_argument("--max-ahead", type=int, default=500,
                        help="messages the publisher may be ahead of the slowest subscriber")
    parser.add_argument("--max-backlog", type=int, default=100_000,
                        help="deliveries the publisher may be ahead of the subscribers "
                             "(default 100,000: with N = 1000, 100 messages)")
    parser.add_argument("--huge", action="store_true",
                        help="also the 50,000 idle connections test (tidings serve; "
                             "--huge-stacks for others)")
    parser.add_argument("--huge-connections", type=int, default=T_HUGE_CONNS, metavar="N")
    parser.add_argument("--huge-stacks", nargs="+", default=["tidings"], metavar="KEY")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return parser


async def _run(opts: argparse.Namespace, stacks: Sequence[Stack],
               progress: Progress) -> list[StackResult]:
    results: list[StackResult] = []
    for stack in stacks:
        progress.note(f"{stack.key}: {stack.label.replace('*', '')}")
        results.append(await run_stack(stack, opts, progress))
    if opts.huge:
        for key in opts.huge_stacks:
            res = next((r for r in results if r.stack.key == key), None)
            if res is None:
                res = StackResult(STACKS[key])
                results.append(res)
            res.huge = await idle(STACKS[key], opts, progress, opts.huge_connections, huge=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if sys.platform != "linux":
        print("benchmarks.compare reads /proc: Linux only", file=sys.stderr)
        return 2
    keys = opts.stacks or (list(QUICK_STACKS) if opts.quick else list(STACKS))
    unknown = [k for k in [*keys, *opts.huge_stacks] if k not in STACKS]
    if unknown:
        print(f"unknown stack(s) {unknown}; known: {', '.join(STACKS)}", file=sys.stderr)
        return 2
    if opts.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    opts.subscribers = opts.subscribers or ([1, 100] if opts.quick else [1, 100, 1000])
    if opts.idle is None:
        opts.idle = 500 if opts.quick else 2000
    if opts.latency_seconds is None:
        opts.latency_seconds = 1.5 if opts.quick else 4.0
    if opts.max_seconds is None:
        opts.max_seconds = 1.0 if opts.quick else 3.0
    if opts.warmup is None:
        opts.warmup = 50 if opts.quick else 100
    progress = Progress(enabled=not opts.no_progress)
    facts = machine_facts()
    versions = _versions()
    facts["loadgen_loop"] = loop_name()
    progress.note(f"compare: {facts['cpu_model']}, {facts['cpus_usable']} CPUs, Python "
                  f"{facts['python']}, load generator on {facts['loadgen_loop']}, "
                  f"load average {os.getloadavg()[0]:.2f}")
    started = time.time()
    load0 = os.getloadavg()
    results: list[StackResult] = []
    try:
        results = run_fast(_run(opts, [STACKS[k] for k in keys], progress))
    except KeyboardInterrupt:
        progress.note("interrupted")
    duration = time.time() - started
    main_md = main_table(results)
    detail_md = detail_table(results)
    print(main_md)
    print()
    print(detail_md)
    if any(r.huge for r in results):
        print()
        print(huge_table(results))
    items = targets(results)
    if items:
        print("\nTargets (issue 7):")
        print("\n".join(target_lines(items)))
    errors = [f"{r.stack.key}: {e}" for r in results for e in r.errors]
    if errors:
        print("\nErrors:")
        print("\n".join(f"- {e}" for e in errors))
    print(f"\n({duration:.0f} s; load average before {load0[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f})")
    if opts.json_out:
        report = {
            "benchmark": "compare",
            "command": "python -m benchmarks.compare " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(duration, 1),
            "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
            "machine": facts, "versions": versions,
            "settings": {k: v for k, v in vars(opts).items() if k != "json_out"},
            "results": [r.to_dict() for r in results],
            "targets": items,
            "table_markdown": main_md, "detail_markdown": detail_md,
        }
        Path(opts.json_out).write_text(
            orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n", "utf-8")
    lossy = any(p.lost for r in results for p in r.phases)
    return 1 if errors or lossy or len(results) < len(keys) else 0


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("tidings", "websockets", "uvicorn", "fastapi", "starlette", "broadcaster",
                 "fastapi-distributed-websocket", "python-socketio", "python-engineio",
                 "redis", "orjson", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


if __name__ == "__main__":
    sys.exit(main())
