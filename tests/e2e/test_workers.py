"""Several worker processes on one port, sharing everything through the built-in relay.

``tidings serve --workers N`` (the supervisor's ``run_workers``); it is started here
in a subprocess (``python -c``) so the test can signal it like a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.support import NativeClient, apost, free_port

pytestmark = pytest.mark.slow



class Supervisor:
    def __init__(self, workers: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="tidings-workers-", suffix=".log",  # noqa: SIM115
                                               delete=False)
        # the real command: `tidings serve --workers N` with no broker
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidings.server.cli", "serve", "--port", str(self.port),
             "--workers", str(workers), "--history-size", "100", "--history-ttl", "60",
             "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body
        except (OSError, ValueError):
            return None

    async def wait_nodes(self, n: int, timeout: float = 30, exclude: frozenset[str] = frozenset()
                         ) -> set[str]:
        """Poll /health (each answer names its worker's node) until ``n`` nodes answered."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(seen - exclude) < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited with {self.proc.returncode}:\n"
                                   + self.output())
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw nodes {seen} only:\n{self.output()}")
            body = await asyncio.to_thread(self.health)
            if body is not None and body.get("status") == "ok":
                seen.add(body["node"])
            else:
                await asyncio.sleep(0.05)
        return seen - exclude

    def children(self) -> list[int]:
        """The worker pids (Linux: the kernel lists a process's children; the other
        child multiprocessing starts is its resource tracker)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = []
        for pid in path.read_text().split():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
        return pids

    def stop(self) -> None:
        """SIGTERM (so it removes its relay directory), SIGKILL if that fails."""
        kids = self.children_or_empty()  # gone from /proc once the supervisor is reaped
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in kids:  # orphans, only if that pid is still one of our workers
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        self.log.close()
        os.unlink(self.log.name)

    def children_or_empty(self) -> list[int]:
        try:
            return self.children()
        except OSError:
            return []


@contextlib.contextmanager
def supervisor(workers: int) -> Iterator[Supervisor]:
    sup = Supervisor(workers)
    try:
        yield sup
    finally:
        sup.stop()


@contextlib.asynccontextmanager
async def clients(base: str) -> AsyncIterator[list[NativeClient]]:
    opened: list[NativeClient] = []
    try:
        yield opened
    finally:
        for client in opened:
            await client.ws.close()


async def connect(base: str) -> NativeClient:
    ws = await websockets.connect("ws://" + base.removeprefix("http://") + "/ws", max_size=None)
    client = NativeClient(ws)
    client.welcome = await client.recv()
    assert client.welcome["type"] == "welcome"
    return client


async def spread(base: str, into: list[NativeClient], nodes: set[str],
                 least: int = 12, most: int = 60) -> None:
    """Connect ``least`` clients, more (up to ``most``) until every node holds one."""
    while len(into) < least or {c.welcome["node"] for c in into} != nodes:
        assert len(into) < most, f"{most} connections all landed on {into[0].welcome['node']}"
        into.append(await connect(base))


async def test_two_workers_share_one_publication_and_stop_cleanly() -> None:
    with supervisor(2) as sup:
        nodes = await sup.wait_nodes(2)
        async with clients(sup.base) as conns:
            await spread(sup.base, conns, nodes)
            assert len(conns) >= 12
            assert {c.welcome["node"] for c in conns} == nodes  # both workers hold clients
            replies = await asyncio.gather(
                *(c.request({"type": "subscribe", "channel": "news"}) for c in conns))
            assert all(r["type"] == "reply" for r in replies), replies

            status, body = await apost(sup.base, "publish", {"channel": "news", "data": 1})
            assert status == 200, body
            offset = body["result"]["offset"]
            firsts = await asyncio.gather(*(c.next("publication") for c in conns))
            assert {(f["data"], f["offset"]) for f in firsts} == {(1, offset)}
            # exactly once: per-channel order means a duplicate would come before this
            status, body = await apost(sup.base, "publish", {"channel": "news", "data": 2})
            assert status == 200, body
            seconds = await asyncio.gather(*(c.next("publication") for c in conns))
            assert {(f["data"], f["offset"]) for f in seconds} == {(2, offset + 1)}
            assert not any(f["type"] == "publication" for c in conns for f in c.pending)

            started = time.monotonic()
            sup.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(sup.proc.wait, 10)
            assert code == 0, sup.output()
            assert time.monotonic() - started < 10
            for client in conns:
                await asyncio.wait_for(client.ws.wait_closed(), 5)
                assert client.ws.close_code == 1001, client.ws.close_code
            assert sup.children_or_empty() == []  # no orphaned workers


async def test_a_killed_worker_is_restarted_and_joins_the_others() -> None:
    with supervisor(2) as sup:
        nodes = await sup.wait_nodes(2)
        workers = sup.children()
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        new = await sup.wait_nodes(1, exclude=frozenset(nodes))  # a fresh node answers
        assert len(new) == 1
        live = await sup.wait_nodes(2)  # only live workers answer /health
        assert new <= live and len(live & nodes) == 1
        # the replacement and the survivor share publications through the relay again
        async with clients(sup.base) as conns:
            await spread(sup.base, conns, live, least=2)
            for c in conns:
                await c.request({"type": "subscribe", "channel": "again"})
            status, body = await apost(sup.base, "publish", {"channel": "again", "data": "x"})
            assert status == 200, body
            got = await asyncio.gather(*(c.next("publication") for c in conns))
            assert {f["data"] for f in got} == {"x"}
        assert "exited unexpectedly" in sup.output()
        sup.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sup.proc.wait, 10) == 0, sup.output()


async def test_workers_are_one_thread_and_stop_when_the_supervisor_is_killed() -> None:
    """A worker has no thread of its own (the kernel tells it of its supervisor's
    death: a process with threads pays more for every socket system call); when
    the supervisor is SIGKILLed, the workers stop instead of serving on."""
    with supervisor(2) as sup:
        await sup.wait_nodes(2)
        workers = sup.children()
        assert len(workers) == 2, workers
        for pid in workers:
            names = [Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
                     for t in os.listdir(f"/proc/{pid}/task")]
            assert len(names) == 1, names
        sup.proc.kill()
        sup.proc.wait(5)
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their supervisor"
            await asyncio.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_bad_settings_fail_once_in_the_supervisor() -> None:
    """Not as N workers crash-looping: before any socket is bound or process started."""
    from tidings.server.supervisor import run_workers

    port = free_port()
    common: dict[str, Any] = {"host": "127.0.0.1", "port": port, "workers": 2,
                              "log_level": "warning"}
    with pytest.raises(TypeError, match="must pickle"):
        run_workers({"can_publish": lambda conn, channel: True}, broker=None, **common)
    with pytest.raises(ValueError, match="unknown broker URL scheme"):
        run_workers({}, broker="nope://x", **common)
    with pytest.raises(ValueError, match="own node"):
        run_workers({"node": "n1"}, broker=None, **common)


async def test_a_queue_is_shared_by_the_workers() -> None:
    """A push on one worker reaches a puller on another: the queue lives in the relay."""
    n = 2000
    with supervisor(2) as sup:
        nodes = await sup.wait_nodes(2)
        ws_base = "ws://" + sup.base.removeprefix("http://")
        pullers: list[Any] = []
        seen: list[int] = []
        per_puller: list[int] = []

        async def clients_per_node() -> dict[str, int]:
            """Ask ``info`` until every node answered (each request lands on some worker)."""
            counts: dict[str, int] = {}
            for _ in range(200):
                status, body = await apost(sup.base, "info", {})
                assert status == 200, body
                node = body["result"]["nodes"][0]
                counts[node["name"]] = node["num_clients"]
                if counts.keys() == nodes:
                    return counts
            raise AssertionError(f"only nodes {counts} answered")

        while True:  # raw pullers until both workers hold some (the kernel spreads them)
            for _ in range(4):
                pullers.append(await websockets.connect(ws_base + "/ws/pull/jobs?ack=manual&max=5"))
            counts = await clients_per_node()
            if all(counts.values()):
                break
            assert len(pullers) < 40, f"{len(pullers)} pullers, all on one worker: {counts}"

        async def pull(k: int, ws: Any) -> None:
            per_puller.append(0)
            while True:
                seen.append(json.loads(await ws.recv()))
                per_puller[k] += 1
                await ws.send('{"ack": true}')

        async def produce(items: range) -> None:
            async with websockets.connect(ws_base + "/ws/push/jobs?ack=1") as ws:
                for i in items:
                    await ws.send(json.dumps(i))
                for _ in items:  # every push confirmed: in the relay
                    assert "item" in json.loads(await ws.recv())

        tasks = [asyncio.create_task(pull(k, ws)) for k, ws in enumerate(pullers)]
        try:
            await asyncio.gather(produce(range(0, n // 2)), produce(range(n // 2, n)))
            deadline = time.monotonic() + 60
            while len(seen) < n:
                assert time.monotonic() < deadline, f"{len(seen)} of {n} items"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a duplicate would show up meanwhile
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ws in pullers:
                await ws.close()
        assert len(seen) == n
        assert sorted(seen) == list(range(n))  # exactly once across every puller
        assert sum(1 for c in per_puller if c) >= 2, per_puller
        status, body = await apost(sup.base, "queue_stats", {"queue": "jobs"})
        assert status == 200, body
        assert body["result"]["length"] == 0, body
