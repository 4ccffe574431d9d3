"""The NATS broker beyond the conformance suite, against real nats-servers:
subject escaping, offsets under contention, the history window, presence
TTL after a kill -9, a server killed and restarted mid-stream, a server
without JetStream, and a 3-node cluster with replicas 3 losing a server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.brokers.conftest import (
    NATS_URL,
    NatsServer,
    drop_nats_streams,
    nats_ping,
    unavailable,
)
from tests.support import Sink, free_port, wait_until
from tidings import Hub, StreamPos
from tidings.brokers.base import BrokerHealth, HistoryOptions, capabilities_of
from tidings.brokers.nats import NatsBroker
from tidings.brokers.nats.subjects import channel_of_tokens, subjects_for, token_for
from tidings.exceptions import BrokerUnavailable, NotAvailable
from tidings.protocol.names import validate_channel
from tidings.types import Member, Publication

ROOT = Path(__file__).resolve().parents[2]
HIST = HistoryOptions(100, 60)

ODD_NAMES = [
    "a b/c.d", "x*y/>z", "%41/%", "ünï/cødé", "🙂/x", "$sys/x", "a/./b", "a..b",
    "tab\there", "~~/-_", "*", ">", "a/>", "a/*/c", "new\nline", "slash\\back",
    "q?&=#x".replace("#", ""), "..", " ", "x" * 200,
]


@pytest.fixture
async def url() -> AsyncIterator[str]:
    if not nats_ping(NATS_URL):
        unavailable(f"no NATS with JetStream at {NATS_URL}")
    url = f"{NATS_URL}?prefix=n{uuid.uuid4().hex[:8]}"
    yield url
    await drop_nats_streams(url)


class Recorder:
    """A BrokerHandler that keeps everything it is handed."""

    def __init__(self) -> None:
        self.pubs: list[Publication] = []
        self.events: list[tuple[str, str]] = []
        self.node_messages: list[bytes] = []
        self.states: list[bool] = []

    def on_publication(self, pub: Publication) -> None:
        self.pubs.append(pub)

    def on_publications(self, pubs: Sequence[Publication]) -> None:
        self.pubs.extend(pubs)

    def on_event(self, channel: str, frame: str) -> None:
        self.events.append((channel, frame))

    def on_node_message(self, payload: bytes) -> None:
        self.node_messages.append(payload)

    def on_broker_state(self, health: BrokerHealth) -> None:
        self.states.append(health.up)


@contextlib.asynccontextmanager
async def brokers(url: str, n: int = 2) -> AsyncIterator[list[tuple[NatsBroker, Recorder]]]:
    out: list[tuple[NatsBroker, Recorder]] = []
    try:
        for i in range(n):
            broker, rec = NatsBroker(url), Recorder()
            await broker.connect(f"node{i}-{uuid.uuid4().hex[:4]}", rec)
            out.append((broker, rec))
        yield out
    finally:
        for broker, _ in out:
            await broker.close()


def test_subjects_escape_and_round_trip() -> None:
    for name in ODD_NAMES:
        validate_channel(name)
        (subject,) = subjects_for(name)
        tokens = subject.split(".")
        assert all(tokens), name  # no empty token
        for token in tokens:
            assert token not in ("*", ">")
            assert not any(c.isspace() or c in "*>." for c in token), (name, token)
        assert channel_of_tokens(subject) == name
    assert subjects_for("a/+/c") == ["a.*.c"]
    assert subjects_for("a/#") == ["a.>", "a"]
    assert subjects_for("#") == [">"]
    assert subjects_for("+/x.y/#") == ["*.x%2Ey.>", "*.x%2Ey"]
    assert token_for("a.b") == "a%2Eb"


async def test_odd_names_live_and_in_history(url: str) -> None:
    async with brokers(url) as [(a, rec), (b, _)]:
        for name in ODD_NAMES:
            await a.subscribe(name)
        await a.subscribe("#")  # every name but the $ one, once more through a pattern
        for name in ODD_NAMES:
            pub = await b.publish(name, {"n": name}, history=HIST)
            assert pub.offset == 1
        await wait_until(lambda: len(rec.pubs) == len(ODD_NAMES), what="every odd name")
        # delivered once each (exact subscription and '#' both match), channel intact
        assert sorted(p.channel for p in rec.pubs) == sorted(ODD_NAMES)
        assert all(p.data == {"n": p.channel} for p in rec.pubs)
        for name in ODD_NAMES:
            page = await a.history(name)
            assert [(p.channel, p.offset) for p in page.publications] == [(name, 1)]


async def test_concurrent_publishers_get_contiguous_offsets(url: str) -> None:
    async with brokers(url, 3) as [(a, _), (b, _), (watch, rec)]:
        channels = ["race/1", "race/2", "race/3"]
        for ch in channels:
            await watch.subscribe(ch)
        n = 150
        results = await asyncio.gather(*(
            node.publish(ch, i, sender=str(k), history=HIST)
            for i in range(n) for ch in channels for k, node in enumerate((a, b))))
        for ch in channels:
            mine = [p for p in results if p.channel == ch]
            assert sorted(p.offset for p in mine) == list(range(1, 2 * n + 1))
            assert len({p.epoch for p in mine}) == 1
            # each node's publications keep the order they were issued in
            for k in ("0", "1"):
                assert [p.data for p in sorted(mine, key=lambda p: p.offset)
                        if p.sender == k] == list(range(n))
        await wait_until(lambda: len(rec.pubs) == 6 * n, 20, "every publication live")
        for ch in channels:
            live = [p.offset for p in rec.pubs if p.channel == ch]
            assert live == list(range(1, 2 * n + 1))  # one order, the offsets' one
            stored = await watch.history(ch)
            assert [p.offset for p in stored.publications] == list(range(2 * n - 99, 2 * n + 1))
            # history says the same as what was acknowledged to the publishers
            acked = {p.offset: (p.sender, p.data) for p in results if p.channel == ch}
            assert all(acked[p.offset] == (p.sender, p.data) for p in stored.publications)


async def test_history_window_and_physical_bound(url: str) -> None:
    async with brokers(url + "&history_max=10", 1) as [(a, _)]:
        for i in range(50):
            await a.publish("trim", i, history=HistoryOptions(5, 60))
        page = await a.history("trim")
        assert [p.data for p in page.publications] == list(range(45, 50))
        info = await a.api(f"STREAM.INFO.{a.stream}", {"subjects_filter": ">"})
        held = info["state"]["subjects"][f"{a.prefix}.h.trim"]
        assert held <= 10  # the stream's per-subject bound keeps the storage small
        # a bigger window than the bound raises the bound (never serves less)
        for i in range(30):
            await a.publish("big", i, history=HistoryOptions(20, 60))
        assert [p.data for p in (await a.history("big")).publications] == list(range(10, 30))
        # history off: offsets still advance, nothing is served
        for _ in range(3):
            await a.publish("off", "x")
        page = await a.history("off")
        assert (page.publications, page.offset) == ([], 3)
        # the ttl is applied on read
        await a.publish("short", 1, history=HistoryOptions(10, 0.3))
        await asyncio.sleep(0.4)
        page = await a.history("short", since=StreamPos(0, page.epoch))
        assert page.publications == []


PRESENCE_CHILD = """
import asyncio, sys
from tidings.brokers.nats import NatsBroker
from tidings.types import Member

