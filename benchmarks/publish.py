"""Publish throughput of one hub, history on vs off, memory vs Redis vs NATS.

Measures ``hub.publish`` calls per second in-process (no sockets between the
publisher and the hub; one local subscriber connection whose outbox is drained
by its writer task into a counting sink), so the figure is the cost of the
broker path: offsets, history, fan-out to the node.

    python -m benchmarks.publish [--messages 20000] [--redis redis://127.0.0.1:6379/0]
                                 [--nats nats://127.0.0.1:4222]
                                 [--concurrency 64] [--json FILE]
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

from tidings import Hub, Limits


class CountingSink:
    """An ASGI send that only counts frames."""

    def __init__(self) -> None:
        self.frames = 0
        self.done = asyncio.Event()
        self.target = 0

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.frames += 1
        if self.frames >= self.target:
            self.done.set()


async def run_one(url: str, history: bool, messages: int, concurrency: int) -> dict[str, Any]:
    size, ttl = (1000, 600.0) if history else (0, 0.0)
    # a roomy outbox: this measures publishing, not the slow-client policy
    hub = Hub(url, history_size=size, history_ttl=ttl,
              limits=Limits(outbox_size=10**6, outbox_bytes=1 << 30))
    await hub.start()
    try:
        sink = CountingSink()
        sink.target = messages
        conn = hub.register(sink)
        await hub.subscribe(conn, "bench/publish")
        payload = {"seq": 0, "pad": "x" * 64}
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await hub.publish("bench/publish", payload)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(messages)))
        await asyncio.wait_for(sink.done.wait(), 60)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await hub.stop()
    return {
        "broker": url.split("://", 1)[0],
        "history": "on" if history else "off",
        "messages": messages,
        "publish_per_s": round(messages / elapsed),
        "cpu_us_per_publish": round(cpu / messages * 1e6, 1),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    urls = ["memory://"]
    if args.redis:
        urls.append(f"{args.redis}?prefix=bench{uuid.uuid4().hex[:6]}")
    if args.nats:
        urls.append(f"{args.nats}?prefix=bench{uuid.uuid4().hex[:6]}")
    results = []
    for url in urls:
        for history in (False, True):
            print(f"  {url.split('?')[0]} history={'on' if history else 'off'} ...",
                  file=sys.stderr)
            results.append(await run_one(url, history, args.messages, args.concurrency))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64,
                        help="publishes in flight at once (Redis pipelines them)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0",
                        help="Redis URL, or '' to skip")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222",
                        help="NATS URL (JetStream on), or '' to skip")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    print("| broker | history | messages | publishes/s | CPU µs/publish |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['broker']} | {r['history']} | {r['messages']} | {r['publish_per_s']:,} "
              f"| {r['cpu_us_per_publish']} |")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
