"""The Python cost of one publication on ``tidings serve``'s hot path, without sockets.

A ``/ws/pub/{channel}`` producer and ``/ws`` subscribers are :class:`Peer`
objects of the lean server (or, ``--server uvicorn``, uvicorn's websocket
protocol with the direct path) on fake transports: the producer is fed bursts of
masked frames (as ``data_received`` would get them from the kernel), the
subscribers' transports only count bytes. Each burst runs one event-loop turn,
like a real read, so the end-of-turn flush is included. What is left out is the
kernel: ``epoll_wait``, ``recv`` and ``send``, which ``benchmarks.compare``
measures with everything else.

    python -m benchmarks.hotpath [--subscribers 1] [--burst 20] [--seconds 3] [--native]
                                 [--count N] [--server lean|uvicorn] [--turns]

Use it to compare changes of the hot path (and under ``py-spy`` or callgrind
to see where the time goes); it prints µs per publication and per delivery.
``--turns`` counts, on asyncio's loop, the loop iterations between a read
(one burst of frames arriving on an idle loop) and the subscriber's first
write, and the writes each subscriber gets for it: the latency a loop turn
or a callback hop adds per message at low load, whatever the machine's speed.
``--count N`` publishes exactly N frames (rounded up to whole rounds of 64
reads) instead of running for ``--seconds``: under ``valgrind --tool=callgrind``
two counts give the instructions per publication by difference, a figure that
does not depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import orjson

from benchmarks.loadgen import client_frame, upgrade_request
from tidings import Hub
from tidings.server.app import create_app
from tidings.server.lean import LeanServer
from tidings.server.peer import Peer
from tidings.server.runner import tune_gc, websocket_routes


class CountingTransport:
    """What a Peer needs of an ``asyncio.Transport``; writes are only counted."""

    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0
        self.closing = False
        self.received = bytearray()
        self.keep = True  # keep the bytes until the handshake is done

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)
        if self.keep:
            self.received += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _until(predicate: Any, what: str) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise RuntimeError(f"hotpath: gave up waiting for {what}")


async def _open(server: Any, path: str) -> tuple[Any, CountingTransport]:
    """A connection upgraded to ``path``: a lean server's ``Peer``, or (``server``
    a factory of protocols) uvicorn's ``DirectWSProtocol``."""
    peer = Peer(server) if isinstance(server, LeanServer) else server()
    transport = CountingTransport()
    peer.connection_made(transport)
    peer.data_received(upgrade_request("127.0.0.1", 8000, path))
    await _until(lambda: b"\r\n\r\n" in transport.received, f"the upgrade of {path}")
    if not transport.received.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"hotpath: {path} refused: {bytes(transport.received[:200])!r}")
    return peer, transport


async def _server(hub: Hub, kind: str) -> Any:
    """What ``_open`` opens connections on: the lean server, or a factory of
    uvicorn's websocket protocol with the direct path (the hub started)."""
    if kind == "uvicorn":
        from uvicorn.config import Config
        from uvicorn.server import ServerState

        from tidings.server.wsproto import DirectWSProtocol

        config = Config(create_app(hub), ws=DirectWSProtocol, lifespan="off",
                        log_level="warning", ws_per_message_deflate=False,
                        ws_ping_interval=None, ws_max_size=hub.limits.frame_hard)
        config.load()
        state = ServerState()
        await hub.start()
        return lambda: DirectWSProtocol(config, state, {})
    server = LeanServer(create_app(hub), ws_routes=websocket_routes(hub),
                        max_size=hub.limits.frame_hard, ping_interval=None)
    server.loop = asyncio.get_running_loop()
    await server.startup()
    return server


async def measure(subscribers: int, burst: int, seconds: float,
                  native: bool = False, count: int = 0,
                  server_kind: str = "lean") -> dict[str, float]:
    hub = Hub("memory://")
    server = await _server(hub, server_kind)
    subs = []
    peers: list[Any] = []
    for _ in range(subscribers):
        peer, transport = await _open(server, "/ws")
        peer.data_received(client_frame(orjson.dumps(
            {"type": "subscribe", "id": 1, "channel": "bench"})))
        await _until(lambda t=transport: b'"type":"reply"' in t.received, "a subscription")
        transport.keep = False
        subs.append(transport)
        peers.append(peer)
    pub, _ = await _open(server, "/ws" if native else "/ws/pub/bench")
    peers.append(pub)
    pad = "x" * 60
    seq = 0

    def chunk() -> bytes:
        nonlocal seq
        out = []
        for _ in range(burst):
            seq += 1
            data = {"ts": 0, "seq": seq, "pad": pad}
            out.append(client_frame(orjson.dumps(
                {"type": "publish", "id": seq, "channel": "bench", "data": data}
                if native else data)))
        return b"".join(out)

    chunks = [chunk() for _ in range(64)]  # masked once, fed round-robin
    tune_gc()
    published = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while (published < count) if count else (time.perf_counter() < deadline):
        for data in chunks:
            pub.data_received(data)
            await asyncio.sleep(0)  # the turn's end: flush
        published += burst * len(chunks)
    cpu = time.process_time() - cpu0
    delivered = sum(t.writes for t in subs)
    if published * subscribers != hub.stats.deliveries:
        raise RuntimeError(f"hotpath: {hub.stats.deliveries} deliveries of "
                           f"{published * subscribers} ({delivered} writes)")
    for peer in peers:  # the sockets go away: every endpoint ends
        peer.connection_lost(None)
    await _until(lambda: not hub.connections, "the endpoints to end")
    return {"publications": published, "us_per_publication": cpu / published * 1e6,
            "us_per_delivery": cpu / (published * subscribers) * 1e6}


