"""The hub's fan-out of a lone publication against a bare loop of ``transport.write``,
on real sockets, in one process.

``tidings serve``'s lean server runs in this process with ``--subscribers``
native subscribers, opened and then drained by a forked child (a plain
``selectors`` loop of ``recv``: no timestamps, no parsing). Every millisecond
one publication is fanned out, either by the hub (``hub``: ``publish_nowait``
in one write-policy scope, as a producer's read callback does) or by a loop of
``transport.write`` of a frame of the same size over the same sockets (``raw``,
what picows's listener does). The CPU of this process per delivery, both
ways, alternating, tells what the hub adds to the system calls a lone
message costs; the reader's voluntary context switches per message say how
often a write had to wake it (a write that wakes a sleeping reader costs the
writer more in the kernel).

    python -m benchmarks.writeloop [--subscribers 100] [--messages 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import signal
import socket
import time

import orjson

from benchmarks.loadgen import client_frame, upgrade_request
from tidings import Hub
from tidings.protocol.codec import NATIVE_FRAMED
from tidings.server.app import create_app
from tidings.server.lean import LeanServer, loop_factory
from tidings.server.runner import tune_gc, websocket_routes

CHANNEL = "bench/writeloop"
DATA = {"seq": 0, "pad": "x" * 80}


def drain(port: int, count: int) -> None:
    """The child: ``count`` subscribed sockets, read until the parent is gone."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(upgrade_request("127.0.0.1", port, "/ws"))
        for step, payload in (("recv", b'"welcome"'), ("send", b""), ("recv", b'"reply"')):
            if step == "send":
                sock.sendall(client_frame(orjson.dumps(
                    {"type": "subscribe", "id": 1, "channel": CHANNEL})))
                continue
            got = b""
            while payload not in got:
                got += sock.recv(65536)
        sock.setblocking(False)
        socks.append(sock)
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                if not key.fileobj.recv(65536):  # type: ignore[union-attr]
                    return
            except BlockingIOError:
                pass


def _switches(pid: int) -> int:
    """The reader's voluntary context switches: how often it slept on its sockets."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


async def measure(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    hub = Hub("memory://", history_size=0)
    server = LeanServer(create_app(hub), ws_routes=websocket_routes(hub))
    await server.startup()
    await server.listen("127.0.0.1", 0, None)
    tune_gc()
    assert server.address is not None
    child = os.fork()
    if child == 0:
        try:
            drain(server.address[1], args.subscribers)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 60
        # the hub has no event for "N subscribers": polled, with a deadline
        while hub.channels().get(CHANNEL, 0) < args.subscribers:
            if time.monotonic() > deadline:
                raise SystemExit("the subscribers did not all subscribe within 60 s")
            await asyncio.sleep(0.01)
        transports = [peer.transport for peer in server.peers]
        pub = hub.publish_nowait(CHANNEL, DATA)  # a frame of the size the hub sends
        frame = NATIVE_FRAMED.publication(pub)
        assert isinstance(frame, bytes)  # a framed codec makes whole frames
        out: list[tuple[str, float, float]] = []
        for _ in range(args.rounds):
            for mode in ("hub", "raw"):
                switches = _switches(child)
                start = time.process_time()
                for _ in range(args.messages):
                    if mode == "hub":
                        hub.flusher.enter()
                        hub.publish_nowait(CHANNEL, DATA)
                        hub.flusher.leave()
                    else:
                        for transport in transports:
                            if not transport.is_closing():  # as the hub's can_write asks
                                transport.write(frame)
                    await asyncio.sleep(0.001)  # an idle loop between messages
                spent = time.process_time() - start
                wakes = (_switches(child) - switches) / args.messages
                out.append((mode, spent * 1e6 / (args.messages * len(transports)), wakes))
        return out
    finally:
        os.kill(child, signal.SIGKILL)
        await asyncio.to_thread(os.waitpid, child, 0)
        await server.shutdown(None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    factory = loop_factory("auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(measure(args))
    for mode, us, wakes in results:
        print(f"{mode}: {us:.2f} µs CPU per delivery, the reader woke {wakes:.1f} times a message")
    for mode in ("hub", "raw"):
        best = min(us for m, us, _ in results if m == mode)
        print(f"best {mode}: {best:.2f} µs")


if __name__ == "__main__":
    main()
