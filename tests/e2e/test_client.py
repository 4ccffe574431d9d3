"""tidings.Client against a real server: pub/sub, messages, queues, errors, reconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from tests.support import running, ws_url
from tidings import Hub, Publication
from tidings.client.client import Client, ClientTimeout, Item, MemberEvent, Message
from tidings.exceptions import ClientClosed, ClientError, ReplyError
from tidings.protocol.native import encode_lagged

T = TypeVar("T")
TIMEOUT = 5.0


async def take(it: AsyncIterator[T], n: int, timeout: float = TIMEOUT) -> list[T]:
    """The next ``n`` items of ``it``; fails if any of them takes longer than ``timeout``."""
    return [await asyncio.wait_for(anext(it), timeout) for _ in range(n)]


async def until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Wait for a state of the client that has no event of its own (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def client(base: str, **kwargs: Any) -> Client:
    return Client(ws_url(base), request_timeout=TIMEOUT, **kwargs)


async def test_subscribe_and_publish_between_two_clients(server) -> None:
    _, base = server
    async with client(base) as a, client(base) as b:
        assert a.connected and a.conn_id and a.node
        async with a.subscribe("chat/room1") as sub:
            pos = await b.publish("chat/room1", {"text": "hi"})
            pos2 = await b.publish("chat/room1", [1, 2])
            first, second = await take(sub, 2)
        assert isinstance(first, Publication)
        assert (first.channel, first.data, first.offset, first.epoch, first.sender) == (
            "chat/room1", {"text": "hi"}, pos.offset, pos.epoch, b.conn_id)
        assert (second.data, second.offset) == ([1, 2], pos2.offset)
        assert pos2.offset == pos.offset + 1


async def test_pattern_subscription_and_overlap(server) -> None:
    hub, base = server
    async with client(base) as a, a.subscribe("chat/+") as pattern, \
            a.subscribe("chat/r2") as exact:
        await hub.publish("other/x", 0)
        await hub.publish("chat/r1", 1)
        await hub.publish("chat/r2", 2)
        await hub.publish("chat/r1/deeper", 3)
        got = await take(pattern, 2)
        assert [(p.channel, p.data) for p in got] == [("chat/r1", 1), ("chat/r2", 2)]
        # one frame on the socket, delivered once to each matching subscription
        assert [(p.channel, p.data) for p in await take(exact, 1)] == [("chat/r2", 2)]
        # nothing else was queued: the next publication is the next item
        await hub.publish("chat/r3", 4)
        assert (await take(pattern, 1))[0].data == 4


async def test_one_subscription_per_pattern(server) -> None:
    _, base = server
    async with client(base) as a, a.subscribe("x") as _:
        with pytest.raises(ClientError, match="already subscribed"):
            async with a.subscribe("x"):
                pass


async def test_send_to_conn_id_and_to_a_list(server) -> None:
    _, base = server
    async with client(base) as a, client(base) as b, client(base) as c:
        assert b.conn_id is not None and c.conn_id is not None
        assert await a.send(b.conn_id, {"hi": 1}) == 1
        assert await take(b.messages(), 1) == [Message(str(a.conn_id), {"hi": 1})]
        assert await a.send([b.conn_id, c.conn_id], 2) == 2
        assert (await take(b.messages(), 1))[0].data == 2
        assert (await take(c.messages(), 1))[0] == Message(str(a.conn_id), 2)


async def test_messages_from_the_server(server) -> None:
    hub, base = server
    async with client(base) as a, client(base) as b:
        await hub.broadcast({"all": True})
        for c in (a, b):
            assert await take(c.messages(), 1) == [Message("server", {"all": True})]
        assert await hub.send(str(a.conn_id), "just you") == 1
        assert await take(a.messages(), 1) == [Message("server", "just you")]


async def test_history_presence_and_ping(server) -> None:
    _, base = server
    async with client(base) as a, client(base) as b:
        for i in range(5):
            await a.publish("hist/x", i)
        page = await a.history("hist/x")
        assert [p.data for p in page.publications] == [0, 1, 2, 3, 4]
        assert page.offset == 5 and page.epoch
        tail = await a.history("hist/x", since=page.publications[2].position)
        assert [p.data for p in tail.publications] == [3, 4]
        assert tail.recovered
        last2 = await a.history("hist/x", limit=2, reverse=True)
        assert [p.data for p in last2.publications] == [4, 3]
        async with a.subscribe("room/1"), b.subscribe("room/1"):
            members = await a.presence("room/1")
            assert {m.conn_id for m in members} == {a.conn_id, b.conn_id}
            stats = await b.presence_stats("room/1")
            assert stats["num_clients"] == 2
        rtt = await a.ping()
        assert 0 < rtt < TIMEOUT


async def test_reply_errors_raise_with_their_code(server) -> None:
    hub, base = server
    async with client(base) as a:
        with pytest.raises(ReplyError) as bad:
            async with a.subscribe("a/#/b"):
                pass
        assert bad.value.code == "bad_pattern"
        assert "a/#/b" not in a.subscriptions  # not left behind
        with pytest.raises(ReplyError) as forbidden:
            await a.publish("$sys/x", 1)
        assert forbidden.value.code == "forbidden"
        with pytest.raises(ReplyError) as missing:
            await a.send(f"{hub.node}.nobody", 1)
        assert missing.value.code == "not_found"
        with pytest.raises(ReplyError) as bad_channel:
            await a.history("a/+")
        assert bad_channel.value.code == "bad_channel"
        # the connection is still fine
        assert await a.ping() > 0
        async with a.subscribe("a/#"):
            pass


async def test_join_and_leave_events(server) -> None:
    _, base = server
    async with client(base) as a, client(base) as b, \
            a.subscribe("room/9", join_leave=True) as sub:
        with pytest.raises(ClientError):
            b.subscribe("room/9").events()
        events = sub.events()
        async with b.subscribe("room/9"):
            event = await asyncio.wait_for(_next_event(events, "join", b.conn_id), TIMEOUT)
            assert event == MemberEvent("join", "room/9", str(b.conn_id), None)
        event = await asyncio.wait_for(_next_event(events, "leave", b.conn_id), TIMEOUT)
        assert event.kind == "leave"


async def _next_event(events: AsyncIterator[MemberEvent], kind: str, conn_id: str | None
                      ) -> MemberEvent:
    async for event in events:
        if event.kind == kind and event.conn_id == conn_id:
            return event
    raise AssertionError("events ended")


async def test_queue_pull_ack_each_item_exactly_once(server) -> None:
    hub, base = server
    queue = hub.queue("jobs")
    total = 40
    async with client(base) as a, client(base) as b:
        await a.pull("jobs", max=1)
        await b.pull("jobs", max=2)
        seen: list[tuple[str, Any]] = []
        done = asyncio.Event()

        async def consume(c: Client, name: str) -> None:
            async for item in c.items("jobs"):
                assert isinstance(item, Item)
                seen.append((name, item.data))
                await item.ack()
                if len(seen) == total:
                    done.set()

        tasks = [asyncio.create_task(consume(a, "a")), asyncio.create_task(consume(b, "b"))]
        for i in range(total):
            await queue.push(i)
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert sorted(data for _, data in seen) == list(range(total))
        assert {name for name, _ in seen} == {"a", "b"}  # both consumed
        assert len(queue) == 0 and queue.in_flight == 0
    # closing the clients ends the item iterators
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)


async def test_nack_redelivers(server) -> None:
    hub, base = server
    async with client(base) as a:
        await a.pull("retry")
        await hub.queue("retry").push("x")
        first = (await take(a.items("retry"), 1))[0]
        await first.nack()
        again = (await take(a.items("retry"), 1))[0]
        assert (again.id, again.data, again.attempt) == (first.id, "x", first.attempt + 1)
        await again.ack()
        with pytest.raises(ReplyError) as twice:
            await again.ack()
        assert twice.value.code == "not_found"


async def test_close_ends_iterators_quickly(server) -> None:
    _, base = server
    a = client(base)
    await a.connect()
    sub = a.subscribe("idle/channel")
    await sub.__aenter__()

    async def drain(it: AsyncIterator[Any]) -> list[Any]:
        return [x async for x in it]

    waiting = [asyncio.create_task(drain(sub)), asyncio.create_task(drain(a.messages())),
               asyncio.create_task(drain(a.items("q")))]
    await asyncio.sleep(0.05)  # let them block on the empty buffers
    assert not any(t.done() for t in waiting)
    started = time.monotonic()
    await asyncio.wait_for(a.close(), 2.0)
    results = await asyncio.wait_for(asyncio.gather(*waiting), 2.0)
    assert time.monotonic() - started < 2.0
    assert results == [[], [], []]
    assert not a.connected
    with pytest.raises(ClientClosed):
        await a.publish("x", 1)
    with pytest.raises(ClientClosed):
        await a.wait_connected(1)
    await sub.__aexit__(None, None, None)  # harmless after close
    await a.close()  # idempotent


async def test_close_fails_pending_requests() -> None:
    # A server that accepts, welcomes, and never answers: the request stays pending.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import base64
        import hashlib

        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        welcome = b'{"type":"welcome","conn_id":"n.x","node":"n","version":"0"}'
        writer.write(bytes([0x81, len(welcome)]) + welcome)
        await writer.drain()
        try:
            while True:  # read (masked) client frames, answer only the close frame
                head = await reader.readexactly(2)
                size = head[1] & 0x7F
                if size == 126:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                elif size == 127:
                    size = int.from_bytes(await reader.readexactly(8), "big")
                await reader.readexactly(4 + size)
                if head[0] & 0x0F == 0x8:
                    writer.write(b"\x88\x00")
                    await writer.drain()
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        c = Client(f"ws://127.0.0.1:{port}/ws", request_timeout=0.3)
        await c.connect()
        assert c.conn_id == "n.x"
        with pytest.raises(ClientTimeout):
            await c.ping()
        c.request_timeout = 30.0
        pending = asyncio.create_task(c.publish("a", 1))
        await until(lambda: bool(c._pending), "the request to be sent")
        await asyncio.wait_for(c.close(), 2.0)
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(pending, 2.0)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_first_connect_failure_raises() -> None:
    from tests.support import free_port

    c = Client(f"ws://127.0.0.1:{free_port()}/ws", request_timeout=2.0)
    with pytest.raises(ClientError, match="cannot connect"):
        await c.connect()
    with pytest.raises(ClientError, match="not connected"):
        await c.publish("x", 1)
    await c.close()


async def _drop(hub: Hub, c: Client) -> str:
    """Close ``c``'s connection from the server side, as a restart would."""
    old = str(c.conn_id)
    hub.connections[old].close(1012, "restart", flush=False)
    return old


