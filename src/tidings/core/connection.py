"""One websocket session: its subscriptions and its bounded outbox.

Delivery never awaits: the hub appends an already-encoded frame (the same
object for every subscriber of a publication) to each connection's outbox
and returns. With a direct transport (see :class:`DirectTransport`) a lone
frame is written at once and the rest of a turn's frames in one write at its
end (:mod:`tidings.core.flush` has the policy); otherwise one writer task per
connection drains the outbox into the ASGI ``send``. When the outbox
passes its limits (frames or bytes) the policy applies: ``disconnect`` closes
with 1013 so the client reconnects and recovers from history; ``drop``
discards the oldest publications and tells the client with a ``lagged``
frame. Replies and other control frames are never dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    MutableMapping,
    Sequence,
)
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, Protocol

from tidings.protocol.codec import (
    CENTRIFUGE,
    CENTRIFUGE_FRAMED,
    NATIVE,
    NATIVE_FRAMED,
    RAW,
    RAW_FRAMED,
    Codec,
)
from tidings.protocol.codes import CloseCode
from tidings.protocol.frames import OP_BINARY, encode_frame
from tidings.protocol.native import dumps
from tidings.types import Publication

if TYPE_CHECKING:
    from tidings.core.config import Limits
    from tidings.core.hub import HubCore
    from tidings.security.auth import Identity

__all__ = ["Connection", "ConnectionKind", "deliver_all"]

log = logging.getLogger("tidings.core.connection")

ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Writer(Protocol):
    """The socket side of a :class:`DirectTransport` (an ``asyncio.Transport``)."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...


class DirectTransport(Protocol):
    """What a server offers for direct writes (see tidings.server.wsproto)."""

    on_resume: Callable[[], None] | None
    # whole frames are written with the socket's own ``write``: no Python call of
    # the server's between the hub and the transport, nothing kept per connection
    transport: Writer

    # open and below the socket's write high-water mark (an attribute the server
    # keeps, or a property); whether the transport is closing is asked apart
    @property
    def can_write(self) -> bool: ...

    @property
    def gone(self) -> bool: ...


class ConnectionKind(Enum):
    NATIVE = "native"  # /ws: JSON frames with an envelope
    RAW = "raw"  # /ws/sub, /ws/pull: data only
    APP = "app"  # hub.accept(): publications go to ``async for`` in user code
    CENTRIFUGE = "centrifuge"  # /connection/websocket: Centrifuge client protocol (JSON)


def codec_for(kind: ConnectionKind, *, framed: bool) -> Codec | None:
    """The codec of a connection of ``kind``; ``framed`` when frames go straight
    to the socket. App connections get Publication objects: no codec."""
    if kind is ConnectionKind.NATIVE:
        return NATIVE_FRAMED if framed else NATIVE
    if kind is ConnectionKind.RAW:
        return RAW_FRAMED if framed else RAW
    if kind is ConnectionKind.CENTRIFUGE:
        return CENTRIFUGE_FRAMED if framed else CENTRIFUGE
    return None


class _Control:
    """A frame that must not be dropped, optionally with a callback once written."""

    __slots__ = ("on_sent", "payload")

    def __init__(self, payload: str | bytes, on_sent: Callable[[], object] | None = None) -> None:
        self.payload = payload
        self.on_sent = on_sent


_Entry = str | bytes | _Control


class BatchFrames:
    """The frames of one batch of publications, made once per protocol for all
    the connections of a fan-out: each frame (an outbox counts publications)
    and all of them joined (for a write-through)."""

    __slots__ = ("_each", "_joined", "pubs")

    def __init__(self, pubs: Sequence[Publication]) -> None:
        self.pubs = pubs
        self._each: dict[int, tuple[bytes, ...]] = {}
        self._joined: dict[int, bytes] = {}

    def frames(self, codec: Codec) -> tuple[bytes, ...]:
        frames = self._each.get(codec.slot)
        if frames is None:
            publication = codec.publication
            frames = self._each[codec.slot] = tuple(
                [publication(pub) for pub in self.pubs])  # type: ignore[misc]  # framed
        return frames

    def joined(self, codec: Codec) -> bytes:
        joined = self._joined.get(codec.slot)
        if joined is None:
            joined = self._joined[codec.slot] = b"".join(self.frames(codec))
        return joined

    def size(self, codec: Codec) -> int:
        """The bytes of the frames (an outbox's count; no join needed for it)."""
        joined = self._joined.get(codec.slot)
        return len(joined) if joined is not None else sum(map(len, self.frames(codec)))


