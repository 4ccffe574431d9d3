"""The lean Redis connection (brokers/resp.py): passwords, databases, scripts flushed."""

from __future__ import annotations

import asyncio

import pytest

from tests.brokers.conftest import RedisServer
from tests.support import Sink
from tidings import Hub
from tidings.brokers.resp import RespConnection, pack

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

    import tidings.brokers.redis as redis_module
    from tests.support import wait_until

    monkeypatch.setattr(redis_module, "_HEALTH_CHECK", 0.2)
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
