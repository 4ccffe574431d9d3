"""A cheap websocket load generator for ``benchmarks.compare``.

The subscribers are bare ``asyncio.Protocol`` websocket clients (RFC 6455, no
extensions): one HTTP upgrade request, then a frame parser that only reads each
frame's 2-10 header bytes, checks that the payload starts with the stack's
publication prefix and counts it. Only every ``sample``-th frame of a subscriber
(staggered by subscriber index), the last frame of a phase and, in the latency
phase, every frame are parsed (orjson) to check their ``seq`` and time them.
That costs a few µs per frame where a full client library costs 6-30 µs, so the
load generator is not what limits the figures.

A worker process (``worker_main``) holds a group of subscribers of one server and
is driven by the controller over a pipe:

- ``("connect", count, sources, concurrency, stamped)``: open ``count`` more
  subscribers (spread over the source addresses ``sources``, e.g. 127.0.0.2
  ...), each one going through the stack's subscribe steps; ``stamped`` ones
  read with ``recvmsg`` and time each read by the kernel's receive timestamp
  (``SO_TIMESTAMPNS``: when the data reached the socket), not by when this
  process got to it (see :class:`StampedTransport`); answers ``("connected", ok)`` every
  100 and ``("connect_done", report)``;
- ``("phase", id, base, target, sample, latency, warmup, interval)``: count
  frames from zero; a subscriber is done at ``target`` frames (warmup: when it
  got the frame with ``seq == base + target``, whatever came before); the
  ``seq`` of a sampled frame must be ``base + count``. Answers ``("started",
  id)``, ``("progress", id, slowest count)`` every ``interval`` s and ``("done",
  id, report)``;
- ``("retarget", id, target)``: the publisher stopped early (time cap);
- ``("collect", id)``: report now, whatever arrived;
- ``("stop",)``.

Timestamps are ``time.perf_counter_ns()`` (CLOCK_MONOTONIC on Linux), comparable
between the processes of one machine; a stamped subscriber's receive time is the
kernel's (see :class:`StampedTransport`), converted to that clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import random
import resource
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection as Pipe
from typing import Any

import orjson

from benchmarks import natsws

__all__ = ["Publisher", "client_frame", "raise_nofile", "upgrade_request", "worker_main"]

perf_ns = time.perf_counter_ns
_randbytes = random.Random().randbytes
loads = orjson.loads

HTTP, STEPS, READY = 0, 1, 2
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked client-to-server frame (FIN set)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = _randbytes(4)  # a fresh key per frame, without a getrandom() system call
    if not n:
        return header + mask
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return header + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE towards ``want``: the hard limit too where allowed (root),
    else the soft limit up to the hard one. The limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft, hard
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
        except (ValueError, OSError):
            pass
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class WSClient(asyncio.Protocol):
    """Upgrade, then the subscribe ``steps`` (("recv", prefix) | ("send", payload)),
    then frames go to ``on_frame``. Server frames are unmasked and, for the small
    messages of these benchmarks, never fragmented."""

    def __init__(self, request: bytes, steps: Sequence[tuple[str, bytes]],
                 ping_text: bool) -> None:
        self.request = request
        self.steps = list(steps)
        self.ping_text = ping_text  # Engine.IO: a text "2" wants a text "3"
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = HTTP
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.alive = True
        self.close_code: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not subclasses
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(
                f"closed while subscribing ({self.close_code or exc or 'no close frame'})"))

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(payload, opcode))

    def send_frames(self, frames: list[bytes]) -> None:
        """Ready-made frames (``client_frame``) in one write: one system call."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def _run_steps(self) -> None:
        while self.steps and self.steps[0][0] == "send":
            self.send(self.steps.pop(0)[1])
        if not self.steps:
            self.state = READY
            if not self.ready.done():
                self.ready.set_result(None)

    def _http(self, data: bytes) -> bytes | None:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.buf = data
            return None
        if not data.startswith(b"HTTP/1.1 101"):
            status = data[:data.find(b"\r\n")].decode(errors="replace")
            self._fail(f"upgrade refused: {status}")
            return None
        self.state = STEPS
        self._run_steps()
        return data[end + 4:]

    def control(self, op: int, payload: bytes) -> None:
        if op == OP_PING:
            self.send(payload, OP_PONG)
        elif op == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = f"{code} {payload[2:].decode(errors='replace')}".strip()
            self.send(payload[:2], OP_CLOSE)
            if self.transport is not None:
                self.transport.close()

    def message(self, op: int, payload: bytes) -> None:
        """A data frame outside the fast path (subscribing, or not a publication)."""
        if self.ping_text and payload == b"2":
            self.send(b"3")
            return
        if self.state == STEPS:
            expect = self.steps[0][1]
            if not payload.startswith(expect):
                self._fail(f"expected {expect!r}, got {payload[:120]!r}")
                return
            self.steps.pop(0)
            self._run_steps()
            return
        self.on_other(payload)

    def on_other(self, payload: bytes) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        """The generic (slow) path: every frame goes through ``message``/``control``."""
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == HTTP:
            rest = self._http(data)
            if not rest:
                return
            data = rest
        pos, n = 0, len(data)
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = pos + 10
            end = head + length
            if end > n:
                break
            op = data[pos] & 0x0F
            if op >= 8:
                self.control(op, data[head:end])
            else:
                self.message(op, data[head:end])
            pos = end
        if pos < n:
            self.buf = data[pos:]


