"""PostgreSQL: tidings' broker vs encode/broadcaster's Postgres backend, one server.

Two nodes, each a process with its own connections to the same PostgreSQL
(tidings: a ``Hub`` on one ``postgresql://`` URL each; broadcaster: a
``Broadcast`` on one ``postgres://`` URL each). Node 1 (this process)
publishes, node 2 (a subprocess) has N in-process subscribers; a run ends when
every delivery reached node 2. Node 2's tidings subscribers are hub
connections (a native frame encoded and queued per subscriber); broadcaster's
are its ``subscribe()`` iterators.

- publish: one publisher, N = 1, history on for tidings (1,000 / 10 min; the
  offset, the history row and the NOTIFY in one transaction per batch).
  tidings is measured two ways: pipelined (what one websocket producer gets:
  publishes go out without waiting for the previous reply, 256 in flight) and
  awaited one by one. broadcaster can only await one by one: its backend has
  one connection and asyncpg refuses a second query while one runs; it keeps
  no history.
- fan-out: N = 1,000 subscribers on node 2, ``--fanout-messages`` (1,000)
  publications, deliveries per second (publisher pipelined for tidings,
  awaited for broadcaster).
- ``--latency``: the cross-node hop with two ``tidings serve`` processes
  (benchmarks/crossnode.py's measure), postgres vs redis.

    python -m benchmarks.postgres [--url postgresql://postgres@127.0.0.1:5432/test]
                                  [--seconds 3] [--latency] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import MutableMapping
from typing import Any

import asyncpg
from broadcaster import Broadcast

from benchmarks.crossnode import measure, serve
from tidings import Hub, Limits


class Counter:
    """An ASGI send that counts frames."""

    def __init__(self, shared: list[float]) -> None:
        self.shared = shared  # [received, time of the last one]

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.shared[0] += 1
        self.shared[1] = time.time()


async def drop(url: str, prefix: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for table in ("meta", "history", "spill", "presence", "queue", "qmeta"):
            await conn.execute(f"DROP TABLE IF EXISTS {prefix}_{table} CASCADE")
        rows = await conn.fetch("SELECT oid::regprocedure AS f FROM pg_proc "
                                "WHERE proname LIKE $1", prefix + "\\_%")
        for row in rows:
            await conn.execute(f"DROP FUNCTION IF EXISTS {row['f']} CASCADE")
    finally:
        await conn.close()


HISTORY = (1000, 600.0)
CHANNEL = "bench/pg"
LIMITS = Limits(outbox_size=10**6, outbox_bytes=1 << 30)


async def subscriber_node(stack: str, url: str, subscribers: int, channel: str) -> None:
    """Node 2, in a process of its own: N subscribers; prints ``ready``, then
    reads the expected count on stdin and prints what it got, when, and its CPU."""
    shared = [0.0, 0.0]
    tasks: list[asyncio.Task[None]] = []
    if stack == "tidings":
        hub = Hub(url, history_size=HISTORY[0], history_ttl=HISTORY[1], limits=LIMITS)
        await hub.start()
        for _ in range(subscribers):
            await hub.subscribe(hub.register(Counter(shared)), channel)
    else:
        node = Broadcast(url)
        await node.connect()
        ready = [asyncio.Event() for _ in range(subscribers)]

        async def one(k: int) -> None:
            async with node.subscribe(channel=channel) as sub:
                ready[k].set()
                async for _event in sub:  # type: ignore[union-attr]
                    shared[0] += 1
                    shared[1] = time.time()

        # the first one alone: concurrent first subscribes would each LISTEN on
        # the backend's one connection at once, which asyncpg refuses
        tasks.append(asyncio.create_task(one(0)))
        await asyncio.wait_for(ready[0].wait(), 10)
        tasks += [asyncio.create_task(one(k)) for k in range(1, subscribers)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
    cpu0 = time.process_time()
    print("ready", flush=True)
    expected = int(await asyncio.to_thread(sys.stdin.readline))
    deadline = time.monotonic() + 60
    while shared[0] < expected and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # polled: an event per delivery would cost more
    cpu = time.process_time() - cpu0
    print(json.dumps({"received": shared[0], "last": shared[1], "cpu": cpu}), flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if stack == "tidings":
        await hub.stop()
    else:
        await node.disconnect()


async def run(stack: str, url: str, subscribers: int, seconds: float, mode: str,
              window_size: int = 256, count: int = 0, extra: str = "") -> dict[str, Any]:
    """Node 1 (here) publishes for ``seconds`` (or ``count`` publications);
    node 2 is a subprocess."""
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    if stack == "tidings":
        node_url = f"{url}?prefix={prefix}{extra}"
        channel = CHANNEL
    else:
        node_url = url.replace("postgresql://", "postgres://", 1)
        channel = f"bench_{prefix}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.postgres", "--role", "subscriber", "--stack", stack,
        "--url", node_url, "--subscribers", str(subscribers), "--channel", channel,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    hub: Hub | None = None
    bcast: Broadcast | None = None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line.strip() == b"ready", line
        payload = {"seq": 0, "pad": "x" * 64}
        message = json.dumps(payload)
        published = 0
        if stack == "tidings":
            hub = Hub(node_url, history_size=HISTORY[0], history_ttl=HISTORY[1],
                      limits=LIMITS)
            await hub.start()
        else:
            bcast = Broadcast(node_url)
            await bcast.connect()
        window = asyncio.Semaphore(window_size)

        def settled(_outcome: object) -> None:
            window.release()

        cpu0, t0 = time.process_time(), time.time()
        deadline = t0 + seconds if not count else float("inf")

        def more() -> bool:
            return published < count if count else time.time() < deadline

        if hub is not None and mode == "pipelined":
            while more():
                for _ in range(64):
                    await window.acquire()
                    hub.publish_then(channel, payload, done=settled)
                    published += 1
            for _ in range(window_size):
                await window.acquire()
        elif hub is not None:
            while more():
                await hub.publish(channel, payload)
                published += 1
        else:
            assert bcast is not None
            while more():
                await bcast.publish(channel=channel, message=message)
                published += 1
        publish_s = time.time() - t0
        cpu = time.process_time() - cpu0
        proc.stdin.write(f"{published * subscribers}\n".encode())
        await proc.stdin.drain()
        report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 120))
    finally:
        if hub is not None:
            await hub.stop()
        if bcast is not None:
            await bcast.disconnect()
        await proc.wait()
        if stack == "tidings":
            await drop(url, prefix)
    received = int(report["received"])
    elapsed = max(publish_s, report["last"] - t0)
    name = f"{stack} postgres, {mode}" + (", unlogged" if "unlogged" in extra else "")
    return {"stack": name, "history": "on" if stack == "tidings" else "none",
            "subscribers": subscribers, "published": published,
            "publish_per_s": round(published / publish_s),
            "delivered": received, "expected": published * subscribers,
            "delivered_per_s": round(received / elapsed),
            "cpu_us_per_delivery": round((cpu + report["cpu"]) / max(1, received) * 1e6, 2)}


async def latency(url: str, redis: str, seconds: float) -> list[dict[str, Any]]:
    out = []
    for name, broker in (
            ("postgres, 2 nodes", f"{url}?prefix=xn{uuid.uuid4().hex[:6]}"),
            ("postgres unlogged, 2 nodes", f"{url}?prefix=xn{uuid.uuid4().hex[:6]}&unlogged=1"),
            ("redis, 2 nodes", f"{redis}?prefix=xn{uuid.uuid4().hex[:6]}")):
        with serve(broker) as b1, serve(broker) as b2:
            print(f"  latency {name} ...", file=sys.stderr)
            r = await measure([b1, b2], 20, 1000.0, seconds, 10)
            out.append({"setup": name, "subscribers": 20, "rate": 1000, **r})
        if broker.startswith("postgres"):
            await drop(url, broker.split("prefix=", 1)[1].split("&", 1)[0])
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for subscribers in (1, 1000):
        for stack, mode, extra in (("tidings", "pipelined", ""),
                                   ("tidings", "pipelined", "&unlogged=1"),
                                   ("tidings", "awaited", ""),
                                   ("broadcaster", "awaited", "")):
            if subscribers > 1 and (mode == "awaited" or extra) and stack == "tidings":
                continue
            print(f"  N = {subscribers}: {stack} {mode}{extra} ...", file=sys.stderr)
            rows.append(await run(stack, args.url, subscribers, args.seconds, mode,
                                  args.window, args.fanout_messages if subscribers > 1 else 0,
                                  extra))
    result: dict[str, Any] = {"rows": rows}
    if args.latency:
        result["latency"] = await latency(args.url, args.redis, args.seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--window", type=int, default=256,
                        help="publishes in flight of the pipelined publisher")
    parser.add_argument("--fanout-messages", type=int, default=1000,
                        help="publications of the N = 1,000 runs")
    parser.add_argument("--role", default="publisher", help=argparse.SUPPRESS)
    parser.add_argument("--stack", default="tidings", help=argparse.SUPPRESS)
    parser.add_argument("--subscribers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--channel", default=CHANNEL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "subscriber":
        asyncio.run(subscriber_node(args.stack, args.url, args.subscribers, args.channel))
        return 0
    result = asyncio.run(main_async(args))
    print("| stack | history | N | published | publishes/s | deliveries/s (got / expected) | "
          "CPU µs/delivery (both nodes) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['stack']} | {r['history']} | {r['subscribers']} | {r['published']:,} | "
              f"{r['publish_per_s']:,} | {r['delivered_per_s']:,} "
              f"({r['delivered']:,} / {r['expected']:,}) | {r['cpu_us_per_delivery']} |")
    for r in result.get("latency", []):
        print(f"latency {r['setup']}: N = 20, 1000/s: p50 {r['p50_ms']} ms, "
              f"p99 {r['p99_ms']} ms, {r['deliveries']:,}/{r['expected']:,}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
