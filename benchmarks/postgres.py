"""PostgreSQL: tidings' broker vs encode/broadcaster's Postgres backend, one server.

Two nodes in one process, each with its own connections to the same
PostgreSQL (tidings: two ``Hub``s on one ``postgresql://`` URL; broadcaster:
two ``Broadcast`` objects on one ``postgres://`` URL). Node 1 publishes, node 2
has N subscribers; a run ends when every delivery reached node 2.

- publish: one publisher, N = 1, history on for tidings (1,000 / 10 min; the
  offset, the history row and the NOTIFY in one transaction per batch).
  tidings is measured two ways: pipelined (what one websocket producer gets:
  publishes go out without waiting for the previous reply, 256 in flight) and
  awaited one by one. broadcaster can only await one by one: its backend has
  one connection and asyncpg refuses a second query while one runs; it keeps
  no history.
- fan-out: N = 1 and N = 1,000 subscribers on node 2, deliveries per second
  (publisher pipelined for tidings, awaited for broadcaster).
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

from tidings import Hub, Limits


class Counter:
    """An ASGI send that counts frames and fires when a target is reached."""

    def __init__(self, shared: list[int], done: asyncio.Event) -> None:
        self.shared = shared  # [received, expected]
        self.done = done

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        shared = self.shared
        shared[0] += 1
        if shared[0] >= shared[1] > 0:
            self.done.set()


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


async def tidings_run(url: str, subscribers: int, seconds: float, pipelined: bool,
                      history: bool = True, window_size: int = 256,
                      query: str = "") -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    size, ttl = (1000, 600.0) if history else (0, 0.0)
    limits = Limits(outbox_size=10**6, outbox_bytes=1 << 30)
    broker = f"{url}?prefix={prefix}{query}"
    node1 = Hub(broker, history_size=size, history_ttl=ttl, limits=limits)
    node2 = Hub(broker, history_size=size, history_ttl=ttl, limits=limits)
    await node1.start()
    await node2.start()
    channel = "bench/pg"
    shared = [0, 0]
    done = asyncio.Event()
    try:
        for _ in range(subscribers):
            conn = node2.register(Counter(shared, done))
            await node2.subscribe(conn, channel)
        payload = {"seq": 0, "pad": "x" * 64}
        published = 0
        window = asyncio.Semaphore(window_size)
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        if pipelined:
            def settled(_outcome: object) -> None:
                window.release()

            while time.perf_counter() < deadline:
                for _ in range(64):
                    await window.acquire()
                    node1.publish_then(channel, payload, done=settled)
                    published += 1
            for _ in range(window_size):
                await window.acquire()
        else:
            while time.perf_counter() < deadline:
                await node1.publish(channel, payload)
                published += 1
        publish_s = time.perf_counter() - t0
        shared[1] = published * subscribers
        if shared[0] >= shared[1]:
            done.set()
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await node1.stop()
        await node2.stop()
        await drop(url, prefix)
    return {"stack": "tidings postgres" + (" pipelined" if pipelined else " awaited"),
            "history": "on" if history else "off", "subscribers": subscribers,
            "published": published, "publish_per_s": round(published / publish_s),
            "delivered_per_s": round(shared[0] / elapsed),
            "cpu_us_per_delivery": round(cpu / max(1, shared[0]) * 1e6, 2)}


async def broadcaster_run(url: str, subscribers: int, seconds: float) -> dict[str, Any]:
    bcast_url = url.replace("postgresql://", "postgres://", 1)
    node1, node2 = Broadcast(bcast_url), Broadcast(bcast_url)
    await node1.connect()
    await node2.connect()
    channel = f"bench_{uuid.uuid4().hex[:6]}"
    shared = [0, 0]
    done = asyncio.Event()
    ready = [asyncio.Event() for _ in range(subscribers)]

    async def subscriber(k: int) -> None:
        async with node2.subscribe(channel=channel) as sub:
            ready[k].set()
            async for _event in sub:  # type: ignore[union-attr]
                shared[0] += 1
                if shared[0] >= shared[1] > 0:
                    done.set()

    # the first one alone: concurrent first subscribes would each LISTEN on the
    # backend's one connection at once, which asyncpg refuses
    tasks = [asyncio.create_task(subscriber(0))]
    try:
        await asyncio.wait_for(ready[0].wait(), 10)
        tasks += [asyncio.create_task(subscriber(k)) for k in range(1, subscribers)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
        await asyncio.sleep(0.2)  # the LISTEN of the first subscriber is done
        message = json.dumps({"seq": 0, "pad": "x" * 64})
        published = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            await node1.publish(channel=channel, message=message)
            published += 1
        publish_s = time.perf_counter() - t0
        shared[1] = published * subscribers
        if shared[0] >= shared[1]:
            done.set()
        try:
            await asyncio.wait_for(done.wait(), 120)
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node1.disconnect()
        await node2.disconnect()
    return {"stack": "broadcaster postgres", "history": "none", "subscribers": subscribers,
            "published": published, "publish_per_s": round(published / publish_s),
            "delivered_per_s": round(shared[0] / elapsed),
            "cpu_us_per_delivery": round(cpu / max(1, shared[0]) * 1e6, 2)}


async def latency(url: str, redis: str, seconds: float) -> list[dict[str, Any]]:
    from benchmarks.crossnode import measure, serve

    out = []
    for name, broker in (("postgres, 2 nodes", f"{url}?prefix=xn{uuid.uuid4().hex[:6]}"),
                         ("redis, 2 nodes", f"{redis}?prefix=xn{uuid.uuid4().hex[:6]}")):
        with serve(broker) as b1, serve(broker) as b2:
            print(f"  latency {name} ...", file=sys.stderr)
            r = await measure([b1, b2], 20, 1000.0, seconds, 10)
            out.append({"setup": name, "subscribers": 20, "rate": 1000, **r})
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for subscribers in (1, 1000):
        print(f"  N = {subscribers}: tidings pipelined ...", file=sys.stderr)
        rows.append(await tidings_run(args.url, subscribers, args.seconds, True))
        if subscribers == 1:
            print("  N = 1: tidings awaited ...", file=sys.stderr)
            rows.append(await tidings_run(args.url, subscribers, args.seconds, False))
        print(f"  N = {subscribers}: broadcaster ...", file=sys.stderr)
        rows.append(await broadcaster_run(args.url, subscribers, args.seconds))
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
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    print("| stack | history | N | published | publishes/s | deliveries/s | "
          "CPU µs/delivery |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['stack']} | {r['history']} | {r['subscribers']} | {r['published']:,} | "
              f"{r['publish_per_s']:,} | {r['delivered_per_s']:,} | "
              f"{r['cpu_us_per_delivery']} |")
    for r in result.get("latency", []):
        print(f"latency {r['setup']}: N = 20, 1000/s: p50 {r['p50_ms']} ms, "
              f"p99 {r['p99_ms']} ms, {r['deliveries']:,}/{r['expected']:,}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
