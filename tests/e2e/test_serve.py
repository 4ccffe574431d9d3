"""`tidings serve` as a process: shutdown, the CLI, the raw streams."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import pytest
import websockets

from tests.support import apost, native, serve_process, ws_url


@pytest.mark.parametrize("server_args", [(), ("--loop", "asyncio"),
                                         ("--server", "uvicorn", "--loop", "asyncio")],
                         ids=["own-server", "own-server-asyncio-loop", "uvicorn"])
async def test_sigterm_closes_sockets_1001_and_exits_0_with_blocked_consumers(
        server_args: tuple[str, ...]) -> None:
    with serve_process(*server_args) as server:
        base = server.base
        async with native(base) as sub, native(base) as puller:
            await sub.request({"type": "subscribe", "channel": "x"})
            pull = await puller.request({"type": "pull", "queue": "empty", "max": 1})
            assert pull["type"] == "reply"
            raw = await websockets.connect(ws_url(base, "/ws/pull/empty"))
            started = time.monotonic()
            code = await asyncio.to_thread(server.terminate, 10)
            elapsed = time.monotonic() - started
            assert code == 0, server.output()
            assert elapsed < 5
            for ws in (sub.ws, puller.ws, raw):
                with pytest.raises(websockets.ConnectionClosed) as info:
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                assert info.value.rcvd is not None
                assert info.value.rcvd.code == 1001


def _thread_names(pid: int) -> list[str]:
    return [pathlib.Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
            for t in os.listdir(f"/proc/{pid}/task")]


def _get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/<pid>/task")
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_serve_stays_one_thread(loop: str) -> None:
    """``tidings serve`` binds its own sockets (uvloop would resolve the host in
    libuv's thread pool, whose threads stay and make every socket system call
    dearer) and serves the demo page, the API and websockets without a thread."""
    with serve_process("--loop", loop) as server:
        base = server.base
        async with native(base) as sub:
            assert (await sub.request({"type": "subscribe", "channel": "t"}))["type"] == "reply"
            assert await asyncio.to_thread(_get_status, base + "/") == 200
            status, _ = await apost(base, "publish", {"channel": "t", "data": 1})
            assert status == 200
            assert (await sub.next("publication"))["data"] == 1
        names = _thread_names(server.proc.pid)
        assert len(names) == 1, names  # e.g. ['python', 'libuv-worker', ...] before


def test_cli_publish_and_subscribe() -> None:
    with serve_process() as server:
        sub = subprocess.Popen(
            [sys.executable, "-m", "tidings.server.cli", "subscribe", "news/#", "--url",
             server.base], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            # publish until the subscriber has printed one line (it may still be connecting)
            deadline = time.monotonic() + 20
            line = ""
            import selectors

            sel = selectors.DefaultSelector()
            assert sub.stdout is not None
            sel.register(sub.stdout, selectors.EVENT_READ)
            while not line and time.monotonic() < deadline:
                out = subprocess.run(
                    [sys.executable, "-m", "tidings.server.cli", "publish", "news/today",
                     '{"n": 1}', "--url", server.base],
                    capture_output=True, text=True, timeout=20, check=True,
                )
                assert json.loads(out.stdout)["offset"] >= 1
                if sel.select(timeout=0.5):
                    line = sub.stdout.readline()
            frame = json.loads(line)
            assert frame["type"] == "publication"
            assert frame["channel"] == "news/today"
            assert frame["data"] == {"n": 1}
            sel.close()
        finally:
            sub.terminate()
            sub.communicate(timeout=10)


def test_cli_publish_reports_unreachable_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tidings.server.cli", "publish", "a", "1", "--url",
         "http://127.0.0.1:9"], capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    assert "cannot reach" in out.stderr


def test_env_vars_and_refused_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tidings.server.cli", "serve"], capture_output=True, text=True,
        timeout=30, env={"TIDINGS_WORKERS": "0", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "--workers" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "tidings.server.cli", "serve", "--broker", "nope://x"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode != 0
    assert "unknown broker URL scheme" in out.stderr
    for option, value, says in (("--server", "nginx", "--server must be one of"),
                                ("--loop", "trio", "unknown loop 'trio'")):
        out = subprocess.run(
            [sys.executable, "-m", "tidings.server.cli", "serve", option, value],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode != 0
        assert says in out.stderr


def test_api_key_from_environment() -> None:
    from tests.support import http_post

    with serve_process(env={"TIDINGS_API_KEY": "s3cret"}) as server:
        status, body = http_post(server.base, "publish", {"channel": "a", "data": 1})
        assert status == 401
        assert body["error"]["code"] == 101
        status, body = http_post(server.base, "publish", {"channel": "a", "data": 1},
                                 {"X-API-Key": "s3cret"})
        assert status == 200
        status, body = http_post(server.base, "publish", {"channel": "a", "data": 1},
                                 {"Authorization": "apikey s3cret"})
        assert status == 200
