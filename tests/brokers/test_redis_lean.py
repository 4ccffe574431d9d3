"""The lean Redis connection (brokers/resp.py): passwords, databases, scripts flushed."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets
from websockets.frames import Frame, Opcode

from tests.brokers.conftest import REDIS_URL, RedisServer, redis_ping, unavailable
from tests.support import DIRECT_WS, LEAN, TIMEOUT, Sink, native, running, ws_url
from tidings import Hub, Limits
from tidings.brokers.redis.resp import RespConnection, pack

pytestmark = pytest.mark.redis


def test_commands_are_packed_as_resp_arrays() -> None:
    assert pack(["SET", b"k\r\n", 12, "é"]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$2\r\n\xc3\xa9\r\n")


async def test_password_database_and_a_flushed_script_cache() -> None:
    redis = RedisServer()
    try:
        admin = await RespConnection.open(redis.url)
        assert (await admin.execute([["CONFIG", "SET", "requirepass", "s3cret"]]))[0] == b"OK"
        admin.close()
        url = f"redis://:s3cret@127.0.0.1:{redis.port}/3"
        with pytest.raises(Exception, match=r"NOAUTH|WRONGPASS|invalid"):
            await RespConnection.open(f"redis://:wrong@127.0.0.1:{redis.port}/3")
        async with Hub(url) as hub:
            sink = Sink()
            conn = hub.register(sink)
            await hub.subscribe(conn, "lean/x")
            first = await hub.publish("lean/x", 1)
            probe = await RespConnection.open(url)
            # the key lives in database 3, and the script cache can be flushed under us
            assert (await probe.execute([["DBSIZE"]]))[0] >= 1
            assert (await probe.execute([["SCRIPT", "FLUSH"]]))[0] == b"OK"
            probe.close()
            second = await hub.publish("lean/x", 2)
            assert (first.offset, second.offset) == (1, 2) and first.epoch == second.epoch
            await sink.wait_for(lambda frames: sum(
                f.get("type") == "publication" for f in frames) == 2)
            got = [f["data"] for f in sink.frames if f.get("type") == "publication"]
            assert got == [1, 2]
    finally:
        redis.stop()


async def test_a_reply_stream_out_of_step_closes_the_connection() -> None:
    redis = RedisServer()
    try:
        conn = await RespConnection.open(redis.url)
        conn.data_received(b"+OK\r\n")  # a reply nobody asked for
        await asyncio.wait_for(conn.lost, 5)
        assert not conn.is_open
        with pytest.raises(Exception, match="closed"):
            await conn.execute([["PING"]])
    finally:
        redis.stop()


async def test_a_frozen_redis_is_noticed_by_its_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP keeps the TCP connection open but nothing answers: the PING on
    the quiet subscriber connection goes unanswered, the node reports the broker
    down, and up again once Redis runs on."""
    import signal

    import tidings.brokers.redis.topology as topology_module
    from tests.support import wait_until

    monkeypatch.setattr(topology_module, "HEALTH_CHECK", 0.2)
    redis = RedisServer()
    try:
        async with Hub(redis.url) as hub:
            assert hub.health().up
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)
            try:
                await wait_until(lambda: not hub.health().up, 5, "the broker to be reported down")
            finally:
                redis.proc.send_signal(signal.SIGCONT)
            await wait_until(lambda: hub.health().up, 10, "the broker to be back")
            assert (await hub.publish("after/freeze", 1)).offset == 1
    finally:
        redis.stop()