QUEUED: Final = -2  # Connection._written: waiting for the end-of-turn flush (turns are >= 0)


def deliver_all(conns: Iterable[Connection], pub: Publication, through: bool,
                turn: int) -> None:
    """``conn.deliver(pub)`` for each of ``conns`` (a fan-out), with the usual
    case taken here without a call per connection: a direct transport that
    takes data, nothing queued or held, in a scope that writes through
    (``through`` and ``turn``: the hub's flusher's). The k-th subscriber of a
    lone publication waits for the k-1 before it, so this loop is latency."""
    if not through:
        for conn in conns:
            conn.deliver(pub)
        return
    for conn in conns:
        direct = conn._direct
        codec = conn.codec
        if (direct is None or codec is None or conn._out or conn._written == turn
                or conn._close is not None or conn._pending is not None or conn._floors
                or conn._lagged or not direct.can_write or direct.transport.is_closing()):
            conn.deliver(pub)
            continue
        prepared = pub.prepared  # encoded once per codec, by the first subscriber
        payload = prepared[codec.slot] if prepared is not None else None
        if payload is None:
            payload = codec.publication(pub)
        conn._written = turn
        try:
            direct.transport.write(payload)  # type: ignore[arg-type]  # framed: bytes
        except Exception:
            conn._broken()