class H:
    def __getattr__(self, name):
        return lambda *a: None

async def main():
    b = NatsBroker(sys.argv[1])
    await b.connect("doomed", H())
    await b.add_member("lobby", Member("c-doomed", "zed"))
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_presence_of_a_node_killed_9_expires_within_the_ttl(url: str) -> None:
    url = url + "&presence_ttl=1.5"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    child = subprocess.Popen([sys.executable, "-c", PRESENCE_CHILD, url], env=env,
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
        assert line.strip() == b"ready"
        async with brokers(url, 1) as [(a, _)]:
            await a.add_member("lobby", Member("c-live", "amy"))
            names = {m.conn_id for m in await a.members("lobby")}
            assert names == {"c-doomed", "c-live"}
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            killed = time.monotonic()
            await asyncio.sleep(1.7)  # past the ttl; the live node keeps refreshing
            deadline = killed + 4.0
            while {m.conn_id for m in await a.members("lobby")} != {"c-live"}:
                assert time.monotonic() < deadline, "the dead node's member stayed"
                await asyncio.sleep(0.1)
            await a.remove_member("lobby", "c-live")
            assert await a.members("lobby") == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


async def test_events_and_node_messages(url: str) -> None:
    async with brokers(url) as [(a, ra), (b, rb)]:
        await a.subscribe("room/+")
        await b.publish_event("room/1", '{"type":"join"}')
        await b.send_node(a.node_id, b"to a")
        await b.send_all(b"to all")
        await wait_until(lambda: len(ra.events) == 1 and len(ra.node_messages) == 2)
        assert ra.events == [("room/1", '{"type":"join"}')]
        assert ra.node_messages == [b"to a", b"to all"]
        await wait_until(lambda: rb.node_messages == [b"to all"])
        assert capabilities_of(a).offered() == [
            "pubsub", "positions", "history", "presence", "queues", "direct"]


async def test_server_killed_and_restarted_mid_stream(tmp_path: Path) -> None:
    server = NatsServer(store=str(tmp_path / "js"))
    try:
        async with brokers(server.url + "?prefix=f") as [(a, ra), (b, rb)]:
            await a.subscribe("feed")
            for i in range(5):
                await b.publish("feed", i, history=HIST)
            await wait_until(lambda: len(ra.pubs) == 5)
            before = ra.pubs[-1].position
            assert ra.states == rb.states == [True]

            # 1. killed and restarted on its storage: history survives
            server.kill()
            await wait_until(lambda: ra.states == rb.states == [True, False], what="down")
            assert not a.health().up
            with pytest.raises(BrokerUnavailable):
                await b.publish("feed", "lost", history=HIST)
            with pytest.raises(BrokerUnavailable):
                await a.history("feed")
            server.start()
            await wait_until(lambda: ra.states == rb.states == [True, False, True], 20, "up")
            pub = await publish_retrying(b, "feed", 5)
            assert pub.position == StreamPos(6, before.epoch)
            await wait_until(lambda: len(ra.pubs) == 6, what="delivery resumes")
            page = await a.history("feed", since=before)
            assert page.recovered and [p.data for p in page.publications] == [5]

            # 2. killed and restarted without its storage: history lost, told so
            server.kill()
            await wait_until(lambda: ra.states[-1] is False and rb.states[-1] is False)
            server.wipe()
            server.start()
            await wait_until(lambda: ra.states == rb.states == [True, False, True, False, True],
                             20, "up again")
            pub = await publish_retrying(b, "feed", 6)
            assert pub.epoch != before.epoch and pub.offset == 1
            await wait_until(lambda: len(ra.pubs) == 7, what="delivery resumes again")
            page = await a.history("feed", since=StreamPos(6, before.epoch))
            assert not page.recovered  # never silently missing data
    finally:
        server.stop()


async def publish_retrying(broker: NatsBroker, channel: str, data: Any) -> Publication:
    """The first publish after a restart may meet JetStream still starting."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return await broker.publish(channel, data, history=HIST)
        except BrokerUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_without_jetstream_pubsub_still_works() -> None:
    server = NatsServer(jetstream=False)
    try:
        async with brokers(server.url + "?prefix=nojs") as [(a, ra), (b, _)]:
            assert not capabilities_of(a).history and capabilities_of(a).direct
            await a.subscribe("plain")
            pub = await b.publish("plain", "hi", history=HIST)
            assert (pub.offset, pub.epoch) == (0, "")
            await wait_until(lambda: [p.data for p in ra.pubs] == ["hi"])
            with pytest.raises(NotAvailable, match="JetStream"):
                await a.history("plain")
            with pytest.raises(NotAvailable):
                await a.position("plain")
            with pytest.raises(NotAvailable):
                await a.members("plain")
        # a hub on it: subscribing (with presence on) and publishing work
        async with Hub(server.url + "?prefix=nojs") as h1, \
                Hub(server.url + "?prefix=nojs") as h2:
            sink = Sink()
            conn = h1.register(sink, user="u")
            await h1.subscribe(conn, "plain")
            await h2.publish("plain", "via hubs")
            await sink.wait_for(lambda f: len(f) == 1)
            assert (sink.frames[0]["data"], sink.frames[0]["offset"]) == ("via hubs", 0)
            with pytest.raises(NotAvailable):
                await h1.history("plain")
    finally:
        server.stop()


@contextlib.contextmanager
def nats_cluster(size: int = 3) -> Iterator[list[NatsServer]]:
    ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    servers: list[NatsServer] = []
    try:
        for i, cport in enumerate(ports):
            servers.append(NatsServer(
                None, "-n", f"s{i}", "--cluster_name", "tidings",
                "--cluster", f"nats://127.0.0.1:{cport}", "--routes", routes))
        yield servers
    finally:
        for s in servers:
            s.stop()


async def test_cluster_of_three_loses_a_server_mid_stream() -> None:
    with nats_cluster() as servers:
        urls = [s.url.removeprefix("nats://") for s in servers]
        prefix = "c" + uuid.uuid4().hex[:6]
        # node A on server 0, node B on server 1 (the rest of the list for reconnects)
        url_a = f"nats://{urls[0]},{urls[2]}?prefix={prefix}&replicas=3&randomize=0"
        url_b = f"nats://{urls[1]},{urls[2]}?prefix={prefix}&replicas=3&randomize=0"
        async with Hub(url_a, history_size=1000, history_ttl=300) as a, \
                Hub(url_b, history_size=1000, history_ttl=300) as b:
            sink = Sink()
            conn = a.register(sink)
            await a.subscribe(conn, "stream/x")
            acked: list[Publication] = []
            stop = asyncio.Event()

            async def publisher() -> None:
                i = 0
                while not stop.is_set():
                    try:
                        acked.append(await b.publish("stream/x", i))
                    except Exception:
                        await asyncio.sleep(0.05)  # failed: not acknowledged
                    i += 1
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(publisher())
            await wait_until(lambda: len(sink.of("publication")) >= 50, 15, "traffic")
            servers[0].kill()  # node A's server
            killed_at = len(acked)
            await wait_until(lambda: len(acked) >= killed_at + 100, 30, "publishing goes on")
            seen = len(sink.of("publication"))
            await wait_until(lambda: len(sink.of("publication")) >= seen + 50, 30,
                             "delivery to node A goes on via another server")
            stop.set()
            await task
            # the failover is retried inside the broker (up to ?failover= s); a publish
            # still refused gets offset 0 from the hub (local only: not acknowledged)
            positioned = [p for p in acked if p.offset > 0]
            refused = len(acked) - len(positioned)
            assert refused <= 5, f"{refused} of {len(acked)} publishes got no position"
            acked = positioned
            offsets = [p.offset for p in acked]
            assert offsets == list(range(1, len(acked) + 1)), [
                (i, o) for i, o in enumerate(offsets, 1) if i != o][:5]
            page = await a.history("stream/x")
            stored = {p.offset: p.data for p in page.publications}
            missing = [p.offset for p in acked if stored.get(p.offset) != p.data]
            assert missing == [], f"{len(missing)} of {len(acked)} lost"  # none acked lost
