"""Direct messages and broadcast over real sockets."""

from __future__ import annotations

from tests.support import native


async def test_send_to_one_and_to_a_list(server) -> None:
    hub, base = server
    async with native(base) as a, native(base) as b, native(base) as c:
        got = await a.request({"type": "send", "to": b.conn_id, "data": {"hi": 1}})
        assert got == {"type": "reply", "id": got["id"], "result": {"sent": 1}}
        msg = await b.next("message")
        assert msg == {"type": "message", "from": a.conn_id, "data": {"hi": 1}}
        await a.request({"type": "send", "to": [b.conn_id, c.conn_id], "data": 2})
        assert (await b.next("message"))["data"] == 2
        assert (await c.next("message"))["data"] == 2
        assert await hub.send(c.conn_id, "from server") == 1
        assert (await c.next("message")) == {"type": "message", "from": "server",
                                             "data": "from server"}
        missing = await a.request({"type": "send", "to": f"{hub.node}.nobody", "data": 1})
        assert missing["code"] == "not_found"


async def test_broadcast_reaches_everyone(server) -> None:
    hub, base = server
    async with native(base) as a, native(base) as b, native(base) as c:
        await hub.broadcast({"all": True})
        for client in (a, b, c):
            assert (await client.next("message"))["data"] == {"all": True}
