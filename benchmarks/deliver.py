"""The fan-out alone: one publication to 1,000 direct-transport subscribers, in process.

No sockets and no producer, so two trees can be compared on a loaded machine
(best of 15 runs of 200 publications): ``PYTHONPATH=src python -m benchmarks.deliver``.
"""

import asyncio
import time

from tidings import Hub
from tidings.types import Publication


class CountingDirect:
    """A direct transport whose writes are only counted."""

    def __init__(self) -> None:
        self.on_resume = None
        self.can_write = True
        self.gone = False
        self.writes = 0
        self.transport = self

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.gone

async def sink(message: object) -> None:
    """ASGI send of a connection that never uses it (direct writes)."""

async def main() -> None:
    hub = Hub()
    await hub.start()
    for _ in range(1000):
        c = hub.register(sink, direct=CountingDirect())
        await hub.subscribe(c, "ch")
    on_pub = getattr(hub, "fanout", hub).on_publication  # (before the FanOut part: the hub)
    best = 1e9
    for _ in range(15):
        t = time.perf_counter()
        for i in range(200):
            on_pub(Publication("ch", {"i": i}, i + 1, "e"))
            await asyncio.sleep(0)  # the end of the turn: every connection's one write
        dt = (time.perf_counter() - t) / 200 / 1000
        best = min(best, dt)
    print(f"{best*1e9:.0f} ns per delivery")
    await hub.stop()
if __name__ == "__main__":
    asyncio.run(main())
