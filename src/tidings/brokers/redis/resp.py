"""A lean Redis connection for the broker's hot paths (RESP2, replies parsed by hiredis).

redis-py costs tens of microseconds per publication on the two paths every
publication takes: a pipeline of ``EVALSHA`` calls and, on every node, the
pub/sub message it produces (``get_message`` with its timeouts and health
checks). This connection is one ``asyncio.Protocol``: commands are packed
here and written in one ``write`` per batch, replies are parsed by hiredis as
they arrive and resolve one future per batch, in order. A connection made with
``on_push`` is a subscriber: every reply is a pub/sub push handed to it.

Only what the broker needs: ``redis://`` and ``rediss://`` URLs (user,
password, database), ``unix://`` sockets, RESP2. Everything else in the broker
(history reads, presence, queues, script loading) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["RespConnection", "RespPubSub", "bulk", "pack"]

Arg = bytes | str | int | float


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + bulk(args)


def bulk(args: Sequence[Arg]) -> bytes:
    """Arguments as RESP bulk strings (a command is ``*<count>`` and these)."""
    parts = []
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class RespConnection(asyncio.Protocol):
    """One connection to Redis; see the module docstring."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        # the loop, kept: asyncio.get_running_loop() costs a getpid() system call
        # on CPython 3.11 (its fork check), too much for once per batch
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._reader = hiredis.Reader()
        # per batch in flight: its future, the replies so far, how many it waits for
        self._waiting: deque[tuple[asyncio.Future[list[Any]], list[Any], int]] = deque()

    @classmethod
    async def open(cls, url: str, *, on_push: Callable[[list[Any]], None] | None = None,
                   timeout: float = 2.0) -> RespConnection:
        """Connect, authenticate and select the database of ``url``."""
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        conn = cls(on_push)
        try:
            if parts.scheme == "unix":
                await asyncio.wait_for(loop.create_unix_connection(lambda: conn, parts.path),
                                       timeout)
            elif parts.scheme in ("redis", "rediss"):
                context = ssl.create_default_context() if parts.scheme == "rediss" else None
                await asyncio.wait_for(loop.create_connection(
                    lambda: conn, parts.hostname or "127.0.0.1", parts.port or 6379,
                    ssl=context), timeout)
            else:
                raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        setup: list[Sequence[Arg]] = []
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
            setup.append(["AUTH", user, password] if user else ["AUTH", password])
        db = parts.path.strip("/") if parts.scheme != "unix" else (
            parse_qs(parts.query).get("db", [""])[-1])
        if db and db != "0":
            setup.append(["SELECT", db])
        if setup:
            if on_push is not None:  # a subscriber sets up before it subscribes
                conn.on_push = None
            replies = await asyncio.wait_for(conn.execute(setup), timeout)
            conn.on_push = on_push
            for reply in replies:
                if isinstance(reply, Exception):
                    conn.close()
                    raise reply
        return conn

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        error = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        push = self.on_push
        waiting = self._waiting
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if isinstance(reply, hiredis.ReplyError):
                reply = _error(reply)
            if push is not None:
                push(reply)
                continue
            if not waiting:  # nothing asked for it: the stream is out of step
                self.close()
                return
            future, replies, count = waiting[0]
            replies.append(reply)
            if len(replies) == count:
                waiting.popleft()
                if not future.done():
                    future.set_result(replies)

    # -- use ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def execute(self, commands: Sequence[Sequence[Arg]]) -> asyncio.Future[list[Any]]:
        """Send ``commands`` in one write; the future gets their replies in order
        (error replies as ``ResponseError`` values, not raised)."""
        return self.execute_packed(b"".join(pack(c) for c in commands), len(commands))

    def execute_packed(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        """``execute`` for ``count`` commands packed already."""
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        transport = self.transport
        if transport is None or transport.is_closing():
            future.set_exception(RedisConnectionError("connection to Redis is closed"))
            return future
        transport.write(payload)
        if self.on_push is None and count:
            self._waiting.append((future, [], count))
        else:  # a subscriber's commands are answered by pushes
            future.set_result([])
        return future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RespPubSub:
    """The subscriber side: the subset of redis-py's ``PubSub`` the broker uses.
    Confirmations and messages arrive through the connection's ``on_push``."""

    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn

    async def _send(self, command: str, names: Sequence[Arg]) -> None:
        if names:
            await self.conn.execute([[command, *names]])

    async def subscribe(self, *channels: Arg) -> None:
        await self._send("SUBSCRIBE", channels)

    async def unsubscribe(self, *channels: Arg) -> None:
        await self._send("UNSUBSCRIBE", channels)

    async def psubscribe(self, *patterns: Arg) -> None:
        await self._send("PSUBSCRIBE", patterns)

    async def punsubscribe(self, *patterns: Arg) -> None:
        await self._send("PUNSUBSCRIBE", patterns)

    def ping(self) -> None:
        self.conn.execute([["PING"]])

    async def aclose(self) -> None:
        self.conn.close()
