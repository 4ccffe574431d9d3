"""The demo page at ``/``: served, self-contained, and (with a browser) working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.support import TIMEOUT, apost, native, running
from tidings import Hub
from tidings.server.app import create_app

CHROMIUM = "/usr/bin/chromium"


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.status, response.headers["content-type"], response.read().decode()


async def test_page_is_served(server: tuple[Hub, str]) -> None:
    _, base = server
    status, ctype, page = await asyncio.to_thread(get, base + "/")
    assert status == 200
    assert ctype.startswith("text/html")
    # the websocket URL is computed from the page's own location, so prefixes work
    assert 'new URL("ws", location.href)' in page
    assert '"wss:"' in page
    assert "fetch(`api/${method}`" in page  # the HTTP API, relative too
    # the page uses the JavaScript client served beside it (clients/js, built)
    assert 'import { Client } from "./tidings-client.js"' in page
    assert "recoverAsked" in page
    assert "joinLeave: true" in page
    # self-contained: no external scripts, styles or fonts (the machine may be offline)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"url\(|@import", page)
    # user text is never parsed as HTML
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write", page)


async def test_page_works_under_a_prefix() -> None:
    """Mounted at /rt, the page's relative ws and api URLs land on the hub's routes."""
    hub = Hub()
    app = Starlette(routes=[Mount("/rt", app=create_app(hub))], lifespan=hub.lifespan)
    async with running(hub, app) as base:
        status, _, page = await asyncio.to_thread(get, base + "/rt/")
        assert status == 200
        assert "tidings" in page
        status, ctype, script = await asyncio.to_thread(get, base + "/rt/tidings-client.js")
        assert status == 200
        assert ctype.startswith("text/javascript")
        assert "export class Client" in script
        async with native(base, "/rt/ws") as client:  # new URL("ws", "<base>/rt/")
            reply = await client.request({"type": "subscribe", "channel": "feed/#"})
            assert reply["type"] == "reply"
            status, body = await apost(base + "/rt", "publish",
                                       {"channel": "feed/x", "data": 1})
            assert status == 200
            assert body["result"]["offset"] == 1
            assert (await client.next("publication"))["channel"] == "feed/x"


# --- optional: drive the page in a headless Chromium over the DevTools protocol ----------


class DevTools:
    """The few DevTools protocol calls the browser test needs."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.exceptions: list[str] = []
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.waiting:
                self.waiting.pop(msg["id"]).set_result(msg)
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(msg["params"]["exceptionDetails"])[:2000])

    async def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = future
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        msg = await asyncio.wait_for(future, TIMEOUT)
        assert "error" not in msg, msg
        return msg["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:  # the page may still be loading: an exception counts as "not yet"
            value = await self.eval(f"(() => {{ try {{ return {expression}; }} "
                                    "catch { return null; } })()")
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.eval("document.getElementById('state').textContent")
                raise AssertionError(f"timed out waiting for {expression!r} (state: {state})")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def browser(url: str) -> AsyncIterator[DevTools]:
    profile = tempfile.mkdtemp(prefix="tidings-chromium-")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.returncode is not None or time.monotonic() > deadline:
                pytest.skip("chromium did not start")
            await asyncio.sleep(0.05)
        port = port_file.read_text().split()[0]
        _, _, listing = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/json/list")
        page = next(t for t in json.loads(listing) if t["type"] == "page")
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            tools = DevTools(ws)
            await tools.call("Runtime.enable")
            # the tab starts on about:blank, which is "complete" too: wait for our page
            loaded = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
            deadline = time.monotonic() + TIMEOUT
            while not await tools.eval(loaded):
                if time.monotonic() > deadline:
                    raise AssertionError(f"chromium did not load {url}")
                await asyncio.sleep(0.05)
            try:
                yield tools
            finally:
                tools.reader.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="needs /usr/bin/chromium")
