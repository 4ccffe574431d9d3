"""The hub in one process: fan-out, outbox policies, interest refcounting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support import Sink
from tidings import Hub, Limits
from tidings.core.connection import ConnectionKind
from tidings.protocol import native


async def test_publication_is_encoded_once_for_all_subscribers(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = native.encode_publication_json

    def counting(*args: Any) -> bytes:
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr("tidings.protocol.codec.encode_publication_json", counting)
    sinks = [Sink() for _ in range(50)]
    for sink in sinks:
        conn = hub.register(sink)
        await hub.subscribe(conn, "news/#")
    await hub.publish("news/today", {"n": 1})
    for sink in sinks:
        await sink.wait_for(lambda f: len(f) == 1)
        assert sink.frames[0]["data"] == {"n": 1}
    assert calls == 1
    assert hub.stats.deliveries == 50


async def test_broker_interest_is_refcounted(hub: Hub) -> None:
    calls: list[tuple[str, str]] = []
    broker = hub.broker
    orig_sub, orig_unsub = broker.subscribe, broker.unsubscribe

    async def sub(p: str) -> None:
        calls.append(("sub", p))
        await orig_sub(p)

    async def unsub(p: str) -> None:
        calls.append(("unsub", p))
        await orig_unsub(p)

    broker.subscribe, broker.unsubscribe = sub, unsub  # type: ignore[method-assign]
    a, b = hub.register(Sink()), hub.register(Sink())
    await hub.subscribe(a, "x/+")
    await hub.subscribe(b, "x/+")
    await hub.unsubscribe(a, "x/+")
    assert calls == [("sub", "x/+")]
    await hub.unregister(b)
    assert calls == [("sub", "x/+"), ("unsub", "x/+")]


async def test_drop_policy_drops_oldest_and_reports_lagged() -> None:
    async with Hub(limits=Limits(outbox_size=10, overflow="drop")) as hub:
        sink = Sink()
        sink.gate.clear()  # the client does not read
        conn = hub.register(sink)
        await hub.subscribe(conn, "c")
        for i in range(100):
            await hub.publish("c", i)
        assert conn.dropped >= 89
        sink.gate.set()
        await sink.wait_for(lambda f: f and f[-1].get("data") == 99)
        lagged = sink.of("lagged")
        assert lagged and sum(f["dropped"] for f in lagged) == conn.dropped
        data = [f["data"] for f in sink.of("publication")]
        assert data == sorted(data)  # what is left arrives in order
        assert data[-1] == 99


async def test_disconnect_policy_closes_1013() -> None:
    async with Hub(limits=Limits(outbox_size=10)) as hub:
        sink = Sink()
        sink.gate.clear()
        conn = hub.register(sink)
        await hub.subscribe(conn, "c")
        for i in range(20):
            await hub.publish("c", i)
        assert conn.closed
        sink.gate.set()
        await sink.wait_for(lambda f: any(x.get("type") == "websocket.close" for x in f))
        close = next(f for f in sink.frames if f.get("type") == "websocket.close")
        assert close["code"] == 1013


async def test_control_frames_are_never_dropped() -> None:
    async with Hub(limits=Limits(outbox_size=5, overflow="drop")) as hub:
        sink = Sink()
        sink.gate.clear()
        conn = hub.register(sink)
        await hub.subscribe(conn, "c")
        conn.send_json({"type": "reply", "id": 1})
        for i in range(20):
            await hub.publish("c", i)
        sink.gate.set()
        await sink.wait_for(lambda f: f and f[-1].get("data") == 19)
        assert sink.of("reply") == [{"type": "reply", "id": 1}]


async def test_app_mode_iterates_publications(hub: Hub) -> None:
    conn = hub.register(Sink(), kind=ConnectionKind.APP)
    await conn.subscribe("feed/+")
    await hub.publish("feed/a", 1)
    await hub.publish("other", 2)
    await hub.publish("feed/b", 3)
    got = []
    async for pub in conn:
        got.append((pub.channel, pub.data))
        if len(got) == 2:
            break
    assert got == [("feed/a", 1), ("feed/b", 3)]


async def test_send_local_and_unknown(hub: Hub) -> None:
    sink_a, sink_b = Sink(), Sink()
    a, b = hub.register(sink_a), hub.register(sink_b)
    assert await hub.send([a.conn_id, b.conn_id, f"{hub.node}.missing"], {"x": 1}) == 2
    await sink_a.wait_for(lambda f: len(f) == 1)
    await sink_b.wait_for(lambda f: len(f) == 1)
    assert sink_a.frames[0] == {"type": "message", "from": "server", "data": {"x": 1}}


async def test_hub_methods_refuse_before_start() -> None:
    hub = Hub()
    from tidings import HubError

    with pytest.raises(HubError):
        await hub.publish("c", 1)


async def test_stop_closes_connections_with_1001() -> None:
    hub = Hub()
    await hub.start()
    sink = Sink()
    hub.register(sink)
    await hub.stop()
    close = {"type": "websocket.close", "code": 1001, "reason": "server shutting down"}
    assert close in sink.frames


async def test_history_ages_out_on_a_quiet_channel() -> None:
    async with Hub(history_size=10, history_ttl=0.05) as hub:
        await hub.publish("quiet", 1)
        assert [p.data for p in (await hub.history("quiet")).publications] == [1]
        await asyncio.sleep(0.1)  # the ttl passes: time itself is what is tested
        assert (await hub.history("quiet")).publications == []


async def test_a_late_publication_at_or_below_the_reply_position_is_not_new(hub: Hub) -> None:
    # Redis delivers pub/sub on another connection than the position read, so
    # offset 3 can arrive after a subscribe reply that said "position 3".
    from tidings.types import Publication

    sink = Sink()
    conn = hub.register(sink)
    conn.hold()
    conn.release({"c": 3})
    for offset in (2, 3, 4, 5):
        conn.deliver(Publication("c", offset, offset, "e"))
    conn.deliver(Publication("c", "outage", 0, ""))  # position unknown: always delivered
    await sink.wait_for(lambda f: len(f) == 3)
    assert [f["offset"] for f in sink.frames] == [4, 5, 0]