async def test_publishes_started_together_go_as_grouped_script_calls() -> None:
    """Consecutive publishes to one channel share one script call and one pub/sub
    message; what another node receives and what history keeps are unchanged:
    binary data holding the field separator, senders, order, offsets."""
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    url = REDIS_URL + f"?prefix=t{uuid.uuid4().hex[:8]}"
    async with Hub(url, history_size=100, history_ttl=60) as h1, Hub(url) as h2:
        sink = Sink()
        conn = h2.register(sink)
        await h2.subscribe(conn, "grp/#")
        calls: list[int] = []
        run_scripts = h1.broker.topology.run_scripts  # type: ignore[attr-defined]

        async def counted(batch: list[tuple[object, ...]]) -> list[object]:
            results = await run_scripts(batch)
            calls.append(len(batch))
            return list(results)

        h1.broker.topology.run_scripts = counted  # type: ignore[attr-defined]
        plan = ([("grp/a", i) for i in range(100)] + [("grp/b", "b0"), ("grp/a", "after-b")]
                + [("grp/a", b"\x1f\x00bin\x1f" + bytes([i])) for i in range(3)])
        senders = [None, "s.1", ""]
        pubs = await asyncio.gather(*(h1.publish(ch, data, sender=senders[k % 3] or None)
                                      for k, (ch, data) in enumerate(plan)))
        assert calls and sum(calls) == len(plan) and len(calls) < len(plan)
        a_offsets = [p.offset for (ch, _), p in zip(plan, pubs, strict=True) if ch == "grp/a"]
        assert a_offsets == list(range(1, 105))  # consecutive across the groups
        await sink.wait_for(lambda f: len(f) == len(plan), timeout=10)
        got = sink.of("publication")
        assert [(f["channel"], f["offset"]) for f in got] == [
            (p.channel, p.offset) for p in pubs]
        assert [f["data"] for f in got[:101]] == [d for _, d in plan[:101]]
        assert [f.get("sender") for f in got] == [
            senders[k % 3] or None for k in range(len(plan))]
        page = await h2.history("grp/a", limit=-1)
        assert [p.offset for p in page.publications] == list(range(5, 105))  # size 100
        assert [p.data for p in page.publications[-3:]] == [d for _, d in plan[-3:]]
        assert page.publications[-1].data == b"\x1f\x00bin\x1f\x02"


async def test_grouped_publishes_survive_a_flushed_script_cache() -> None:
    """NOSCRIPT on grouped calls: the script is loaded again and every publish of
    the batch runs once, in order, with consecutive offsets."""
    redis = RedisServer()
    try:
        async with Hub(redis.url) as hub:
            sink = Sink()
            conn = hub.register(sink)
            await hub.subscribe(conn, "flush/x")
            await hub.publish("flush/x", 0)
            probe = await RespConnection.open(redis.url)
            assert (await probe.execute([["SCRIPT", "FLUSH"]]))[0] == b"OK"
            probe.close()
            pubs = await asyncio.gather(*(hub.publish("flush/x", i) for i in range(1, 101)))
            assert [p.offset for p in pubs] == list(range(2, 102))
            await sink.wait_for(lambda f: len(f) == 101, timeout=10)
            assert [f["data"] for f in sink.of("publication")] == list(range(101))
    finally:
        redis.stop()


@pytest.mark.parametrize("ws", [LEAN, DIRECT_WS], ids=["lean", "direct"])
async def test_a_producer_burst_above_the_window_keeps_its_order(ws: str) -> None:
    """3,000 frames of a raw producer in one write, on Redis: the read callback
    takes what fits in the window of publishes in flight (1,024), the rest
    waits its turn through ``receive``; the subscriber gets all, in order, and
    the acks count up."""
    if not redis_ping(REDIS_URL):
        unavailable(f"no Redis at {REDIS_URL}")
    url = REDIS_URL + f"?prefix=t{uuid.uuid4().hex[:8]}"
    count = 3000
    hub = Hub(url, limits=Limits(outbox_size=10_000, outbox_bytes=1 << 24))
    async with running(hub, ws=ws) as base, native(base) as sub:
        assert (await sub.request({"type": "subscribe", "channel": "w"}))["type"] == "reply"
        async with websockets.connect(ws_url(base, "/ws/pub/w?ack=1")) as pub:
            wire = b"".join(Frame(Opcode.TEXT, str(i).encode()).serialize(mask=True)
                            for i in range(count))
            pub.transport.write(wire)
            acks = [json.loads(await asyncio.wait_for(pub.recv(), TIMEOUT))["offset"]
                    for _ in range(count)]
        seen = [(await sub.next("publication"))["data"] for _ in range(count)]
    assert seen == list(range(count))
    assert acks == list(range(1, count + 1))