class StampedTransport:
    """Just enough of an ``asyncio.Transport`` over a plain non-blocking socket
    whose reads carry the kernel's receive timestamp.

    A latency subscriber is one of 100 sockets read one after the other by one
    process: timed when its read callback runs, a frame would also be charged
    for the load generator reading the sockets before it. The kernel stamps
    each segment as it reaches the socket (``SO_TIMESTAMPNS``, CLOCK_REALTIME,
    read with ``recvmsg``; converted to CLOCK_MONOTONIC like the publisher's
    timestamps). A read that joins several segments carries the latest stamp,
    so a frame is never timed early. Only latency subscribers use it: the
    Python read path costs more than uvloop's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: Subscriber) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        self.closing = False
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(READ_SIZE, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(None)
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(payload)
                offset = time.time_ns() - perf_ns()  # CLOCK_REALTIME - CLOCK_MONOTONIC
                self.protocol.rx_ns = sec * 1_000_000_000 + nsec - offset
        self.protocol.data_received(data)

    def write(self, data: bytes) -> None:  # short frames: the handshake, pongs, a close
        if self.closing:
            return
        try:
            self.sock.setblocking(True)
            self.sock.sendall(data)
        except OSError as exc:
            self._lost(exc)
        finally:
            if not self.closing:
                self.sock.setblocking(False)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def abort(self) -> None:
        self._lost(None)

    close = abort

    def _lost(self, exc: Exception | None) -> None:
        if self.closing:
            return
        self.closing = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.protocol.connection_lost(exc)


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
READ_SIZE = 1 << 18


class Subscriber(WSClient):
    """Counts publication frames; parses a sample."""

    def __init__(self, group: Group, index: int) -> None:
        super().__init__(group.request(), group.steps_for(index), group.ping_text)
        self.group = group
        self.index = index
        self.count = 0
        self.done = False
        self.rx_ns = 0  # the kernel's receive time of the data being read (stamped)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.group.lost_connection(self)

    def on_other(self, payload: bytes) -> None:
        self.group.unexpected(payload)

    def data_received(self, data: bytes) -> None:
        g = self.group
        user = perf_ns()  # when this client's code reads the data: user-space timing
        g.last_rx = now = self.rx_ns or user
        if self.state != READY:
            super().data_received(data)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        prefix = g.prefix
        sample = g.sample
        target = g.target
        stagger = self.index
        count = self.count
        pos, n = 0, len(data)
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = pos + 10
            end = head + length
            if end > n:
                break
            op = data[pos] & 0x0F
            if op < 8 and data.startswith(prefix, head):
                count += 1
                if (count + stagger) % sample == 0 or count == target:
                    self.count = count
                    g.check(self, data[head:end], count, now, user)
            elif op >= 8:
                self.control(op, data[head:end])
            else:
                self.message(op, data[head:end])
            pos = end
        self.count = count
        if pos < n:
            self.buf = data[pos:]


class NatsSubscriber(Subscriber):
    """A subscriber of nats-server's own websocket listener: the payloads of its
    data frames, joined, are NATS protocol text (:mod:`benchmarks.natsws`), with
    any number of ``MSG`` deliveries per frame."""

    def __init__(self, group: Group, index: int) -> None:
        super().__init__(group, index)
        self.stream = b""

    def data_received(self, data: bytes) -> None:
        g = self.group
        user = perf_ns()
        g.last_rx = now = self.rx_ns or user
        if self.state != READY:
            WSClient.data_received(self, data)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        chunks = [self.stream] if self.stream else []
        pos, n = 0, len(data)
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = pos + 10
            end = head + length
            if end > n:
                break
            op = data[pos] & 0x0F
            if op >= 8:
                self.control(op, data[head:end])
            else:
                chunks.append(data[head:end])
            pos = end
        if pos < n:
            self.buf = data[pos:]
        if not chunks:
            return
        stream = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        msgs, pings, other, used = natsws.parse(stream)
        self.stream = stream[used:]
        for _ in range(pings):
            self.send(b"PONG\r\n", OP_BINARY)
        for line in other:
            g.error(f"nats: {line[:160]!r}")
        prefix, sample, target, stagger = g.prefix, g.sample, g.target, self.index
        count = self.count
        for payload in msgs:
            if not payload.startswith(prefix):
                g.unexpected(payload)
                continue
            count += 1
            if (count + stagger) % sample == 0 or count == target:
                self.count = count
                g.check(self, payload, count, now, user)
        self.count = count


def _extract_raw(payload: bytes) -> Any:
    return loads(payload)


def _extract_tidings(payload: bytes) -> Any:
    return loads(payload)["data"]


def _extract_socketio(payload: bytes) -> Any:
    return loads(payload[2:])[1]  # 42["msg",DATA]


EXTRACT = {"raw": _extract_raw, "tidings": _extract_tidings, "socketio": _extract_socketio}


class Group:
    """The subscribers of one worker process."""

    def __init__(self, pipe: Pipe, spec: dict[str, Any]) -> None:
        self.pipe = pipe
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.path: str = spec["sub_path"]
        self.steps: list[tuple[str, bytes]] = [(k, v) for k, v in spec["steps"]]
        # many channels: subscriber k of this process takes the steps of channel
        # (start + stride * k) % len(channel_steps), so processes interleave
        self.channel_steps: list[list[tuple[str, bytes]]] = [
            [(k, v) for k, v in steps] for steps in spec.get("channel_steps") or []]
        self.start: int = spec.get("start", 0)
        self.stride: int = spec.get("stride", 1)
        self.sub_class = NatsSubscriber if spec.get("proto") == "nats" else Subscriber
        self.prefix: bytes = spec["prefix"]
        self.ping_text: bool = spec.get("ping_text", False)
        self.extract = EXTRACT[spec["extract"]]
        self.offset: int = spec.get("offset", 0)
        self.subs: list[Subscriber] = []
        self.phase = -1
        self.base = 0
        self.target = 1 << 62
        self.sample = 10
        self.latency = False
        self.warmup = False
        self.interval = 0.005
        self.remaining = 0
        self.reported = True
        self.latencies: list[int] = []  # kernel receive time - send time (stamped)
        self.user_latencies: list[int] = []  # read by this process - send time
        self.timed: list[tuple[Subscriber, bytes, int, int, int]] = []
        self.stamped = False  # some subscribers are timed by the kernel
        self.errors: list[str] = []
        self.n_errors = 0
        self.n_unexpected = 0
        self.closes: Counter[str] = Counter()
        self.last_rx = 0
        self.cpu0 = 0.0
        self.stop = asyncio.Event()
        self.connecting: asyncio.Task[None] | None = None

    def request(self) -> bytes:
        return upgrade_request(self.host, self.port, self.path)

    def steps_for(self, index: int) -> list[tuple[str, bytes]]:
        if not self.channel_steps:
            return self.steps
        return self.channel_steps[(self.start + self.stride * index) % len(self.channel_steps)]

    # -- frames ---------------------------------------------------------------------

    def error(self, text: str) -> None:
        self.n_errors += 1
        if len(self.errors) < 10:
            self.errors.append(text)

    def unexpected(self, payload: bytes) -> None:
        self.n_unexpected += 1
        if self.n_unexpected <= 3:
            self.error(f"unexpected frame: {payload[:160]!r}")

    def check(self, sub: Subscriber, payload: bytes, count: int, now: int, user: int) -> None:
        """A sampled frame: ``now`` is its receive time (the kernel's for a stamped
        subscriber, else ``user``), ``user`` when this process read it."""
        if self.latency and not self.warmup:
            # kept, parsed when the phase ends: the next socket's frame is timed
            # without waiting for this one's parse (100 sockets are read in turn);
            # once some subscribers are stamped, only theirs are timed
            if sub.rx_ns or not self.stamped:
                self.timed.append((sub, payload, count, now, user))
            if count == self.target and not sub.done:
                self._finished(sub)
            return
        self._check(sub, payload, count, now, user)

    def _check(self, sub: Subscriber, payload: bytes, count: int, now: int,
               user: int) -> None:
        try:
            data = self.extract(payload)
            seq = data["seq"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self.error(f"bad frame {payload[:160]!r}: {exc!r}")
            return
        if self.warmup:
            if seq == self.base + self.target and not sub.done:
                self._finished(sub)
            return
        if seq != self.base + count:
            self.error(f"subscriber {self.offset + sub.index}: frame {count} of the phase "
                       f"has seq {seq}, expected {self.base + count}")
        if self.latency and (sub.rx_ns or not self.stamped):
            self.latencies.append(now - data["ts"])
            self.user_latencies.append(user - data["ts"])
        if count == self.target and not sub.done:
            self._finished(sub)

    def _finished(self, sub: Subscriber) -> bool:
        """Mark ``sub`` done; True once the whole group is (and reported)."""
        sub.done = True
        if not self.reported:
            self.remaining -= 1
            if self.remaining <= 0:
                self._report_done()
        return self.reported

    def lost_connection(self, sub: Subscriber) -> None:
        if sub.ready.done() and not sub.ready.exception():
            self.closes[sub.close_code or "no close frame"] += 1
        if not sub.done and not self.reported:
            sub.done = True  # counted as short
            self.remaining -= 1
            if self.remaining <= 0:
                self._report_done()

    # -- phases ---------------------------------------------------------------------

    def _start_phase(self, phase: int, base: int, target: int, sample: int, latency: bool,
                     warmup: bool, interval: float) -> None:
        # no garbage collection while a phase runs: with 10,000 subscribers and the
        # frames a latency phase keeps, a full collection stalls this process for
        # tens of ms, which would be charged to the server under test (the hot
        # path makes no reference cycles; what is left is collected between phases)
        gc.collect()
        gc.freeze()
        gc.disable()
        self.phase, self.base, self.target = phase, base, target
        self.sample = 1 if warmup else max(1, sample)
        self.latency, self.warmup, self.interval = latency, warmup, interval
        self.latencies = []
        self.user_latencies = []
        self.timed = []
        self.errors = []
        self.n_errors = 0
        self.closes = Counter()
        self.remaining = 0
        for sub in self.subs:
            sub.count = 0
            sub.done = not sub.alive
            if sub.alive:
                self.remaining += 1
        self.cpu0 = time.process_time()
        self.reported = False
        self.pipe.send(("started", phase))
        if self.remaining == 0:
            self._report_done()

    def _retarget(self, phase: int, target: int) -> None:
        if phase != self.phase or self.reported:
            return
        self.target = target
        for sub in self.subs:
            if not sub.done and sub.count >= target and self._finished(sub):
                return

    def _min_count(self) -> int:
        return min((s.count for s in self.subs if s.alive and not s.done), default=self.target)

    def _report_done(self) -> None:
        self.reported = True  # before the replay: its checks must not report again
        gc.unfreeze()
        gc.enable()
        timed, self.timed = self.timed, []
        for sub, payload, count, now, user in timed:
            self._check(sub, payload, count, now, user)
        target = self.target
        short = [s for s in self.subs if s.count < target] if not self.warmup else [
            s for s in self.subs if not s.done or not s.alive]
        self.pipe.send(("done", self.phase, {
            "received": sum(s.count for s in self.subs),
            "short": len(short),
            "lost": 0 if self.warmup else sum(target - s.count for s in short),
            "closed": dict(self.closes),
            "latencies": self.latencies,
            "user_latencies": self.user_latencies,
            "stamped": self.stamped,
            "errors": self.errors,
            "n_errors": self.n_errors,
            "unexpected": self.n_unexpected,
            "cpu": time.process_time() - self.cpu0,
            "last_rx": self.last_rx,
        }))
        self.reported = True

    async def _progress(self) -> None:
        last = -1
        while True:
            await asyncio.sleep(self.interval)
            if self.reported:
                last = -1
                continue
            low = self._min_count()
            if low != last:
                last = low
                self.pipe.send(("progress", self.phase, low))

    # -- connecting -----------------------------------------------------------------

    async def _connect(self, count: int, sources: Sequence[str], concurrency: int,
                       stamped: bool = False) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(concurrency)
        ok = 0
        errors: Counter[str] = Counter()
        cpu0 = time.process_time()

        first = len(self.subs)

        async def one(k: int) -> None:
            nonlocal ok
            async with limit:
                sub = self.sub_class(self, first + k)
                local = (sources[k % len(sources)], 0) if sources else None
                try:
                    if stamped:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        sock.setblocking(False)
                        try:
                            if local:
                                sock.bind(local)
                            await loop.sock_connect(sock, (self.host, self.port))
                        except OSError:
                            sock.close()
                            raise
                        StampedTransport(loop, sock, sub)
                        self.stamped = True
                    else:
                        await loop.create_connection(lambda: sub, self.host, self.port,
                                                     local_addr=local)
                    await asyncio.wait_for(sub.ready, 60)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                    if sub.transport is not None:
                        sub.transport.abort()
                    return
                self.subs.append(sub)
                ok += 1
                if ok % 100 == 0:
                    self.pipe.send(("connected", len(self.subs)))

        t0 = perf_ns()
        await asyncio.gather(*(one(k) for k in range(count)))
        self.pipe.send(("connect_done", {
            "ok": ok, "failed": sum(errors.values()), "errors": dict(errors.most_common(5)),
            "seconds": (perf_ns() - t0) / 1e9, "total": len(self.subs),
            "cpu": time.process_time() - cpu0,
        }))

    # -- the controller -------------------------------------------------------------

    def _on_command(self) -> None:
        try:
            while self.pipe.poll():
                msg = self.pipe.recv()
                kind = msg[0]
                if kind == "phase":
                    self._start_phase(*msg[1:])
                elif kind == "retarget":
                    self._retarget(msg[1], msg[2])
                elif kind == "collect":
                    if msg[1] == self.phase and not self.reported:
                        self._report_done()
                elif kind == "connect":
                    self.connecting = asyncio.create_task(self._connect(*msg[1:]))
                elif kind == "stop":
                    self.stop.set()
        except (EOFError, OSError):
            self.stop.set()

    async def run(self) -> None:
        watch_pipe(self.pipe, self._on_command)
        progress = asyncio.create_task(self._progress())
        self.pipe.send(("hello", os.getpid()))
        await self.stop.wait()
        progress.cancel()
        for sub in self.subs:
            if sub.transport is not None:
                reset(sub.transport)
        await asyncio.sleep(0)


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: Any) -> None:
    """Close with a TCP reset: the next scenario's connections must not find
    tens of thousands of client ports held in TIME_WAIT (an active close keeps
    each for a minute, and a port held by a bound socket is not reused)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def run_fast(coro: Any) -> Any:
    """Run ``coro`` on uvloop when it is installed (it halves the load generator's
    cost per received frame), else on the standard loop. Same for every stack."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def watch_pipe(pipe: Any, callback: Any, *args: Any) -> None:
    """Call ``callback`` when ``pipe`` has data. uvloop makes a watched fd
    non-blocking, which would let ``recv`` stop inside a message: undo that."""
    asyncio.get_running_loop().add_reader(pipe.fileno(), callback, *args)
    os.set_blocking(pipe.fileno(), True)


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def set_policy(policy: str) -> None:
    """The calling thread's scheduling policy: ``normal`` (SCHED_OTHER) or
    ``batch`` (SCHED_BATCH: woken by the server's writes, it never preempts the
    server, as clients on other machines would not take its CPU)."""
    policies = {"normal": os.SCHED_OTHER, "batch": os.SCHED_BATCH}
    if policy not in policies:
        raise ValueError(f"unknown scheduling policy {policy!r}")
    os.sched_setscheduler(0, policies[policy], os.sched_param(0))


def worker_main(pipe: Pipe, spec: dict[str, Any]) -> None:
    """Entry point of a load-generator process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us
    raise_nofile(spec.get("nofile", 0))
    set_policy(spec.get("policy", "normal"))
    try:
        run_fast(Group(pipe, spec).run())
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(("error", repr(exc)))
        raise


class Publisher(WSClient):
    """The publisher's connection: frames out, flow control, pings answered."""

    def __init__(self, host: str, port: int, path: str, steps: Sequence[tuple[str, bytes]],
                 ping_text: bool) -> None:
        super().__init__(upgrade_request(host, port, path), steps, ping_text)
        self.writable = asyncio.Event()
        self.writable.set()
        self.other = 0
        self.nats = False  # nats-server's websocket: answer its PINGs

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.writable.set()  # wake a waiting publisher; it checks ``alive``

    def on_other(self, payload: bytes) -> None:
        self.other += 1
        if self.nats:
            for _ in range(natsws.parse(payload)[1]):
                self.send(b"PONG\r\n", OP_BINARY)

    async def drain(self) -> None:
        """What ``await ws.send()`` of a client library does after its write:
        wait while the transport's buffer is over its high-water mark."""
        if not self.writable.is_set():
            await self.writable.wait()
