"""The console at ``/`` in headless Chromium: a developer's view of a running
server (health, connections, channels, publish with schema checks, live tail,
presence and history, queues), behind the API key."""

from __future__ import annotations

import base64
import os
import struct
import zlib

from pydantic import BaseModel

from tests.brokers.conftest import unavailable
from tests.e2e.test_demo_page import CHROMIUM, browser
from tests.support import apost, native, running
from tidings import Hub

NOTHING = "\u2013"  # what a figure shows before it is known


class Order(BaseModel):
    order_id: int
    status: str


def text(element: str) -> str:
    return f"document.getElementById({element!r}).textContent"


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def pixels(png: bytes) -> list[list[tuple[int, int, int]]]:
    """The RGB rows of an 8-bit RGB or RGBA PNG (what Chromium writes)."""
    width, height = png_size(png)
    depth, color = png[24], png[25]
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    data, pos = b"", 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            data += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw, stride = zlib.decompress(data), width * bpp
    rows: list[list[tuple[int, int, int]]] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):  # undo the scanline filter (PNG spec, section 9)
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc
                                      else corner)) & 0xFF
        rows.append([(line[x], line[x + 1], line[x + 2]) for x in range(0, stride, bpp)])
        prev = line
    return rows


def has_color(rows: list[list[tuple[int, int, int]]], box: dict[str, float],
              color: tuple[int, int, int]) -> bool:
    """Some pixel inside ``box`` (a DOMRect) is close to ``color``."""
    for y in range(int(box["top"]), int(box["bottom"])):
        for x in range(int(box["left"]), int(box["right"])):
            if all(abs(a - b) < 40 for a, b in zip(rows[y][x], color, strict=True)):
                return True
    return False