class Connection:
    """A client connection held by this node."""

    __slots__ = (
        "__weakref__",
        "_app_queue",
        "_app_waiter",
        "_close",
        "_closed",
        "_direct",
        "_dropped_total",
        "_floors",
        "_lagged",
        "_out",
        "_out_bytes",
        "_pending",
        "_send",
        "_tokens",
        "_tokens_at",
        "_violations",
        "_waiter",
        "_writer",
        "_written",
        "codec",
        "conn_id",
        "expiry",
        "hub",
        "identity",
        "info",
        "ip",
        "join_leave",
        "kind",
        "limits",
        "subs",
        "user",
    )

    def __init__(
        self,
        hub: HubCore,
        conn_id: str,
        send: ASGISend,
        *,
        kind: ConnectionKind = ConnectionKind.NATIVE,
        user: str | None = None,
        info: Any = None,
    ) -> None:
        self.hub = hub
        self.conn_id = conn_id
        self.user = user
        self.info = info
        self.identity: Identity | None = None  # set by the hub when auth is on
        self.ip: str | None = None
        self.expiry: asyncio.TimerHandle | None = None  # closes it when the token expires
        self.kind = kind
        self.codec: Codec | None = codec_for(kind, framed=False)  # None: app connections
        self.limits: Limits = hub.limits
        self.subs: set[str] = set()
        self.join_leave: set[str] | None = None  # patterns subscribed with join_leave
        self._send = send
        self._out: list[_Entry] = []  # a list: empty ones are small (idle connections)
        self._out_bytes = 0
        self._lagged = 0
        self._dropped_total = 0
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._close: tuple[int, str] | None = None
        self._closed = False
        self._app_queue: deque[Publication] | None = None
        self._app_waiter: asyncio.Future[None] | None = None
        self._pending: list[Publication] | None = None
        # channel -> offset its subscribe reply reported: a publication at or below
        # it that the broker delivers late (Redis: pub/sub and commands travel on
        # different connections) is part of the past, not a new one
        self._floors: dict[str, int] = {}
        self._direct: DirectTransport | None = None
        # direct mode: the flusher's turn this connection was last written through in,
        # or QUEUED while its frames wait for the end of the turn (one slot for both:
        # idle connections are many)
        self._written = -1
        self._tokens = float(self.limits.burst or self.limits.rate or 0)
        self._tokens_at = 0.0
        self._violations = 0

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} user={self.user!r} subs={len(self.subs)}>"

    @property
    def direct(self) -> DirectTransport | None:
        """The server's direct transport this connection writes to, if any."""
        return self._direct

    @property
    def closed(self) -> bool:
        return self._closed or self._close is not None

    @property
    def queued(self) -> int:
        """Entries waiting in the outbox (a publication or a control frame each)."""
        return len(self._out)

    @property
    def dropped(self) -> int:
        """Publications dropped for this connection so far (``drop`` policy)."""
        return self._dropped_total

    # -- delivery (hot path: no await, no allocation per subscriber) ----------

    def deliver(self, pub: Publication) -> None:
        """Queue a publication. Called by the hub for every matching connection."""
        if self._close is not None:
            return
        if self._pending is not None:
            self._pending.append(pub)
            if len(self._pending) > self.limits.outbox_size:
                self._overflow_pending()
            return
        if self._floors:
            floor = self._floors.get(pub.channel)
            if floor is not None:
                if 0 < pub.offset <= floor:
                    return
                del self._floors[pub.channel]  # past the floor: live from here on
        codec = self.codec
        if codec is None:
            self._deliver_app(pub)
            return
        prepared = pub.prepared  # encoded once per codec, by the first subscriber
        payload = prepared[codec.slot] if prepared is not None else None
        if payload is None:
            payload = codec.publication(pub)
        out = self._out
        if not out and (direct := self._direct) is not None:  # _through, inlined: hot
            flusher = self.hub.flusher
            if (flusher.through and self._written != flusher.turn and not self._lagged
                    and direct.can_write and not direct.transport.is_closing()):
                self._written = flusher.turn
                try:
                    direct.transport.write(payload)  # type: ignore[arg-type]  # framed: bytes
                except Exception:
                    self._broken()
                return
        out.append(payload)
        self._out_bytes += len(payload)
        limits = self.limits
        if len(out) > limits.outbox_size or self._out_bytes > limits.outbox_bytes:
            self._overflow()
        self._wake()

    def deliver_many(self, pubs: Sequence[Publication], batch: BatchFrames | None = None) -> None:
        """Queue consecutive publications of one channel (``deliver`` each, with
        the common case of a native or raw subscriber on a direct transport
        done in one pass: one limit check and one wake-up). ``batch`` keeps the
        frames made for the fan-out's other connections (each protocol frames
        and joins a batch once)."""
        kind, codec = self.kind, self.codec
        if (codec is None or self._direct is None or self._pending is not None or self._floors
                or self._close is not None
                or (kind is not ConnectionKind.NATIVE and kind is not ConnectionKind.RAW)):
            for pub in pubs:
                self.deliver(pub)
            return
        out = self._out
        frames: Sequence[str | bytes]
        if batch is None:  # this connection only: no frames to share
            frames = [codec.publication(pub) for pub in pubs]
            if not out and self._through():
                self._write_through(b"".join(frames))  # type: ignore[arg-type]  # framed
                return
            size = sum(map(len, frames))
        else:
            if not out and self._through():
                self._write_through(batch.joined(codec))
                return
            frames = batch.frames(codec)
            size = batch.size(codec)
        out.extend(frames)  # one outbox entry each: the outbox counts publications
        self._out_bytes += size
        limits = self.limits
        if len(out) > limits.outbox_size or self._out_bytes > limits.outbox_bytes:
            self._overflow()
        self._wake()

    def _wake(self) -> None:
        """Get the queued frames written: by the writer task, or (direct) at the
        end of this event-loop turn, together with anything else queued meanwhile
        (a frame that could go at once did: see :meth:`_through`)."""
        if self._direct is not None:
            if self._written != QUEUED:
                self._written = QUEUED
                self.hub.flusher.schedule(self)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _through(self) -> bool:
        """Direct mode: may a frame be written at once? (in a scope that writes
        through, not written to yet in this turn, nothing to announce first, the
        socket taking data)"""
        flusher = self.hub.flusher
        if not flusher.through or self._written == flusher.turn or self._lagged:
            return False
        direct = self._direct
        return (direct is not None and direct.can_write
                and not direct.transport.is_closing())

    def _write_through(self, frames: bytes) -> bool:
        """Write ``frames`` now (later frames of this turn are queued for its end);
        False if the socket broke."""
        self._written = self.hub.flusher.turn
        try:
            self._direct.transport.write(frames)  # type: ignore[union-attr]
        except Exception:
            self._broken()
            return False
        return True

    def _broken(self) -> None:
        """A write raised: the socket is gone; the fan-out goes on to the others."""
        log.exception("write to %s failed", self.conn_id)
        self.abort()

    def hold(self) -> None:
        """Buffer publications (while a subscribe reply is being prepared)."""
        if self._pending is None:
            self._pending = []

    def release(self, after: dict[str, int] | None = None) -> None:
        """Deliver what was held, skipping what ``after`` says was replayed.

        ``after`` maps a channel to the last offset already sent in a reply, so
        nothing arrives twice or out of order across the replay -> live switch.
        """
        pending, self._pending = self._pending, None
        if after:
            self._floors.update(after)
        if pending:
            for pub in pending:
                self.deliver(pub)

    def forget_floor(self, channel: str) -> None:
        """The channel was unsubscribed: a later subscribe sets its own floor."""
        self._floors.pop(channel, None)

    def _overflow_pending(self) -> None:
        if self.limits.overflow == "disconnect" or self.kind is ConnectionKind.CENTRIFUGE:
            self._pending = None
            self.close(CloseCode.TRY_AGAIN_LATER, "outbox overflow", flush=False)
        elif self._pending:
            self._pending.pop(0)
            self._lagged += 1
            self._dropped_total += 1
            self.hub.stats.dropped += 1

    def allow_frame(self, now: float) -> bool:
        """Token bucket of ``Limits.rate`` frames per second; True if this frame may pass."""
        if self.frame_delay(now) == 0.0:
            self._violations = 0
            return True
        self._violations += 1
        return False

    def frame_delay(self, now: float) -> float:
        """The same bucket, for pacing: 0.0 if a frame may pass now (its token is
        taken), else the seconds until one may (raw producers wait that long;
        their unread frames push back through TCP, nothing is dropped)."""
        rate = self.limits.rate
        if rate is None:
            return 0.0
        burst = float(self.limits.burst or rate)
        tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / rate

    @property
    def violations(self) -> int:
        return self._violations

    def send_frame(self, payload: str | bytes, on_sent: Callable[[], object] | None = None) -> None:
        """Queue a control frame (reply, error, message, item): never dropped."""
        if self._close is not None:
            return
        if not self._out and self._direct is not None and self._through():
            frame = (encode_frame(payload.encode()) if isinstance(payload, str)
                     else encode_frame(payload, OP_BINARY))
            if self._write_through(frame) and on_sent is not None:
                on_sent()
            return
        self._out.append(_Control(payload, on_sent) if on_sent is not None else _Control(payload))
        self._out_bytes += len(payload)
        limits = self.limits
        if len(self._out) > limits.outbox_size * 2 or self._out_bytes > limits.outbox_bytes * 2:
            # a client that sends requests but never reads its replies
            self.close(CloseCode.TRY_AGAIN_LATER, "outbox overflow", flush=False)
            return
        self._wake()

    def send_json(self, data: Any) -> None:
        """Queue any JSON value as one text frame."""
        self.send_frame(dumps(data).decode())

    def _overflow(self) -> None:
        self.hub.stats.overflows += 1
        # Centrifuge clients have no ``lagged`` frame: they reconnect and recover instead
        if self.limits.overflow == "disconnect" or self.kind is ConnectionKind.CENTRIFUGE:
            self.close(CloseCode.TRY_AGAIN_LATER, "outbox overflow", flush=False)
            return
        out = self._out
        limits = self.limits
        kept: list[_Entry] = []
        dropped = 0
        i = 0  # drop the oldest publications; control frames stay, in order
        while i < len(out) and (
            len(out) - i + len(kept) > limits.outbox_size
            or self._out_bytes > limits.outbox_bytes
        ):
            entry = out[i]
            i += 1
            if isinstance(entry, _Control):
                kept.append(entry)
                continue
            self._out_bytes -= len(entry)
            dropped += 1
        out[:i] = kept
        self._lagged += dropped
        self._dropped_total += dropped
        self.hub.stats.dropped += dropped
        if dropped == 0:  # only control frames left and still over: give up
            self.close(CloseCode.TRY_AGAIN_LATER, "outbox overflow", flush=False)

    # -- app mode: ``async for pub in conn`` ------------------------------------

    def _deliver_app(self, pub: Publication) -> None:
        queue = self._app_queue
        if queue is None:
            queue = self._app_queue = deque()
        queue.append(pub)
        if len(queue) > self.limits.outbox_size:
            if self.limits.overflow == "disconnect":
                self.close(CloseCode.TRY_AGAIN_LATER, "outbox overflow", flush=False)
            else:
                queue.popleft()
                self._dropped_total += 1
                self.hub.stats.dropped += 1
        waiter = self._app_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[Publication]:
        """Publications of this connection's subscriptions, for custom endpoints."""
        self.kind = ConnectionKind.APP
        self.codec = None
        loop = asyncio.get_running_loop()
        while True:
            queue = self._app_queue
            if queue:
                yield queue.popleft()
                continue
            if self.closed:
                return
            self._app_waiter = loop.create_future()
            try:
                await self._app_waiter
            finally:
                self._app_waiter = None

    # -- subscriptions ---------------------------------------------------------

    async def subscribe(self, pattern: str, *, join_leave: bool = False) -> None:
        """Subscribe this connection to a channel or pattern (hub-side API)."""
        await self.hub.subscribe(self, pattern, join_leave=join_leave)

    async def unsubscribe(self, pattern: str) -> None:
        await self.hub.unsubscribe(self, pattern)

    # -- writer --------------------------------------------------------------

    def start_writer(self, direct: DirectTransport | None = None) -> None:
        """Start delivering: a writer task, or none with a direct transport."""
        if direct is not None and self.kind is not ConnectionKind.APP:
            self._direct = direct
            direct.on_resume = self.flush
            self.codec = codec_for(self.kind, framed=True)  # whole frames, written as they are
            return
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name=f"tidings-writer-{self.conn_id}"
        )

    def flush(self) -> None:
        """Direct mode: write every queued frame in one write (if the socket takes it)."""
        self._written = -1  # not queued any more (not written in the next turn either)
        direct = self._direct
        out = self._out
        if direct is None or not out or not direct.can_write or direct.transport.is_closing():
            if direct is not None and direct.gone:
                self._closed = True
            return
        chunks: list[bytes] = []
        callbacks: list[Callable[[], object]] = []
        notice = self.codec.lagged(self._lagged) if self._lagged and self.codec else None
        if notice is not None:
            chunks.append(encode_frame(notice.encode()))
            self._lagged = 0
        self._out = []
        for entry in out:
            if isinstance(entry, _Control):
                payload = entry.payload
                chunks.append(encode_frame(payload.encode()) if isinstance(payload, str)
                              else encode_frame(payload, OP_BINARY))
                if entry.on_sent is not None:
                    callbacks.append(entry.on_sent)
            elif isinstance(entry, bytes):  # in direct mode every other entry is a frame
                chunks.append(entry)
        self._out_bytes = 0
        direct.transport.write(b"".join(chunks))
        for callback in callbacks:
            callback()
        if self._close is not None and self._writer is None:
            self._send_close()

    def _send_close(self) -> None:
        """Direct mode: the close frame goes through ASGI (uvicorn owns the close handshake)."""
        code, reason = self._close or (CloseCode.NORMAL, "")

        async def close() -> None:
            try:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            except Exception as exc:  # the peer is gone already
                log.debug("close of %s: %r", self.conn_id, exc)
            finally:
                self._closed = True

        self._writer = asyncio.get_running_loop().create_task(close())

    async def _write_loop(self) -> None:
        send = self._send
        loop = asyncio.get_running_loop()
        codec = self.codec
        try:
            while True:
                out = self._out
                if not out:
                    if self._close is not None:
                        break
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                notice = codec.lagged(self._lagged) if self._lagged and codec else None
                if notice is not None:
                    self._lagged = 0
                    await send({"type": "websocket.send", "text": notice})
                entry = out.pop(0)
                if isinstance(entry, _Control):
                    payload = entry.payload
                    self._out_bytes -= len(payload)
                    if isinstance(payload, str):
                        await send({"type": "websocket.send", "text": payload})
                    else:
                        await send({"type": "websocket.send", "bytes": payload})
                    if entry.on_sent is not None:
                        entry.on_sent()
                    continue
                self._out_bytes -= len(entry)
                if isinstance(entry, str):
                    await send({"type": "websocket.send", "text": entry})
                else:
                    await send({"type": "websocket.send", "bytes": entry})
            code, reason = self._close
            await send({"type": "websocket.close", "code": code, "reason": reason})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-write
            log.debug("writer of %s ended: %r", self.conn_id, exc)
        finally:
            self._closed = True

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", *, flush: bool = True) -> None:
        """Close the connection: after the queued frames (``flush``) or at once."""
        if self._close is not None:
            return
        if self.codec is not None:  # the codes its clients act on (Centrifuge SDKs)
            code = self.codec.close_code(code, reason)
        self._close = (int(code), reason[:120])
        if not flush:
            self._out.clear()
            self._out_bytes = 0
            if self._app_queue:
                self._app_queue.clear()
        for waiter in (self._waiter, self._app_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._direct is not None:
            self._direct.on_resume = None
            if self._out and flush:
                self.flush()  # sends the close too once the queue is written
            if self._writer is None:
                self._send_close()
            return
        if self._writer is None and self.kind is not ConnectionKind.APP:
            self._closed = True

    async def wait_closed(self, timeout: float) -> None:
        """Wait for the writer to send the close frame (bounded)."""
        writer = self._writer
        if writer is None or writer.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(writer), timeout)
        except (TimeoutError, asyncio.CancelledError):
            writer.cancel()

    def abort(self) -> None:
        """Stop the writer now (the socket is gone)."""
        if self._direct is not None:
            self._direct.on_resume = None
            self._direct = None
        self._close = self._close or (CloseCode.NORMAL, "")
        self._closed = True
        self._out.clear()
        self._out_bytes = 0
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
        for waiter in (self._waiter, self._app_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