async def test_page_in_a_browser(server: tuple[Hub, str]) -> None:
    hub, base = server
    async with browser(base + "/") as page, native(base) as peer:
        state = await page.until("(s => s.startsWith('connected') && s)"
                                 "(document.getElementById('state').textContent)")
        first_conn = state.split(" · ")[1].split(" on ")[0]
        assert first_conn in hub.connections
        assert state.endswith(f" on {hub.node}")
        await page.until("document.getElementById('count').textContent === '1'")

        # a second member joins: the page shows the join and the presence list grows
        await peer.request({"type": "subscribe", "channel": "chat/lobby", "join_leave": True})
        await page.until("document.getElementById('count').textContent === '2'")
        await page.until("document.getElementById('messages').textContent.includes('joined')")
        # names travel by direct messages: a hello gets the page's name back
        await peer.request({"type": "send", "to": first_conn,
                            "data": {"hello": "lobby", "name": "pat", "answer": False}})
        answer = await peer.next("message")
        if answer["data"]["answer"] is False:  # the page's own hello may come first
            assert answer["from"] == first_conn
            answer = await peer.next("message")
        assert answer["from"] == first_conn
        assert answer["data"]["answer"] is True
        assert answer["data"]["name"].startswith("guest-")
        await page.until("document.getElementById('presence').textContent.includes('pat')")
        await page.until("document.getElementById('messages').textContent.includes('pat joined')")

        # the page publishes what is typed; the peer gets it
        await page.eval("document.getElementById('text').value = 'hello from the page';"
                        "document.getElementById('say-form').requestSubmit()")
        pub = await peer.next("publication")
        assert pub["data"]["text"] == "hello from the page"

        # what the peer publishes is shown as text, never as HTML
        evil = "<img src=x onerror=alert(1)><b>bold</b>"
        await peer.request({"type": "publish", "channel": "chat/lobby",
                            "data": {"name": "peer", "text": evil}})
        await page.until(f"document.getElementById('messages').textContent.includes({evil!r})")
        assert await page.eval("document.querySelectorAll('#messages img, #messages b')"
                               ".length === document.querySelectorAll('#messages li b').length"
                               " && !document.querySelector('#messages img')")

        # the tail follows feed/#; the publish form publishes through the HTTP API
        await page.until("document.getElementById('feed-status').textContent"
                         ".includes('following feed/#')")
        await page.eval("document.getElementById('publish-form').requestSubmit()")
        await page.until("document.getElementById('feed-rows').textContent.includes('feed/news')")
        await page.until("document.getElementById('rtt').textContent.includes('ms')")

        # the server drops every connection; a publication made meanwhile is recovered
        await hub.close_all()
        await hub.publish("chat/lobby", {"name": "server", "text": "while you were away"})
        await page.until("document.getElementById('state').textContent.includes('1001')")
        await page.until("document.getElementById('state').textContent.startsWith('connected')")
        await page.until("document.getElementById('messages').textContent"
                         ".includes('while you were away')")
        assert first_conn not in await page.eval("document.getElementById('state').textContent")

        # Disconnect closes for good, with the code shown
        await page.eval("document.getElementById('toggle').click()")
        await page.until("document.getElementById('state').textContent === "
                         "'closed 1000: closed by you'")
        # Connect opens a new connection and joins the room again
        await page.eval("document.getElementById('toggle').click()")
        state = await page.until("(s => s.startsWith('connected') && s)"
                                 "(document.getElementById('state').textContent)")
        again = state.split(" · ")[1].split(" on ")[0]
        assert again in hub.connections
        await page.until("document.getElementById('count').textContent === '1'")  # the peer
        # was dropped by close_all above; the new connection is in the room and gets its news
        await hub.publish("chat/lobby", {"name": "server", "text": "welcome back"})
        await page.until("document.getElementById('messages').textContent"
                         ".includes('welcome back')")
        assert page.exceptions == []