async def test_console_in_a_browser(tmp_path: os.PathLike[str]) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"the console test needs Debian's chromium at {CHROMIUM}")
    hub = Hub(api_key="s3cret")
    hub.channel("orders/+", Order)
    async with running(hub) as base, browser(base + "/") as page, native(base) as peer:
        await page.until(f"{text('state')}.startsWith('connected')")
        # the API key is set on this server: the console says so and shows nothing else
        await page.until(f"{text('key-state')}.includes('API key needed')")
        assert await page.eval(text("node")) == NOTHING
        await page.eval("document.getElementById('api-key').value = 's3cret';"
                        "document.getElementById('key-form').requestSubmit()")
        await page.until(f"{text('key-state')} === 'API key accepted'")
        assert await page.eval("sessionStorage.getItem('tidings.apiKey')") == "s3cret"

        # server: node, broker, health, what it offers
        await page.until(f"{text('node')} === {hub.node!r}")
        assert await page.eval(text("broker")) == "memory"
        await page.until(f"{text('health')} === 'broker up'")
        assert "presence" in await page.eval(text("capabilities"))

        # connections: this page's own and a peer's, with its subscriptions
        await peer.request({"type": "subscribe", "channel": "orders/+", "join_leave": True})
        peer_id = peer.welcome["conn_id"]
        await page.until(f"{text('conn-rows')}.includes({peer_id!r})")
        await page.until(f"{text('conn-rows')}.includes('this page')")
        await page.until(f"{text('conn-rows')}.includes('orders/+')")
        await page.until(f"{text('num-clients')} === '2'")
        # channels: the peer's pattern with one subscriber, the page's room and tail
        await page.until(f"{text('channel-rows')}.includes('orders/+1')")
        assert "chat/lobby" in await page.eval(text("channel-rows"))

        # publish on a typed channel: the schema is shown, bad data is refused as you
        # type (nothing published) with the location, good data is published
        await page.eval("document.getElementById('pub-channel').value = 'orders/7';"
                        "document.getElementById('pub-data').value = "
                        "'{\"order_id\": \"seven\", \"status\": \"new\"}';"
                        "document.getElementById('pub-data').dispatchEvent(new Event('input'))")
        await page.until(f"{text('pub-type')}.includes('orders/+ carries Order')")
        await page.until(f"{text('pub-status')}.includes('order_id: Input should be a valid "
                         "integer')")
        assert await page.eval("document.getElementById('pub-data').classList"
                               ".contains('invalid')")
        assert '"order_id"' in await page.eval(text("pub-schema"))
        await page.eval("document.getElementById('publish-form').requestSubmit()")
        await page.until(f"{text('pub-status')}.startsWith('refused: 107')")
        await page.eval("document.getElementById('pub-data').value = "
                        "'{\"order_id\": 7, \"status\": \"new\"}';"
                        "document.getElementById('pub-data').dispatchEvent(new Event('input'))")
        await page.until(f"{text('pub-status')} === 'valid Order'")
        await page.eval("document.getElementById('publish-form').requestSubmit()")
        await page.until(f"{text('pub-status')} === 'published to orders/7 at offset 1'")
        got = await peer.next("publication")
        assert got["data"] == {"order_id": 7, "status": "new"}  # the refused one never came

        # the live tail of a pattern
        await page.eval("document.getElementById('pattern').value = 'orders/#';"
                        "document.getElementById('feed-form').requestSubmit()")
        await page.until(f"{text('feed-status')} === 'following orders/#'")
        await hub.publish("orders/8", {"order_id": 8, "status": "paid"})
        await page.until(f"{text('feed-rows')}.includes('orders/8')")
        await page.until(f"{text('pub-rate')} !== {NOTHING!r}")

        # a channel's presence, picked from the channels table, and its history
        await peer.request({"type": "subscribe", "channel": "chat/lobby"})
        await page.until(f"{text('channel-rows')}.includes('chat/lobby2')")
        await page.eval("[...document.querySelectorAll('#channel-rows tr')]"
                        ".find(r => r.textContent.startsWith('chat/lobby')).click()")
        await page.until(f"{text('inspect-count')} === '2'")
        assert peer_id in await page.eval(text("inspect-presence"))
        await hub.publish("orders/7", {"order_id": 7, "status": "paid"})
        await page.eval("document.getElementById('inspect-channel').value = 'orders/7';"
                        "document.getElementById('inspect-form').requestSubmit()")
        await page.until(f"{text('inspect-status')}.includes('orders/7 is at offset 2')")
        history = await page.eval(text("inspect-history"))
        assert history.index('"paid"') < history.index('"new"')  # newest first

        # queues: one this node uses shows up by itself, another by name
        await hub.queue("jobs").push({"n": 1})
        await page.until(f"{text('queue-rows')}.includes('jobs')")
        status, _ = await apost(base, "publish", {"channel": "x", "data": 1})
        assert status == 401  # the API really is behind the key
        await page.eval("document.getElementById('queue-name').value = 'mail';"
                        "document.getElementById('queue-form').requestSubmit()")
        await page.until(f"{text('queue-rows')}.includes('mail')")

        # a screenshot of the whole console: a real, laid-out page, not a blank one
        await page.call("Emulation.setDeviceMetricsOverride", width=1280, height=1600,
                        deviceScaleFactor=1, mobile=False)
        await page.call("Emulation.setEmulatedMedia",  # the light palette's colours below
                        features=[{"name": "prefers-color-scheme", "value": "light"}])
        shot = await page.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        (tmp_path / "console.png").write_bytes(png)
        assert png_size(png) == (1280, 1600)
        rows = pixels(png)
        assert len(set(map(tuple, rows))) > 200, "the screenshot looks blank"

        def box(selector: str) -> str:
            return (f"(r => ({{top: r.top, bottom: r.bottom, left: r.left, right: r.right}}))"
                    f"(document.querySelector({selector!r}).getBoundingClientRect())")

        # every panel is on the screen, and the badges and buttons are drawn in their colours
        for heading in ("Server", "Connections", "Channels", "Publish", "Live tail",
                        "Channel: presence", "Queues", "Chat"):
            rect = await page.eval(f"(h => (r => ({{top: r.top, bottom: r.bottom}}))"
                                   f"(h.getBoundingClientRect()))([...document."
                                   f"querySelectorAll('h2')].find(h => h.textContent."
                                   f"startsWith({heading!r})))")
            assert 0 <= rect["top"] < rect["bottom"] <= 1600, heading
        green, blue = (0x1A, 0x7F, 0x37), (0x2F, 0x5B, 0xD3)  # --ok and --accent
        assert has_color(rows, await page.eval(box("#health")), green)
        assert has_color(rows, await page.eval(box("#pub-status")), green)  # "published"
        assert has_color(rows, await page.eval(box("#publish-form button")), blue)
        assert not has_color(rows, await page.eval(box("#pub-status")), blue)
        assert page.exceptions == []


async def test_console_shows_the_broker_going_down_and_back() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"the console test needs Debian's chromium at {CHROMIUM}")
    from tests.brokers.conftest import RedisServer

    redis = RedisServer()
    try:
        hub = Hub(redis.url)
        async with running(hub) as base, browser(base + "/") as page:
            await page.until(f"{text('health')} === 'broker up'")
            await page.until(f"{text('broker')} === 'redis'")
            redis.kill()
            await page.until(f"{text('health')}.startsWith('broker down')", timeout=30)
            redis.start()
            await page.until(f"{text('health')} === 'broker up'", timeout=30)
    finally:
        redis.stop()