async def test_reconnect_recovers_missed_publications_exactly_once() -> None:
    hub = Hub()
    async with running(hub) as base, \
            client(base, backoff_min=0.02, backoff_max=0.2) as c, \
            c.subscribe("news/1") as sub:
        for i in range(1, 6):
            await hub.publish("news/1", i)
        assert [p.offset for p in await take(sub, 5)] == [1, 2, 3, 4, 5]
        for round_ in range(3):
            old = await _drop(hub, c)
            base_i = 6 + round_ * 10
            for i in range(base_i, base_i + 5):  # while the client is away
                await hub.publish("news/1", i)
            await until(lambda old=old: c.conn_id != old and c.connected, "a reconnection")
            for i in range(base_i + 5, base_i + 10):  # live again
                await hub.publish("news/1", i)
        got = await take(sub, 30)
        assert [p.offset for p in got] == list(range(6, 36))
        assert [p.data for p in got] == list(range(6, 36))
        await hub.publish("news/1", "last")
        assert (await take(sub, 1))[0].offset == 36  # no duplicate was left behind
        assert c.reconnects == 3
        assert sub.gaps == 0 and sub.dropped == 0


async def test_reconnect_after_close_all_resubscribes_patterns_and_pulls() -> None:
    hub = Hub()
    async with running(hub) as base, \
            client(base, backoff_min=0.02, backoff_max=0.2) as c, \
            c.subscribe("feed/+") as sub:
        await c.pull("work")
        await hub.queue("work").push("before")
        item = (await take(c.items("work"), 1))[0]
        old = str(c.conn_id)
        await hub.close_all(1012, "restart")
        await until(lambda: c.conn_id != old and c.connected, "a reconnection")
        # the unacked item went back to the queue and comes again on the new connection
        with pytest.raises(ClientError, match="lost"):
            await item.ack()
        again = (await take(c.items("work"), 1))[0]
        assert (again.data, again.attempt) == ("before", 2)
        await again.ack()
        await hub.publish("feed/a", "after")
        assert (await take(sub, 1))[0].data == "after"
        assert c.subscribe("feed/+").pattern == "feed/+"
        assert await c.ping() > 0


