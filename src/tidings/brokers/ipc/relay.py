"""The single-host relay behind ``ipc://``: one owner of shared state for N workers.

``tidings serve --workers N`` runs N processes, each its own hub (node). They
must share more than a fan-out: a channel's offsets must be global and
gap-free, history must be one window, presence one set, and direct messages
must find the node holding a connection. So one process (the supervisor) owns
all of that in a single :class:`~tidings.brokers.memory.MemoryBus` (the same
code as the embedded ``memory://`` broker) and the workers reach it over a
Unix socket with :class:`tidings.brokers.ipc.broker.IpcBroker`. Each connected worker
gets a :class:`~tidings.brokers.memory.MemoryBroker` participant on that bus
whose handler callbacks write frames to the worker's socket, so routing by
interest, ordering and history are exactly the memory broker's.

Wire protocol (its codec: :mod:`tidings.brokers.ipc.wire`). Every frame is a 4-byte
big-endian length and an orjson array. Binary data travels as base64 with a
flag.

worker -> relay, requests (``id`` is an int chosen by the worker)::

    [id, "hello", node, token]            register (token: one per broker object)
    [id, "pub", channel, data, b64, sender, hist_size, hist_ttl] -> [offset, epoch, ts]
    [id, "pubm", channel, sender, hist_size, hist_ttl, [[data, b64]...]]
                                          -> [first offset, epoch, ts]  (consecutive offsets)
    [id, "ev", channel, frame]            transient join/leave frame
    [id, "sub", pattern]  [id, "unsub", pattern]
    [id, "node", node, payload, b64]      [id, "all", payload, b64]
    [id, "hist", channel, since_offset, since_epoch, limit, reverse]
                                          -> [[pub...], offset, epoch, recovered]
    [id, "rmhist", channel]               [id, "pos", channel] -> [offset, epoch]
    [id, "madd", channel, conn_id, user, info, announce]
    [id, "mrem", channel, conn_id]        [id, "mems", channel] -> [[conn_id, user, info]...]
    [id, "ping"]

work queues shared by the workers (a :class:`~tidings.brokers.memory_queue.MemoryQueues`;
the node of a lease is the worker's node; ``item`` is ``[id, data, enc, attempts]``,
``enc`` 0: JSON, 1: base64 bytes, 2: a dead letter whose ``data`` is base64 bytes)::

    [id, "qpush", queue, data, b64] -> item id      (refused with "QueueFull: ...")
    [id, "qfetch", queue, count, block] -> [item...]
    [id, "qack", queue, [item id...]] -> count
    [id, "qreq", queue, item_id, attempts, delay, dead] -> bool
    [id, "qclaim", queue, min_idle, count, max_attempts] -> [item...]
    [id, "qdelay", queue] -> seconds | null       [id, "qrel", queue]
    [id, "qstats", queue] -> [length, in_flight, delayed, oldest_age]

relay -> worker::

    [id, true, result] | [id, false, "error"]     the reply to request ``id``
    ["p", channel, data, b64, offset, epoch, sender, ts]   a publication
    ["P", channel, [[data, b64, offset, epoch, sender, ts]...]]   consecutive ones of a channel
    ["e", channel, frame]                          an event (join/leave)
    ["n", payload, b64]                            a node message

Requests of one worker are handled in order, one at a time, and every bus
operation completes without suspending, so a publication's fan-out frames are
queued before its reply and per-channel offset order holds on every socket.
The one exception is a ``qfetch`` that finds its queue empty and may wait
(``block``): it waits in a task of its own and answers when an item comes, the
time is up or the worker sends ``qrel`` for that queue, while the worker's
other requests go on being handled in order.
Frames queued for one socket during one loop turn go out in one write.

A worker that stops reading is not allowed to grow the relay's memory: past
``max_buffer`` queued bytes it is disconnected (and logged); its IpcBroker
reconnects and resubscribes, and clients recover the gap from history. A
worker that disconnects, for any reason, loses its subscriptions, its node
registration and its presence members (``leave`` frames are sent for them),
and the queue items leased to its node go back to the front of their queues at
once (the delivery counted), without waiting for the lease to expire.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any

from tidings.brokers.base import HistoryOptions
from tidings.brokers.ipc.wire import (
    READ_CHUNK,
    FrameReader,
    FrameWriter,
    dumps,
    pack_item,
    pack_publication,
    pack_publications,
    payload_bytes,
    unpack_data,
)
from tidings.brokers.memory import MemoryBroker, MemoryBus
from tidings.brokers.memory_queue import DEFAULT_MAX_LEN, MemoryQueues
from tidings.protocol.native import StreamPos, encode_join_leave
from tidings.types import Member, Publication

__all__ = ["Relay", "main"]

log = logging.getLogger("tidings.brokers.ipc.relay")

DEFAULT_MAX_BUFFER = 16 << 20  # bytes queued to one worker before it is dropped


# -- the relay ----------------------------------------------------------------------------


class _Worker:
    """One connected worker: its socket and, once it said hello, its bus participant.

    It is the ``BrokerHandler`` of its participant: the bus calls it for the
    publications, events and node messages this node should get, and it turns
    them into frames on the worker's socket.
    """

    __slots__ = ("broker", "cleaned", "dropped", "fetches", "members", "node", "out",
                 "relay", "token", "writer")

    def __init__(self, relay: Relay, writer: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.writer = writer
        self.out = FrameWriter(writer.transport, relay.max_buffer)
        self.node: str | None = None
        self.token = ""
        self.broker: MemoryBroker | None = None
        self.members: set[tuple[str, str]] = set()  # (channel, conn_id) this node added
        self.dropped = False
        self.cleaned = False
        self.fetches: set[asyncio.Task[None]] = set()  # blocking qfetch waits

    def push(self, frame: bytes) -> None:
        if self.dropped:
            return
        if not self.out.send(frame):
            self.relay._drop(self, f"it is more than {self.relay.max_buffer} bytes behind")

    # BrokerHandler ---------------------------------------------------------------------

    def on_publication(self, pub: Publication) -> None:
        self.push(self.relay.publication_frame(pub))

    def on_publications(self, pubs: Sequence[Publication]) -> None:
        self.push(self.relay.publications_frame(pubs))

    def on_event(self, channel: str, frame: str) -> None:
        self.push(dumps(["e", channel, frame]))

    def on_node_message(self, payload: bytes) -> None:
        try:  # the hub's payloads are orjson, hence UTF-8: no base64 on the hot path
            self.push(dumps(["n", payload.decode(), False]))
        except UnicodeDecodeError:
            self.push(dumps(["n", base64.b64encode(payload).decode("ascii"), True]))

    def on_broker_state(self, health: object) -> None:
        """The participant's own bus is always up: nothing to tell the worker."""


