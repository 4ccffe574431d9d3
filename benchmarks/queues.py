"""Work-queue throughput end to end: push -> deliver -> ack, in items/s.

Starts ``tidings serve`` processes: (a) one node on ``memory://``; (b) two nodes
sharing Redis (a fresh ``?prefix=``), the producer on the first, the consumers
spread over both, so every item crosses Redis. One producer pushes N items over
``/ws/push/{queue}?ack=1`` (pipelined: it reads the confirmations
concurrently); C consumers pull over the native protocol with ``max`` in flight
and ack each item as it arrives. The clock runs from the first push until the
queue reports nothing waiting and nothing in flight (``queue_stats``, polled
every 5 ms): every item acked.

    python -m benchmarks.queues [--items 20000] [--consumers 1 4] [--max 64]
                                [--redis redis://127.0.0.1:6379/0] [--json FILE]
                                [--amqp amqp://guest:guest@127.0.0.1:5672/]

With ``--amqp``, also two nodes sharing RabbitMQ (quorum queues; deleted
afterwards). Its ``queue_stats`` ``in_flight`` is the answering node's own, so
the clock stops when the second node holds nothing.

The producer and the consumers run in this one Python process, so on a small
machine the client side is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from typing import Any

import orjson
import websockets

from benchmarks.crossnode import serve


def queue_stats(base: str, queue: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{base}/api/queue_stats", data=json.dumps({"queue": queue}).encode(),
        method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())["result"]
        return result


async def consumer(base: str, queue: str, max_in_flight: int, got: list[int],
                   ready: asyncio.Event, done: asyncio.Event) -> None:
    async with websockets.connect(f"ws://{base}/ws", max_size=None) as ws:
        await ws.recv()  # welcome
        await ws.send(orjson.dumps({"type": "pull", "id": 1, "queue": queue,
                                    "max": max_in_flight}).decode())
        ready.set()
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame.get("type") != "item":
                continue
            got[0] += 1
            if got[0] >= got[1]:
                done.set()
            await ws.send(orjson.dumps({"type": "ack", "queue": queue,
                                        "item": frame["item"]}).decode())


async def producer(base: str, queue: str, n: int) -> float:
    async with websockets.connect(f"ws://{base}/ws/push/{queue}?ack=1", max_size=None) as ws:
        async def confirmations() -> None:
            for _ in range(n):
                await ws.recv()

        reader = asyncio.create_task(confirmations())
        started = time.perf_counter()
        for i in range(n):
            await ws.send(b'{"n":%d}' % i)
        await reader
        return time.perf_counter() - started


USED: list[str] = []  # queue names, for deleting RabbitMQ's quorum queues afterwards


async def delete_amqp_queues(url: str, prefix: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        for queue in USED:
            for suffix in ("", ".delay", ".dead", ".dead.delay"):
                await channel.queue_delete(f"{prefix}.q.{queue}{suffix}")
    finally:
        await conn.close()


async def measure(bases: list[str], items: int, consumers: int,
                  max_in_flight: int) -> dict[str, float]:
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    USED.append(queue)
    got = [0, items]  # received, expected
    done = asyncio.Event()
    readies = [asyncio.Event() for _ in range(consumers)]
    tasks = [asyncio.create_task(consumer(bases[k % len(bases)], queue, max_in_flight, got,
                                          readies[k], done))
             for k in range(consumers)]
    try:
        await asyncio.gather(*(r.wait() for r in readies))
        await asyncio.sleep(0.3)  # pulls registered
        started = time.perf_counter()
        push_s = await producer(bases[0], queue, items)
        await done.wait()
        while True:
            stats = await asyncio.to_thread(queue_stats, bases[-1], queue)
            if stats["length"] == 0 and stats["in_flight"] == 0:
                break
            await asyncio.sleep(0.005)
        total = time.perf_counter() - started
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"items": items, "consumers": consumers, "max_in_flight": max_in_flight,
            "seconds": round(total, 3), "items_per_s": round(items / total),
            "push_items_per_s": round(items / push_s)}


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    setups = [("memory, 1 node", ["memory://"])]
    if args.redis:
        url = f"{args.redis}?prefix=benchq{uuid.uuid4().hex[:6]}"
        setups.append(("redis, 2 nodes", [url, url]))
    amqp_prefix = f"benchq{uuid.uuid4().hex[:6]}"
    if args.amqp:
        url = args.amqp + ("&" if "?" in args.amqp else "?") + f"prefix={amqp_prefix}"
        setups.append(("amqp, 2 nodes", [url, url]))
    try:
        await run_setups(setups, args, results)
    finally:
        if args.amqp:
            await delete_amqp_queues(args.amqp, amqp_prefix)
    return results


async def run_setups(setups: list[tuple[str, list[str]]], args: argparse.Namespace,
                     results: list[dict[str, Any]]) -> None:
    for name, brokers in setups:
        with contextlib.ExitStack() as stack:
            bases = [stack.enter_context(serve(b)) for b in brokers]
            await measure(bases, min(2000, args.items), 1, args.max)  # warm-up
            for c in args.consumers:
                row = {"setup": name, **await measure(bases, args.items, c, args.max)}
                print(json.dumps(row), flush=True)
                results.append(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max", type=int, default=64, help="max in flight per consumer")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0",
                        help="Redis URL ('' to skip)")
    parser.add_argument("--amqp", default="", help="RabbitMQ URL (default: skip)")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