async def test_reconnect_past_the_history_window_counts_a_gap(caplog) -> None:
    hub = Hub(history_size=2)
    async with running(hub) as base, \
            client(base, backoff_min=0.02, backoff_max=0.2) as c, \
            c.subscribe("short/1") as sub:
        await hub.publish("short/1", 1)
        assert [p.offset for p in await take(sub, 1)] == [1]
        old = await _drop(hub, c)
        for i in range(2, 7):  # 2-4 fall out of the window of 2
            await hub.publish("short/1", i)
        await until(lambda: c.conn_id != old and c.connected, "a reconnection")
        await hub.publish("short/1", 7)
        assert [p.offset for p in await take(sub, 1)] == [7]
        assert sub.gaps == 1
        assert "could not be recovered" in caplog.text


async def test_no_reconnect_ends_iterators_with_an_error() -> None:
    hub = Hub()
    async with running(hub) as base, client(base, reconnect=False) as c, \
            c.subscribe("once") as sub:
        await hub.publish("once", 1)
        assert (await take(sub, 1))[0].data == 1
        await hub.publish("once", 2)
        await _drop(hub, c)
        # what arrived before the drop is still yielded, then the loss is an error
        with pytest.raises(ClientError, match="connection lost"):
            async for _ in sub:
                pass
        assert not c.connected
        with pytest.raises(ClientError):
            await c.ping()