class Relay:
    """A Unix-socket server owning one :class:`MemoryBus` for the workers of one host.

    ``path`` is the socket to listen on; put it in a directory only the
    server's user can enter (the supervisor uses a fresh ``mkdtemp``), since
    anyone who can connect can publish. ``max_buffer`` bounds the bytes queued
    to one worker before that worker is disconnected. ``queue_max_len`` bounds
    each work queue (waiting + in flight); the queues live here, in memory.
    """

    def __init__(self, path: str, *, max_buffer: int = DEFAULT_MAX_BUFFER,
                 queue_max_len: int = DEFAULT_MAX_LEN) -> None:
        self.path = path
        self.max_buffer = max_buffer
        self.bus = MemoryBus()
        self.queues = MemoryQueues(max_len=queue_max_len)
        self._admin = MemoryBroker("ipc-relay://", bus=self.bus)  # node-less, for cleanup
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._workers: set[_Worker] = set()
        self._nodes: dict[str, _Worker] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hist_opts: dict[tuple[int, float], HistoryOptions] = {}
        self._memo_pub: Publication | None = None
        self._memo_frame = b""
        self._memo_pubs: Sequence[Publication] | None = None
        self._memo_batch = b""

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``path``; a stale socket file is replaced, a live relay is not."""
        if self._server is not None:
            return
        try:
            mode: int | None = os.stat(self.path).st_mode  # a local stat: does not block
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            if await self._alive():
                raise RuntimeError(f"a relay already listens on {self.path}")
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                       limit=READ_CHUNK)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        log.debug("relay listening on %s", self.path)

    async def _alive(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self) -> None:
        """Disconnect every worker, stop listening, remove the socket file. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for worker in list(self._workers):
            worker.dropped = True
            worker.writer.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await server.wait_closed()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        log.debug("relay on %s stopped", self.path)

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def nodes(self) -> list[str]:
        """Node ids of the workers connected now."""
        return sorted(self._nodes)

    # -- one worker ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        worker = _Worker(self, writer)
        self._workers.add(worker)
        frames = FrameReader()
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                for msg in frames.feed(data):
                    await self._handle(worker, msg)
        except (ConnectionError, OSError):
            pass
        except ValueError as exc:  # not our protocol: drop it, keep serving the others
            log.warning("relay: dropping a worker that sent a bad frame: %s", exc)
        finally:
            await self._cleanup(worker)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _drop(self, worker: _Worker, reason: str) -> None:
        """Disconnect a worker now (its reader task cleans up after it)."""
        if worker.dropped:
            return
        worker.dropped = True
        log.warning("relay: disconnecting worker node %s: %s", worker.node or "?", reason)
        worker.writer.transport.abort()

    async def _cleanup(self, worker: _Worker) -> None:
        """Forget a gone worker: node, subscriptions, presence members (with ``leave``)."""
        if worker.cleaned:
            return
        worker.cleaned = True
        self._workers.discard(worker)
        for task in list(worker.fetches):  # no lease for a gone node, no reply either
            task.cancel()
        if worker.node is not None and self._nodes.get(worker.node) in (worker, None):
            held = self.queues.drop_node(worker.node)  # back at once: no lease expiry wait
            if held:
                log.info("relay: %d queue item(s) of node %s given back", held, worker.node)
        if worker.node is not None and self._nodes.get(worker.node) is worker:
            del self._nodes[worker.node]
        if worker.broker is None:
            return
        await worker.broker.close()  # subscriptions and node registration
        for channel, conn_id in sorted(worker.members):
            member = self.bus.presence.get(channel, {}).get(conn_id)
            if member is None:
                continue
            await self._admin.remove_member(channel, conn_id)
            await self._admin.publish_event(
                channel, encode_join_leave("leave", channel, conn_id, member.user).decode())
        worker.members.clear()
        log.info("relay: worker node %s disconnected", worker.node)

    async def _handle(self, worker: _Worker, msg: Any) -> None:
        if not isinstance(msg, list) or len(msg) < 2 or type(msg[0]) is not int:
            raise ValueError("a request is [id, op, ...]")
        rid = msg[0]
        if msg[1] == "qfetch" and worker.node is not None:
            self._qfetch(worker, msg)
            return
        try:
            result = await self._op(worker, msg[1], msg)
        except Exception as exc:
            worker.push(dumps([rid, False, f"{type(exc).__name__}: {exc}"]))
        else:
            worker.push(dumps([rid, True, result]))

    async def _op(self, worker: _Worker, op: str, msg: list[Any]) -> Any:
        if op == "hello":
            return await self._hello(worker, msg[2], msg[3])
        broker = worker.broker
        if broker is None:
            raise RuntimeError("say hello first")
        if op == "pub":
            _, _, channel, data, b64, sender, size, ttl = msg
            pub = await broker.publish(channel, unpack_data(data, b64), sender=sender,
                                       history=self._history_options(size, ttl))
            return [pub.offset, pub.epoch, pub.ts]
        if op == "pubm":
            _, _, channel, sender, size, ttl, rows = msg
            pubs = broker.publish_many_nowait(
                channel, [(unpack_data(data, b64), None) for data, b64 in rows], sender=sender,
                history=self._history_options(size, ttl))
            if not pubs:
                raise ValueError("pubm without publications")
            return [pubs[0].offset, pubs[0].epoch, pubs[0].ts]
        if op == "ev":
            await broker.publish_event(msg[2], msg[3])
        elif op == "sub":
            await broker.subscribe(msg[2])
        elif op == "unsub":
            await broker.unsubscribe(msg[2])
        elif op == "node":
            await broker.send_node(msg[2], payload_bytes(msg[3], msg[4]))
        elif op == "all":
            await broker.send_all(payload_bytes(msg[2], msg[3]))
        elif op == "hist":
            _, _, channel, offset, epoch, limit, reverse = msg
            since = StreamPos(offset, epoch) if offset is not None else None
            page = await broker.history(channel, since=since, limit=limit, reverse=reverse)
            return [[pack_publication(p) for p in page.publications], page.offset, page.epoch,
                    page.recovered]
        elif op == "rmhist":
            await broker.remove_history(msg[2])
        elif op == "pos":
            pos = await broker.position(msg[2])
            return [pos.offset, pos.epoch]
        elif op == "madd":
            _, _, channel, conn_id, user, info, announce = msg
            await broker.add_member(channel, Member(conn_id, user, info))
            worker.members.add((channel, conn_id))
            if announce:  # restored after a reconnect: tell watchers it is back
                await broker.publish_event(
                    channel, encode_join_leave("join", channel, conn_id, user).decode())
        elif op == "mrem":
            await broker.remove_member(msg[2], msg[3])
            worker.members.discard((msg[2], msg[3]))
        elif op == "mems":
            return [[m.conn_id, m.user, m.info] for m in await broker.members(msg[2])]
        elif op[:1] == "q":
            return self._queue_op(worker, op, msg)
        elif op != "ping":
            raise ValueError(f"unknown op {op!r}")
        return None

    async def _hello(self, worker: _Worker, node: str, token: str) -> None:
        if worker.broker is not None:
            raise RuntimeError("this connection already registered a node")
        old = self._nodes.get(node)
        if old is not None:
            if old.token != token:
                raise ValueError(f"node id {node!r} is already connected to this relay")
            # the same broker object reconnecting before we noticed its old socket died
            self._drop(old, "replaced by its own reconnection")
            await self._cleanup(old)
        broker = MemoryBroker("ipc-relay://", bus=self.bus)
        await broker.connect(node, worker)
        worker.broker, worker.node, worker.token = broker, node, token
        self._nodes[node] = worker
        log.info("relay: worker node %s connected", node)

    # -- work queues ---------------------------------------------------------------------

    def _queue_op(self, worker: _Worker, op: str, msg: list[Any]) -> Any:
        """Every queue op but a waiting ``qfetch``: none of them suspends."""
        node = worker.node
        assert node is not None  # (checked by the caller: hello came first)
        queues = self.queues
        if op == "qpush":
            _, _, queue, data, b64 = msg
            return queues.push(_name(queue), unpack_data(data, b64))
        if op == "qack":
            _, _, queue, ids = msg
            return queues.ack(_name(queue), [str(i) for i in ids])
        if op == "qreq":
            _, _, queue, item_id, attempts, delay, dead = msg
            return queues.requeue(node, _name(queue), str(item_id), int(attempts),
                                  delay=float(delay), dead=bool(dead))
        if op == "qclaim":
            _, _, queue, min_idle, count, max_attempts = msg
            return [pack_item(i) for i in queues.claim(
                node, _name(queue), min_idle=float(min_idle), count=int(count),
                max_attempts=int(max_attempts))]
        if op == "qdelay":
            return queues.release_delayed(_name(msg[2]))
        if op == "qstats":
            s = queues.stats(_name(msg[2]))
            return [s.length, s.in_flight, s.delayed, s.oldest_age]
        if op == "qrel":
            queues.release(node, _name(msg[2]))
            return None
        raise ValueError(f"unknown op {op!r}")

    def _qfetch(self, worker: _Worker, msg: list[Any]) -> None:
        """Answer a fetch now when items wait (or it may not wait), else from a task
        of its own: a blocked fetch must not hold up the worker's other requests."""
        rid, node = msg[0], worker.node
        assert node is not None
        try:
            _, _, queue, count, block = msg
            queue, count, block = _name(queue), int(count), float(block)
            items = self.queues.fetch_nowait(node, queue, count)
        except Exception as exc:
            worker.push(dumps([rid, False, f"{type(exc).__name__}: {exc}"]))
            return
        if items or block <= 0 or count <= 0:
            worker.push(dumps([rid, True, [pack_item(i) for i in items]]))
            return
        task = asyncio.get_running_loop().create_task(
            self._qfetch_wait(worker, rid, node, queue, count, block))
        worker.fetches.add(task)
        task.add_done_callback(worker.fetches.discard)

    async def _qfetch_wait(self, worker: _Worker, rid: int, node: str, queue: str,
                           count: int, block: float) -> None:
        try:
            items = await self.queues.fetch(node, queue, count, block=block)
        except Exception as exc:  # (cancelled: the worker is gone, nobody to answer)
            worker.push(dumps([rid, False, f"{type(exc).__name__}: {exc}"]))
            return
        if worker.cleaned:  # gone meanwhile (cleanup cancels us first, so hardly ever)
            self.queues.unfetch(node, queue, [i.id for i in items])
            return
        worker.push(dumps([rid, True, [pack_item(i) for i in items]]))

    # -- helpers ---------------------------------------------------------------------------

    def _history_options(self, size: int | None, ttl: float | None) -> HistoryOptions | None:
        if size is None or ttl is None:
            return None
        key = (size, ttl)
        opts = self._hist_opts.get(key)
        if opts is None:
            if len(self._hist_opts) > 1024:
                self._hist_opts.clear()
            opts = self._hist_opts[key] = HistoryOptions(size, ttl)
        return opts

    def publication_frame(self, pub: Publication) -> bytes:
        """Encode a publication once for all the workers it fans out to.

        The bus fans one publication out synchronously, so remembering the
        last one is enough to share the bytes among every worker.
        """
        if pub is not self._memo_pub:
            self._memo_pub = pub
            self._memo_frame = dumps(["p", *pack_publication(pub)])
        return self._memo_frame

    def publications_frame(self, pubs: Sequence[Publication]) -> bytes:
        """:meth:`publication_frame` for a batch: one ``"P"`` frame, encoded once
        (the bus hands every worker the same sequence)."""
        if pubs is not self._memo_pubs:
            self._memo_pubs = pubs
            self._memo_batch = dumps(pack_publications(pubs))
        return self._memo_batch


def _name(queue: Any) -> str:
    if not isinstance(queue, str):
        raise TypeError("a queue name is a string")
    return queue


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tidings.brokers.ipc.relay PATH``: a standalone relay until SIGINT/SIGTERM.

    For apps served by ``uvicorn app:app --workers N`` on one host without
    Redis: run this next to them and give each ``Hub("ipc://PATH")``.
    """
    parser = argparse.ArgumentParser(prog="python -m tidings.brokers.ipc.relay",
                                     description="single-host relay for ipc:// brokers")
    parser.add_argument("path", help="Unix socket to listen on (absolute)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    path = os.path.abspath(args.path)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Relay(path):
            log.info("relay listening on %s", path)
            await stop.wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
