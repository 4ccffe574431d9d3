"""Direct messages and user-wide orders: what reaches connections by id or user
instead of by channel.

``send(conn_id)`` goes to the node named in the conn_id (``<node>.<random>``);
``send_user``, ``broadcast``, ``disconnect`` and server-side (un)subscribe go
to every node and each picks its own connections: one broker message, no
routing table that could go stale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tidings.core.channels import Checker
from tidings.core.connection import Connection, ConnectionKind
from tidings.protocol.codes import CloseCode
from tidings.protocol.names import validate_pattern
from tidings.protocol.native import dumps, encode_message, loads

try:
    import pydantic
except ImportError:  # pragma: no cover - models need pydantic, the rest does not
    pydantic = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from tidings.brokers import Broker
    from tidings.core.config import Limits
    from tidings.core.hub import HubCore, HubStats

__all__ = ["NodeMessenger"]

log = logging.getLogger("tidings.core.hub")


class NodeMessenger:
    """Messages between nodes, owned by :class:`~tidings.core.hub.HubCore`
    (``hub.messenger``); it reaches connections through the hub's registry."""

    __slots__ = ("broker", "connections", "hub", "limits", "message_decl", "message_type", "node",
                 "stats", "users")

    def __init__(self, hub: HubCore, broker: Broker) -> None:
        self.hub = hub  # to subscribe on orders, check it runs and run tasks
        self.broker = broker
        self.node = hub.node
        self.limits: Limits = hub.limits
        self.stats: HubStats = hub.stats
        self.connections: dict[str, Connection] = hub.connections
        self.users: dict[str, set[Connection]] = hub.users
        # what direct messages carry (hub.message_type): its checker and the type as
        # declared (for the generated documents); None: any JSON
        self.message_type: Checker | None = None
        self.message_decl: Any = None

    def check(self, data: Any) -> Any:
        """``data`` as it goes out: checked and dumped on a typed hub (invalid:
        ``ProtocolError(bad_request)``, nothing sent), a model dumped to JSON."""
        if self.message_type is not None:
            return self.message_type.check(data)
        if pydantic is not None and isinstance(data, pydantic.BaseModel):
            return data.model_dump(mode="json")
        return data

    async def send(self, to: str | Iterable[str], data: Any, *, sender: str = "server") -> int:
        """Send ``data`` as a ``message`` frame to one or many conn_ids on any node.

        Returns how many of the targets exist locally or were routed to another
        node (a remote target's existence is not checked synchronously).
        """
        self.hub.require_started()
        data = self.check(data)
        targets = [to] if isinstance(to, str) else list(to)
        local: list[Connection] = []
        remote: dict[str, list[str]] = {}
        for conn_id in targets:
            node = conn_id.partition(".")[0]
            if node == self.node:
                conn = self.connections.get(conn_id)
                if conn is not None:
                    local.append(conn)
            elif node:
                remote.setdefault(node, []).append(conn_id)
        if local:
            self._send_message(local, sender, data)
        for node, ids in remote.items():
            await self.broker.send_node(
                node, dumps({"k": "send", "to": ids, "from": sender, "data": data})
            )
        return len(local) + sum(len(ids) for ids in remote.values())

    async def send_user(self, user: str, data: Any, *, sender: str = "server") -> None:
        """Send to every connection of ``user`` on every node."""
        self.hub.require_started()
        data = self.check(data)
        await self.broker.send_all(dumps({"k": "user", "user": user, "from": sender,
                                          "data": data}))

    async def broadcast(self, data: Any, *, sender: str = "server") -> None:
        """Send a ``message`` frame to every native connection on every node."""
        self.hub.require_started()
        data = self.check(data)
        await self.broker.send_all(dumps({"k": "all", "from": sender, "data": data}))

    async def disconnect(self, user: str, *, code: int = CloseCode.NORMAL,
                         reason: str = "disconnected by server") -> None:
        """Close every connection of ``user`` on every node."""
        self.hub.require_started()
        await self.broker.send_all(dumps({"k": "disconnect", "user": user, "code": code,
                                          "reason": reason}))

    async def subscribe_user(self, user: str, channel: str) -> None:
        """Subscribe every connection of ``user``, on every node, to ``channel``."""
        self.hub.require_started()
        validate_pattern(channel, self.limits.max_name)
        await self.broker.send_all(dumps({"k": "sub", "user": user, "channel": channel}))

    async def unsubscribe_user(self, user: str, channel: str) -> None:
        """Unsubscribe every connection of ``user``, on every node, from ``channel``."""
        self.hub.require_started()
        await self.broker.send_all(dumps({"k": "unsub", "user": user, "channel": channel}))

    def on_node_message(self, payload: bytes) -> None:
        """Broker callback: a direct message, a broadcast, or a disconnect order."""
        try:
            msg = loads(payload)
            kind = msg["k"]
        except Exception:
            log.warning("node %s got a malformed node message", self.node)
            return
        if kind == "disconnect":
            for conn in list(self.users.get(msg["user"], ())):
                conn.close(msg.get("code", CloseCode.NORMAL), msg.get("reason", ""))
            return
        if kind in ("sub", "unsub"):
            for conn in list(self.users.get(msg["user"], ())):
                if kind == "sub":
                    self.hub.spawn(self.hub.subscribe(conn, msg["channel"]))
                else:
                    self.hub.spawn(self.hub.unsubscribe(conn, msg["channel"]))
            return
        if kind == "send":
            conns = [c for c in map(self.connections.get, msg["to"]) if c is not None]
        elif kind == "user":
            conns = list(self.users.get(msg["user"], ()))
        elif kind == "all":
            conns = [c for c in self.connections.values() if c.kind is not ConnectionKind.RAW]
        else:
            return
        if conns:
            self._send_message(conns, msg.get("from", "server"), msg.get("data"))

    def _send_message(self, conns: list[Connection], sender: str, data: Any) -> None:
        """A direct message to local connections, each in its protocol's frame."""
        encoded: dict[str, str | None] = {}
        for conn in conns:
            codec = conn.codec
            if codec is None:  # an app connection: its own endpoint reads it as native
                frame: str | None = encode_message(sender, data).decode()
            else:
                if codec.name not in encoded:
                    encoded[codec.name] = codec.message(sender, data)
                frame = encoded[codec.name]
            if frame is not None:
                conn.send_frame(frame)
        self.stats.messages += len(conns)