async def test_full_buffer_recovers_from_history() -> None:
    hub = Hub()
    async with running(hub) as base, client(base, buffer_size=4) as c, \
            c.subscribe("fast/1") as sub:
        for i in range(1, 51):
            await hub.publish("fast/1", i)
        await until(lambda: sub.recoveries >= 1, "the buffer to overflow")
        got = await take(sub, 50)
        assert [p.offset for p in got] == list(range(1, 51))
        assert sub.dropped == 0 and sub.gaps == 0


async def test_gap_and_lagged_are_repaired_from_history() -> None:
    hub = Hub()
    async with running(hub) as base, client(base) as c, c.subscribe("lossy/1") as sub:
        for i in range(1, 4):
            await hub.publish("lossy/1", i)
        assert [p.offset for p in await take(sub, 3)] == [1, 2, 3]
        conn = hub.connections[str(c.conn_id)]
        # the server loses 4 and 5 on the way (held, then skipped): the client sees 6
        conn.hold()
        for i in range(4, 7):
            await hub.publish("lossy/1", i)
        conn.release({"lossy/1": 5})
        assert [p.offset for p in await take(sub, 3)] == [4, 5, 6]
        assert sub.recoveries == 1 and sub.gaps == 0
        # the server drops 7 and 8 and says so with a ``lagged`` frame
        conn.hold()
        for i in range(7, 9):
            await hub.publish("lossy/1", i)
        conn.release({"lossy/1": 8})
        conn.send_frame(encode_lagged(2).decode())
        assert [p.offset for p in await take(sub, 2)] == [7, 8]
        assert c.lagged == 2 and sub.recoveries == 2
        await hub.publish("lossy/1", 9)
        assert [p.offset for p in await take(sub, 1)] == [9]


async def test_full_buffer_of_a_pattern_drops_the_oldest() -> None:
    hub = Hub()
    async with running(hub) as base, client(base, buffer_size=3) as c, \
            c.subscribe("slow/+") as sub:
        for i in range(10):
            await hub.publish("slow/a", i)
        await until(lambda: sub.dropped == 7, "the buffer to overflow")
        assert [p.data for p in await take(sub, 3)] == [7, 8, 9]


async def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="url"):
        Client("http://127.0.0.1/ws")
    with pytest.raises(ValueError, match="backoff"):
        Client("ws://127.0.0.1/ws", backoff_min=2, backoff_max=1)
    c = Client("ws://127.0.0.1/ws")
    with pytest.raises(ValueError, match="pattern"):
        c.subscribe("")
    with pytest.raises(ValueError, match="max"):
        await c.pull("q", max=0)
    with pytest.raises(ValueError, match="to"):
        await c.send([], 1)