async def turns(burst: int, native: bool = False, rounds: int = 50) -> dict[str, float]:
    """Loop iterations from a read to the subscriber's first write (asyncio's loop:
    its selector is asked once per iteration), and writes per read."""
    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    select = selector.select
    iteration = 0

    def counting_select(timeout: float | None = None) -> Any:
        nonlocal iteration
        iteration += 1
        return select(timeout)

    selector.select = counting_select
    hub = Hub("memory://")
    server = LeanServer(create_app(hub), ws_routes=websocket_routes(hub),
                        max_size=hub.limits.frame_hard, ping_interval=None)
    server.loop = loop
    await server.startup()
    sub, transport = await _open(server, "/ws")
    sub.data_received(client_frame(orjson.dumps(
        {"type": "subscribe", "id": 1, "channel": "bench"})))
    await _until(lambda: b'"type":"reply"' in transport.received, "a subscription")
    transport.keep = False
    pub, _ = await _open(server, "/ws" if native else "/ws/pub/bench")
    at: list[int] = []  # the iteration of each write to the subscriber
    write = transport.write

    def recorded(data: bytes) -> None:
        at.append(iteration)
        write(data)

    transport.write = recorded  # type: ignore[method-assign]
    hops, writes = [], []
    for n in range(-1, rounds):  # the first read warms up (the setup's turns are busy)
        data = b"".join(client_frame(orjson.dumps(
            {"type": "publish", "id": n, "channel": "bench", "data": k} if native else k))
            for k in range(burst))
        at.clear()
        done = loop.create_future()
        start = 0

        def read(data: bytes = data) -> None:
            nonlocal start
            start = iteration
            pub.data_received(data)

        def check(done: asyncio.Future[None] = done) -> None:
            if not done.done():
                done.set_result(None)

        loop.call_later(0.002, read)  # a read on an idle loop, as a lone frame arrives
        loop.call_later(0.010, check)  # well after: every write of that read is done
        await done
        if n >= 0:
            hops.append(at[0] - start)
            writes.append(len(at))
    return {"iterations": sum(hops) / rounds, "max_iterations": max(hops),
            "writes": sum(writes) / rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--burst", type=int, default=20, help="frames per read")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--count", type=int, default=0,
                        help="publish this many frames instead of running for --seconds")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--native", action="store_true",
                        help="publish with native ``publish`` commands on /ws (each "
                             "answered) instead of a raw /ws/pub producer")
    parser.add_argument("--server", choices=("lean", "uvicorn"), default="lean",
                        help="tidings' own server (`tidings serve`), or uvicorn's websocket "
                             "protocol with the direct path (DirectWSProtocol)")
    parser.add_argument("--turns", action="store_true",
                        help="count loop iterations from a read to the subscriber's write "
                             "(asyncio's loop)")
    opts = parser.parse_args(argv)
    if opts.turns:
        counted = asyncio.run(turns(opts.burst, opts.native))
        print(f"{opts.burst} frame(s) per read ({'native publish' if opts.native else 'raw'}"
              f"): {counted['iterations']:.2f} loop iterations from the read to the "
              f"subscriber's first write (max {counted['max_iterations']}), "
              f"{counted['writes']:.2f} writes per read")
        return 0
    coro = measure(opts.subscribers, opts.burst, opts.seconds, opts.native, opts.count,
                   opts.server)
    if opts.loop == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    print(f"pid {os.getpid()}: {result['publications']:,} publications, "
          f"{result['us_per_publication']:.3f} µs each, "
          f"{result['us_per_delivery']:.3f} µs per delivery "
          f"(N = {opts.subscribers}, {opts.burst} frames per read, "
          f"{'native publish commands' if opts.native else 'raw producer'}, {opts.server})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
