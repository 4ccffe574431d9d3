"""Cross-node latency: what the Redis hop adds to publish -> deliver.

Starts ``tidings serve`` processes: (a) one node on ``memory://``; (b) two nodes
sharing Redis; with ``--setups``, also two nodes sharing RabbitMQ
(``amqp``) or Mosquitto (``mqtt``). N subscribers (split evenly over the nodes of a setup) subscribe
to one channel; a publisher connected to the *last* node publishes at a fixed
rate with a ``perf_counter_ns`` timestamp in the data (CLOCK_MONOTONIC: the
same clock in every process of the machine). Subscribers parse every k-th frame
only and report p50/p99 latency; the difference between (b) and (a) is the
cost of the Redis hop.

    python -m benchmarks.crossnode [--subscribers 100] [--rate 1000] [--seconds 5]
                                   [--redis redis://127.0.0.1:6379/0] [--json FILE]
                                   [--nats nats://127.0.0.1:4222]
                                   [--setups memory redis nats amqp mqtt]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import websockets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(broker: str) -> Any:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings.server.cli", "serve", "--port", str(port),
         "--broker", broker, "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{base}/health", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("server did not start") from None
            time.sleep(0.05)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def subscriber(base: str, channel: str, every: int, lat: list[float],
                     ready: asyncio.Event, total: list[int], sockets: list[Any],
                     drained: asyncio.Event) -> None:
    async with websockets.connect(f"ws://{base}/ws", max_size=None) as ws:
        sockets.append(ws)
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": channel}))
        await ws.recv()
        ready.set()
        n = 0
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in ws:  # ends when the benchmark closes the socket
                n += 1
                total[0] += 1
                if total[0] == total[1]:
                    drained.set()
                if n % every == 0:
                    now = time.perf_counter_ns()
                    lat.append((now - json.loads(frame)["data"]["t"]) / 1e6)


async def measure(bases: list[str], subscribers: int, rate: float, seconds: float,
                  every: int) -> dict[str, Any]:
    channel = f"bench/{uuid.uuid4().hex[:6]}"
    lat: list[float] = []
    total = [0, -1]  # frames received, frames expected (known once publishing ends)
    drained = asyncio.Event()
    sockets: list[Any] = []
    readies = [asyncio.Event() for _ in range(subscribers)]
    tasks = [asyncio.create_task(subscriber(bases[i % len(bases)], channel, every, lat,
                                            readies[i], total, sockets, drained))
             for i in range(subscribers)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    sent = 0
    async with websockets.connect(f"ws://{bases[-1]}/ws") as pub:
        await pub.recv()
        interval = 1.0 / rate
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            due = start + sent * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await pub.send(json.dumps({"type": "publish", "channel": channel,
                                       "data": {"t": time.perf_counter_ns(), "pad": "x" * 64}}))
            sent += 1
    total[1] = sent * subscribers  # let the backlog drain: lag is not loss
    if total[0] >= total[1]:
        drained.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(drained.wait(), 15)
    await asyncio.gather(*(ws.close() for ws in sockets))
    await asyncio.gather(*tasks)
    lat.sort()
    return {
        "published": sent,
        "deliveries": total[0],
        "expected": sent * subscribers,
        "p50_ms": round(statistics.median(lat), 3) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3) if lat else None,
        "samples": len(lat),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    if "memory" in args.setups:
        with serve("memory://") as base:
            print("  memory, 1 node ...", file=sys.stderr)
            r = await measure([base], args.subscribers, args.rate, args.seconds, args.every)
            results.append({"setup": "memory, 1 node", **r})
    remote = {"redis": args.redis, "nats": args.nats, "amqp": args.amqp, "mqtt": args.mqtt}
    for name in ("redis", "nats", "amqp", "mqtt"):
        if name not in args.setups or not remote[name]:
            continue
        base_url = remote[name]
        url = base_url + ("&" if "?" in base_url else "?") + f"prefix=xn{uuid.uuid4().hex[:6]}"
        with serve(url) as b1, serve(url) as b2:
            print(f"  {name}, 2 nodes ...", file=sys.stderr)
            r = await measure([b1, b2], args.subscribers, args.rate, args.seconds, args.every)
            results.append({"setup": f"{name}, 2 nodes", **r})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="publications per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--every", type=int, default=10, help="parse every k-th frame")
    parser.add_argument("--redis", default=os.environ.get("TIDINGS_REDIS_URL",
                                                          "redis://127.0.0.1:6379/0"))
    parser.add_argument("--amqp", default=os.environ.get(
        "TIDINGS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--mqtt", default=os.environ.get("TIDINGS_MQTT_URL",
                                                         "mqtt://127.0.0.1:1883"))
    parser.add_argument("--nats", default=os.environ.get("TIDINGS_NATS_URL",
                                                         "nats://127.0.0.1:4222"))
    parser.add_argument("--setups", nargs="+", default=["memory", "redis", "nats"],
                        choices=["memory", "redis", "nats", "amqp", "mqtt"])
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(f"N = {args.subscribers}, {args.rate:g} publications/s for {args.seconds:g} s")
    print("| setup | published | deliveries (expected) | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['setup']} | {r['published']} | {r['deliveries']} ({r['expected']}) "
              f"| {r['p50_ms']} | {r['p99_ms']} |")
    first = results[0] if results and results[0]["setup"].startswith("memory") else None
    for r in results[1:]:
        if first is not None and first["p50_ms"] is not None and r["p50_ms"]:
            print(f"{r['setup']}: hop at p50 {r['p50_ms'] - first['p50_ms']:+.3f} ms")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
