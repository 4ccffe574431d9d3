"""The stacks ``benchmarks.compare`` measures: how to start each server, how its
subscribers subscribe, what its frames look like, and which broker process it
leans on (whose CPU is reported beside the server's).

A stack is one server (``nodes = 1``), or two processes of the same server on
one broker (``nodes = 2``: the publisher on the first, every subscriber on the
second, so each publication crosses the broker), or ``tidings serve --workers
2`` (one port, the kernel spreads connections over the workers, the ipc relay
joins them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from benchmarks import natsws

__all__ = ["GROUPS", "STACKS", "Stack", "broker_pids", "publication"]

CHANNEL = "bench/fanout"
NATS_SUBJECT = "bench.fanout"
REDIS_URL = os.environ.get("TIDINGS_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("TIDINGS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("TIDINGS_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("TIDINGS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MQTT_URL = os.environ.get("TIDINGS_MQTT_URL", "mqtt://127.0.0.1:1883")


def nats_server_binary() -> str | None:
    """``TIDINGS_NATS_SERVER``, else the one next to this Python (a venv's
    ``bin/``), else ``nats-server`` on PATH."""
    env = os.environ.get("TIDINGS_NATS_SERVER")
    if env:
        return env if shutil.which(env) else None
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


@dataclass
class Stack:
    key: str
    label: str
    argv: Callable[[int, str], list[str]]  # (port, run tag) -> command
    kind: str  # raw | fdw | tidings | socketio | nats: subscribe steps and frame shapes
    sub_path: str = "/sub"
    pub_path: str = "/pub"
    sizes: tuple[int, ...] = (1, 100, 1000)
    broker: str | None = None  # redis | postgres | nats | amqp | mqtt: whose CPU to report
    peer: bool = True  # a Python library a user would otherwise pick: in "best peer" figures
    requires: tuple[str, ...] = ("fastapi",)  # modules the server imports (the bench extra)
    nodes: int = 1  # 2: publisher on node 1, subscribers on node 2, one broker between
    workers: int = 1  # tidings serve --workers: the publisher is kept off the N = 1 worker
    idle: bool = True  # the idle-memory scenario (single-node stacks)
    binary: Callable[[], str | None] | None = None  # an executable the stack needs

    @property
    def setup(self) -> str:
        if self.nodes > 1:
            return f"{self.nodes} nodes"
        if self.workers > 1:
            return f"--workers {self.workers}"
        return "1 node"


def _peer(module: str, *extra: str) -> Callable[[int, str], list[str]]:
    def argv(port: int, tag: str) -> list[str]:
        args = [arg.replace("{tag}", tag) for arg in extra]
        return [sys.executable, "-m", f"benchmarks.peers.{module}", "--port", str(port), *args]
    return argv


def _tidings(*extra: str) -> Callable[[int, str], list[str]]:
    def argv(port: int, tag: str) -> list[str]:
        args = [arg.replace("{tag}", tag) for arg in extra]
        return [sys.executable, "-m", "tidings.server.cli", "serve", "--port", str(port),
                "--log-level", "warning", *args]
    return argv


def _tidings_fastapi(*extra: str) -> Callable[[int, str], list[str]]:
    def argv(port: int, tag: str) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port",
                str(port), "--log-level", "warning", *extra]
    return argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nats_ws(port: int, tag: str) -> list[str]:
    """A private nats-server whose websocket listener is the stack: the Go
    ceiling for a NATS fan-out (no JetStream, no TLS, default limits)."""
    binary = nats_server_binary()
    if binary is None:
        raise RuntimeError("nats-server not found (TIDINGS_NATS_SERVER)")
    conf = Path(tempfile.gettempdir()) / f"bench-nats-{tag}-{port}.conf"
    conf.write_text(f"listen: 127.0.0.1:{free_port()}\n"
                    f"websocket {{\n  host: 127.0.0.1\n  port: {port}\n  no_tls: true\n}}\n",
                    "utf-8")
    return [binary, "-c", str(conf)]


def _with(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


def _tidings_on(key: str, label: str, broker: str, url: str,
                requires: tuple[str, ...] = ()) -> Stack:
    """Two ``tidings serve`` nodes on one broker (issue 17)."""
    return Stack(key, label, _tidings("--broker", _with(url, "prefix=bench{tag}")), "tidings",
                 sub_path="/ws", pub_path=f"/ws/pub/{CHANNEL}", sizes=(1, 1000),
                 broker=broker, peer=False, requires=requires, nodes=2, idle=False)


STACKS: dict[str, Stack] = {s.key: s for s in [
    Stack("picows", "picows server, loop of `transport.send`", _peer("picows_loop"), "raw",
          requires=("picows",)),
    Stack("picows-uvloop", "picows server on uvloop", _peer("picows_loop", "--uvloop"), "raw",
          requires=("picows", "uvloop")),
    Stack("websockets", "`websockets` server + `websockets.broadcast`",
          _peer("websockets_broadcast"), "raw", requires=("websockets",)),
    Stack("fastapi-loop", "FastAPI + uvicorn, loop of `await ws.send_text`",
          _peer("fastapi_loop"), "raw"),
    Stack("broadcaster", "FastAPI + encode/broadcaster (memory)",
          _peer("fastapi_broadcaster"), "raw", requires=("fastapi", "broadcaster")),
    Stack("fdw", "fastapi-distributed-websocket (memory)", _peer("fastapi_distributed"), "fdw",
          requires=("fastapi", "distributed_websocket")),
    Stack("socketio", "python-socketio room emit", _peer("socketio_room"), "socketio",
          sub_path="/socket.io/?EIO=4&transport=websocket&role=sub",
          pub_path="/socket.io/?EIO=4&transport=websocket&role=pub", requires=("socketio",)),
    Stack("broadcaster-redis", "broadcaster with Redis",
          _peer("fastapi_broadcaster", "--url", REDIS_URL, "--channel", "bench-{tag}"), "raw",
          sizes=(1,), broker="redis", requires=("fastapi", "broadcaster", "redis")),
    Stack("tidings", "**tidings serve** (memory)", _tidings(), "tidings",
          sub_path="/ws", pub_path=f"/ws/pub/{CHANNEL}", peer=False, requires=()),
    Stack("tidings-fastapi", "**tidings in FastAPI** (uvicorn, `hub.router`)", _tidings_fastapi(),
          "tidings", sub_path="/rt/ws", pub_path=f"/rt/ws/pub/{CHANNEL}", peer=False),
    Stack("tidings-fastapi-direct",
          "**tidings in FastAPI**, uvicorn `--ws tidings.server.wsproto:DirectWSProtocol`",
          _tidings_fastapi("--ws", "tidings.server.wsproto:DirectWSProtocol"),
          "tidings", sub_path="/rt/ws", pub_path=f"/rt/ws/pub/{CHANNEL}", peer=False),
    Stack("tidings-redis", "**tidings serve --broker redis**",
          _tidings("--broker", _with(REDIS_URL, "prefix=bench{tag}")), "tidings",
          sub_path="/ws", pub_path=f"/ws/pub/{CHANNEL}", sizes=(1, 1000), broker="redis",
          peer=False, requires=("redis",)),
    # -- every broker the same way (issue 17): two nodes, publisher on the first ---------
    Stack("tidings-ipc", "**tidings serve --workers 2** (ipc relay)", _tidings("--workers", "2"),
          "tidings", sub_path="/ws", pub_path=f"/ws/pub/{CHANNEL}", sizes=(1, 1000),
          peer=False, requires=(), workers=2, idle=False),
    _tidings_on("tidings-redis-2n", "**tidings serve x2 on Redis**", "redis", REDIS_URL,
                ("redis",)),
    Stack("broadcaster-redis-2n", "broadcaster x2 on Redis",
          _peer("fastapi_broadcaster", "--url", REDIS_URL, "--channel", "bench-{tag}"), "raw",
          sizes=(1, 1000), broker="redis", nodes=2, idle=False,
          requires=("fastapi", "broadcaster", "redis")),
    _tidings_on("tidings-postgres-2n", "**tidings serve x2 on PostgreSQL**", "postgres",
                POSTGRES_URL, ("asyncpg",)),
    Stack("broadcaster-postgres-2n", "broadcaster x2 on PostgreSQL",
          _peer("fastapi_broadcaster", "--url",
                POSTGRES_URL.replace("postgresql://", "postgres://", 1),
                "--channel", "bench_{tag}"), "raw",
          sizes=(1, 1000), broker="postgres", nodes=2, idle=False,
          requires=("fastapi", "broadcaster", "asyncpg")),
    _tidings_on("tidings-nats-2n", "**tidings serve x2 on NATS** (JetStream)", "nats",
                NATS_URL),
    Stack("nats-ws", "nats-server's own websocket listener (Go)", _nats_ws, "nats",
          sub_path="/", pub_path="/", sizes=(1, 1000), requires=(), idle=False, peer=False,
          binary=nats_server_binary),
    _tidings_on("tidings-amqp-2n", "**tidings serve x2 on RabbitMQ**", "amqp", AMQP_URL),
    _tidings_on("tidings-mqtt-2n", "**tidings serve x2 on MQTT** (Mosquitto)", "mqtt",
                MQTT_URL),
]}

GROUPS: dict[str, tuple[str, ...]] = {
    "quick": ("picows", "picows-uvloop", "websockets", "fastapi-loop", "tidings",
              "tidings-fastapi", "tidings-fastapi-direct"),
    "peers": ("picows", "picows-uvloop", "websockets", "fastapi-loop", "broadcaster", "fdw",
              "socketio", "broadcaster-redis", "tidings", "tidings-fastapi",
              "tidings-fastapi-direct", "tidings-redis"),
    "brokers": ("tidings", "tidings-ipc", "tidings-redis-2n", "broadcaster-redis-2n",
                "tidings-postgres-2n", "broadcaster-postgres-2n", "tidings-nats-2n",
                "nats-ws", "tidings-amqp-2n", "tidings-mqtt-2n"),
    "none": (),  # e.g. --stacks none --huge --channels 100: the scale figures alone
}
"""Names ``--stacks`` also takes. Without ``--stacks``: ``peers`` (the issue 7
suite), ``quick`` with ``--quick``."""

_NATS_HELLO = [("recv", b"INFO ")]
SUB_STEPS: dict[str, list[tuple[str, bytes]]] = {
    "raw": [("recv", b'{"type":"subscribed"')],
    "fdw": [("recv", b'{"type":"subscribed"')],
    "tidings": [("recv", b'{"type":"welcome"'),
                ("send", orjson.dumps({"type": "subscribe", "id": 1, "channel": CHANNEL})),
                ("recv", b'{"type":"reply"')],
    "socketio": [("recv", b"0{"), ("send", b"40"), ("recv", b"40")],
    "nats": [*_NATS_HELLO, ("send", natsws.connect_frame(NATS_SUBJECT)), ("recv", b"PONG")],
}
PUB_STEPS: dict[str, list[tuple[str, bytes]]] = {
    "raw": [], "fdw": [], "tidings": [],
    "socketio": [("recv", b"0{"), ("send", b"40"), ("recv", b"40")],
    "nats": [*_NATS_HELLO, ("send", natsws.connect_frame()), ("recv", b"PONG")],
}
PREFIX = {"raw": b'{"ts"', "fdw": b'{"ts"', "tidings": b'{"type":"publication"',
          "socketio": b'42["msg"', "nats": b'{"ts"'}
EXTRACT = {"raw": "raw", "fdw": "raw", "tidings": "tidings", "socketio": "socketio",
           "nats": "raw"}
_SUBJECT = NATS_SUBJECT.encode()


def publication(kind: str, ts: int, seq: int, pad: str) -> bytes:
    """The payload of one publisher frame of a stack."""
    if kind == "fdw":
        return orjson.dumps({"type": "send", "topic": "bench", "ts": ts, "seq": seq, "pad": pad})
    body = orjson.dumps({"ts": ts, "seq": seq, "pad": pad})
    if kind == "socketio":
        return b'42["pub",' + body + b"]"
    if kind == "nats":
        return natsws.pub(_SUBJECT, body)
    return body


def channel_steps(channel: str) -> list[tuple[str, bytes]]:
    """A tidings subscriber of ``channel`` (the many-channels scenario)."""
    return [("recv", b'{"type":"welcome"'),
            ("send", orjson.dumps({"type": "subscribe", "id": 1, "channel": channel})),
            ("recv", b'{"type":"reply"')]


def native_publish(channel: str, ts: int, seq: int, pad: str) -> bytes:
    return orjson.dumps({"type": "publish", "channel": channel,
                         "data": {"ts": ts, "seq": seq, "pad": pad}})


# -- the broker processes ---------------------------------------------------------------

_COMM = {"redis": ("redis-server",), "postgres": ("postgres",), "nats": ("nats-server",),
         "amqp": ("beam.smp",), "mqtt": ("mosquitto",)}


def _comm_and_ppid(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            stat = file.read()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    return comm, int(stat[stat.rindex(")") + 2:].split()[1])


def broker_pids(broker: str | None, exclude: set[int] | frozenset[int] = frozenset()
                ) -> list[int]:
    """The root processes of a broker server on this machine, found by name in
    /proc (their children, e.g. PostgreSQL's backends, count with them)."""
    names = _COMM.get(broker or "")
    if not names:
        return []
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        info = _comm_and_ppid(int(entry))
        if info is not None and info[0] in names:
            found[int(entry)] = info[1]
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


def cleanup(stack: Stack, tag: str) -> None:
    """Remove what a tidings broker stack left on a shared server (best effort):
    PostgreSQL tables and functions, JetStream streams."""
    if not stack.key.startswith("tidings-"):
        return
    prefix = f"bench{tag}"
    if stack.broker == "postgres":
        with contextlib.suppress(Exception):
            import asyncio

            from benchmarks.postgres import drop

            asyncio.run(drop(POSTGRES_URL, prefix))
    elif stack.broker == "nats":
        host_port = NATS_URL.split("://", 1)[1].split("?", 1)[0].split(",", 1)[0]
        host, _, port = host_port.rpartition(":")
        with contextlib.suppress(OSError):
            natsws.delete_streams(host or "127.0.0.1", int(port or 4222),
                                  [f"{prefix}_{s}" for s in ("H", "P", "Q", "QZ")])
