"""What is particular to the PostgreSQL broker, against a real server: payloads
over the NOTIFY limit, concurrent publishers on several nodes, history trimming
(size and TTL), presence of a node killed without cleanup, and a server killed
and restarted mid-stream (a private cluster on a free port)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.brokers.conftest import PostgresServer, postgres_drop, postgres_url
from tests.support import Sink, native, running, serve_process, wait_health, wait_until
from tidings import HistoryRule, Hub, Limits, StreamPos
from tidings.brokers.postgres import PostgresBroker, parse_publications
from tidings.brokers.postgres_schema import SEP, Names
from tidings.exceptions import BrokerUnavailable


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await postgres_url("tp")
    yield url
    await postgres_drop(url, url.rsplit("prefix=", 1)[1])


def prefix_of(url: str) -> str:
    return url.rsplit("prefix=", 1)[1].split("&", 1)[0]


async def sql(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def hubs(url: str, n: int = 2, **kwargs: Any) -> list[Hub]:
    out = [Hub(url, **kwargs) for _ in range(n)]
    for hub in out:
        await hub.start()
    return out


async def stop(*hs: Hub) -> None:
    for hub in hs:
        await hub.stop()


def test_message_format_round_trips() -> None:
    msg = (f"P7{SEP}ep{SEP}3{SEP}a/b{SEP}"
           f"100{SEP}s1{SEP}4{SEP}j[1]{SEP}"  # JSON
           f"101{SEP}{SEP}5{SEP}bAA==")  # base64 bytes, no sender
    channel, pubs = parse_publications(msg)
    assert channel == "a/b"
    assert [(p.offset, p.data, p.sender, p.ts) for p in pubs] == [
        (7, [1], "s1", 100), (8, b"\x00", None, 101)]
    names = Names("x")
    assert len({names.exact(f"c{i}") for i in range(1000)}) == 1000
    assert all(len(names.exact("x" * 300).encode()) < 64 for _ in range(1))
    assert names.kind(names.exact("a")) == "e" and names.kind(names.top("a")) == "t"
    with pytest.raises(ValueError, match="prefix"):
        PostgresBroker("postgresql://h/db?prefix=Bad-Name")






async def test_migrate_creates_the_schema_idempotently(pg_url: str) -> None:
    for _ in range(2):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "tidings.server.cli", "migrate",
                             "--broker", pg_url], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "schema ready" in done.stdout
    p = prefix_of(pg_url)
    tables = await sql(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename LIKE $1",
                       p + "\\_%")
    assert tables == 6


async def test_20_kib_publication_arrives_intact_on_another_node(pg_url: str) -> None:
    """Over the 8000-byte NOTIFY limit: sent by reference (spill table), in order
    with the small ones around it, with history on and off."""
    h1, h2 = await hubs(pg_url, history_size=10, history_ttl=60)
    plain1, plain2 = await hubs(pg_url)
    try:
        for pub_hub, sub_hub, channel in ((h1, h2, "big/hist"), (plain1, plain2, "big/plain")):
            sink = Sink()
            conn = sub_hub.register(sink)
            await sub_hub.subscribe(conn, channel)
            big = {"blob": "é" * 10 + "x" * 20_480, "n": 1}
            binary = bytes(range(256)) * 100  # 25.6 KB of bytes, NULs included
            sent = await asyncio.gather(pub_hub.publish(channel, "small-1"),
                                        pub_hub.publish(channel, big),
                                        pub_hub.publish(channel, "small-2"))
            await pub_hub.publish(channel, binary)
            await sink.wait_for(lambda f: len(f) == 4, timeout=10)
            frames = sink.of("publication")
            assert [f["offset"] for f in frames] == [p.offset for p in sent] + [
                sent[-1].offset + 1]
            assert frames[0]["data"] == "small-1" and frames[2]["data"] == "small-2"
            assert frames[1]["data"] == big  # intact, nothing truncated
            assert frames[3]["data"]["b64"]  # bytes reach native clients as base64
        page = await h2.history("big/hist")
        assert page.publications[1].data == big
        assert page.publications[3].data == binary
        spilled = await sql(pg_url, f"SELECT count(*) FROM {prefix_of(pg_url)}_spill")
        assert spilled >= 4  # the history-off channel needed the spill table too
    finally:
        await stop(h1, h2, plain1, plain2)


async def test_spill_rows_are_swept(pg_url: str) -> None:
    (hub,) = await hubs(pg_url + "&spill_ttl=0.2&presence_ttl=0.3", 1)
    try:
        await hub.publish("big", "y" * 10_000)
        p = prefix_of(pg_url)
        assert await sql(pg_url, f"SELECT count(*) FROM {p}_spill") == 1
        deadline = time.monotonic() + 5
        while await sql(pg_url, f"SELECT count(*) FROM {p}_spill"):
            assert time.monotonic() < deadline, "spill row never swept"
            await asyncio.sleep(0.1)
    finally:
        await stop(hub)


async def test_concurrent_publishers_on_two_nodes_get_contiguous_offsets(pg_url: str) -> None:
    # a roomy outbox: 1,600 frames may arrive faster than the test's sink drains
    # them, and the hub's slow-client policy would close it (1013)
    h1, h2, watcher = await hubs(pg_url, 3, history_size=2000, history_ttl=60,
                                 limits=Limits(outbox_size=10**5, outbox_bytes=1 << 28))
    try:
        sink = Sink()
        conn = watcher.register(sink)
        await watcher.subscribe(conn, "race/#")
        n = 400
        # both nodes publish to two channels in opposite orders: batches lock meta
        # rows in one order, so no deadlock, and each channel's offsets are 1..2n
        results = await asyncio.gather(
            *(h.publish(ch, i) for i in range(n)
              for h, ch in ((h1, "race/a"), (h2, "race/b"), (h2, "race/a"), (h1, "race/b"))))
        for channel in ("race/a", "race/b"):
            mine = [p for p in results if p.channel == channel]
            assert sorted(p.offset for p in mine) == list(range(1, 2 * n + 1))
            assert len({p.epoch for p in mine}) == 1
        await sink.wait_for(lambda f: len(f) >= 4 * n, timeout=20)
        assert not [f for f in sink.frames if f.get("type") != "publication"]
        for channel in ("race/a", "race/b"):
            got = [f["offset"] for f in sink.of("publication") if f["channel"] == channel]
            assert got == list(range(1, 2 * n + 1))  # one order, offset order
        page = await h1.history("race/a")
        assert [p.offset for p in page.publications] == list(range(1, 2 * n + 1))
    finally:
        await stop(h1, h2, watcher)


async def test_a_burst_over_many_channels_and_a_long_name(pg_url: str) -> None:
    """One batch holds groups of many channels (sorted, each its own offsets and
    message), a name of 255 characters, and history on for some only."""
    rules = [HistoryRule("many/nohist/#", 0, 0)]
    h1, h2 = await hubs(pg_url, history_size=50, history_ttl=60, history_rules=rules)
    try:
        sink = Sink()
        conn = h2.register(sink)
        await h2.subscribe(conn, "many/#")
        long_name = "many/" + "é" * 250
        channels = [f"many/c{i}" for i in range(30)] + [f"many/nohist/c{i}" for i in range(5)]
        channels.append(long_name)
        pubs = await asyncio.gather(*(h1.publish(ch, {"i": i, "ch": ch})
                                      for i in range(10) for ch in channels))
        for ch in channels:
            assert [p.offset for p in pubs if p.channel == ch] == list(range(1, 11))
        await sink.wait_for(lambda f: len(f) >= 10 * len(channels), timeout=20)
        for ch in channels:
            got = [f["data"]["i"] for f in sink.of("publication") if f["channel"] == ch]
            assert got == list(range(10)), ch
        assert len((await h2.history("many/c3")).publications) == 10
        assert (await h2.history(long_name)).offset == 10
        assert (await h2.history("many/nohist/c1")).publications == []
    finally:
        await stop(h1, h2)


async def test_history_size_trims_rows_and_ttl_expires_them(pg_url: str) -> None:
    (hub,) = await hubs(pg_url, 1, history_size=5, history_ttl=0.6)
    p = prefix_of(pg_url)
    try:
        for i in range(50):
            await hub.publish("trim", i)
        await asyncio.gather(*(hub.publish("trim", i) for i in range(50, 100)))
        # a row per published group; every row left has a publication in the window
        rows = await sql(pg_url, f"SELECT count(*) FROM {p}_history WHERE channel = 'trim'")
        lowest = await sql(pg_url, f"SELECT min(last_o) FROM {p}_history WHERE channel = 'trim'")
        assert 1 <= rows <= 5 and lowest > 100 - 5  # trimmed as it goes
        page = await hub.history("trim")
        assert [x.data for x in page.publications] == [95, 96, 97, 98, 99]
        await asyncio.sleep(0.7)
        page = await hub.history("trim")
        assert page.publications == [] and page.offset == 100  # expired, position kept
        late = await hub.history("trim", since=StreamPos(97, page.epoch))
        assert not late.recovered  # what it missed expired
        # the sweep deletes expired rows (it runs every presence_ttl / 3, max 10 s);
        # run it now through the broker's own statement
        broker = hub.broker
        assert isinstance(broker, PostgresBroker)
        await broker.run(broker._sweep)
        rows = await sql(pg_url, f"SELECT count(*) FROM {p}_history WHERE channel = 'trim'")
        assert rows == 0
    finally:
        await stop(hub)


async def test_lost_meta_row_means_a_new_epoch(pg_url: str) -> None:
    (hub,) = await hubs(pg_url, 1, history_size=10, history_ttl=60)
    p = prefix_of(pg_url)
    try:
        first = await hub.publish("e", 1)
        await sql(pg_url, f"DELETE FROM {p}_meta")  # as a TRUNCATE or a restore would
        again = await hub.publish("e", 2)
        assert again.epoch != first.epoch and again.offset == 1
        page = await hub.history("e", since=first.position)
        assert not page.recovered and [x.data for x in page.publications] == []
        assert [x.data for x in (await hub.history("e")).publications] == [2]
    finally:
        await stop(hub)


async def test_presence_of_a_killed_node_expires(pg_url: str) -> None:
    url = pg_url + "&presence_ttl=1.5"
    (watcher,) = await hubs(url, 1)
    try:
        with serve_process("--broker", url) as node:
            async with native(node.base) as client:
                await client.request({"type": "subscribe", "channel": "room"})
                members = await watcher.presence("room")
                assert [m.conn_id for m in members] == [client.conn_id]
                node.kill()  # SIGKILL: no leave, no cleanup
                killed = time.monotonic()
        for _ in range(100):
            if not await watcher.presence("room"):
                break
            await asyncio.sleep(0.05)
        assert await watcher.presence("room") == []
        assert time.monotonic() - killed < 1.5 + 0.5  # within the TTL
    finally:
        await stop(watcher)


async def test_server_killed_and_restarted_mid_stream(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tidings.hub")
    server = PostgresServer()
    url = server.url + "?prefix=f"
    stack = contextlib.AsyncExitStack()
    try:
        h1, h2 = await hubs(url, history_size=100, history_ttl=300)
        base = await stack.enter_async_context(running(Hub(url)))  # /health
        sink = Sink()
        conn = h1.register(sink)
        await h1.subscribe(conn, "live")
        before = await h2.publish("live", "before")
        await sink.wait_for(lambda f: len(f) == 1)

        server.kill()
        await wait_until(lambda: not h1.health().up and not h2.health().up, 15,
                         "both hubs see the server go")
        await wait_health(base, 503, 15)
        with pytest.raises(BrokerUnavailable):
            await h2.broker.publish("live", "direct")
        local = await h2.publish("live", "local")  # the hub falls back to local delivery
        assert (local.offset, local.epoch) == (0, "")
        with pytest.raises(BrokerUnavailable):
            await h2.history("live")

        server.start()  # durable: history survives a restart
        await wait_until(lambda: h1.health().up and h2.health().up, 30, "both back up")
        await wait_health(base, 200, 30)
        after = await h2.publish("live", "after")
        assert (after.offset, after.epoch) == (before.offset + 1, before.epoch)
        await sink.wait_for(lambda f: any(x.get("data") == "after" for x in f), timeout=10)
        page = await h1.history("live", since=before.position)
        assert page.recovered and [x.data for x in page.publications] == ["after"]

        server.wipe()  # every table lost: a new epoch, recovery says so
        await wait_until(lambda: not h1.health().up, 15, "h1 sees the wipe")
        await wait_until(lambda: h1.health().up and h2.health().up, 30, "back after wipe")
        fresh = await h2.publish("live", "fresh")
        assert fresh.epoch != before.epoch
        await sink.wait_for(lambda f: any(x.get("data") == "fresh" for x in f), timeout=10)
        gone = await h1.history("live", since=after.position)
        assert not gone.recovered
        # the wipe lost the presence rows too: h1 wrote its member again on reconnect
        assert [m.conn_id for m in await h2.presence("live")] == [conn.conn_id]

        def logged(text: str) -> int:
            return sum(text in r.getMessage() for r in caplog.records)

        # once per transition per hub (three hubs; the /health one may see the
        # wipe last, so its transitions are waited for, not assumed)
        await wait_until(lambda: logged("is down") >= 6 and logged("is up again") >= 6, 30,
                         "every hub to log going down and coming back, twice")
        await stack.aclose()
        await stop(h1, h2)
        assert logged("is down") == 6 and logged("is up again") == 6
    finally:
        await stack.aclose()
        server.stop()


async def test_unlogged_tables_lose_history_in_a_crash_and_say_so() -> None:
    """``?unlogged=1``: PostgreSQL empties the channel tables after a crash; the
    fresh meta rows get new epochs, so recovery answers ``recovered: false``."""
    server = PostgresServer()
    (hub,) = await hubs(server.url + "?prefix=u&unlogged=1", 1, history_size=10,
                        history_ttl=60)
    try:
        persistence = await sql(server.url, "SELECT relpersistence::text FROM pg_class "
                                "WHERE relname = 'u_history'")
        assert persistence == "u"
        before = await hub.publish("c", 1)
        server.kill()  # immediate stop: a crash, WAL recovery at the start
        await wait_until(lambda: not hub.health().up, 15, "down")
        server.start()
        await wait_until(lambda: hub.health().up, 30, "back up")
        after = await hub.publish("c", 2)
        assert after.epoch != before.epoch and after.offset == 1
        page = await hub.history("c", since=before.position)
        assert not page.recovered
    finally:
        await stop(hub)
        server.stop()
