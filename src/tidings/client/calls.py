"""The request methods of :class:`tidings.Client` that are one request and its
answer each: publish, send, presence, history, ping, pull. Connection
handling, subscriptions and the reader are in :mod:`tidings.client.client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tidings.client.subscription import Message, publication_from
from tidings.types import HistoryPage, Member, StreamPos

if TYPE_CHECKING:
    from tidings.client.subscription import Inbox, Item

__all__ = ["Calls"]


class Calls:
    """Mixin of :class:`tidings.Client`; the client provides what is declared here."""

    _messages: Inbox[Message]
    _pulls: dict[str, int]

    async def _request(self, frame: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _item_inbox(self, queue: str) -> Inbox[Item]:
        raise NotImplementedError

    async def publish(self, channel: str, data: Any) -> StreamPos:
        """Publish ``data`` (any JSON value); returns its position in the channel."""
        result = await self._request({"type": "publish", "channel": channel, "data": data})
        return StreamPos(int(result["offset"]), str(result["epoch"]))

    async def send(self, to: str | list[str], data: Any) -> int:
        """Send a direct message to one or many conn_ids; returns how many were reached."""
        targets = [to] if isinstance(to, str) else list(to)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError("to must be a conn_id or a non-empty list of them")
        result = await self._request({"type": "send", "to": to if isinstance(to, str)
                                      else targets, "data": data})
        return int(result["sent"])

    def messages(self) -> AsyncIterator[Message]:
        """Direct messages to this client (from ``send`` or the server), in arrival order.

        One shared buffer: concurrent iterators split the messages between them.
        """
        return self._messages

    async def presence(self, channel: str) -> list[Member]:
        """Connections subscribed to ``channel`` right now, on every node."""
        result = await self._request({"type": "presence", "channel": channel})
        members = result.get("presence") or {}
        out: list[Member] = []
        for conn_id, raw in members.items():
            raw = raw if isinstance(raw, dict) else {}
            out.append(Member(str(raw.get("conn_id", conn_id)), raw.get("user"), raw.get("info")))
        return out

    async def presence_stats(self, channel: str) -> dict[str, int]:
        """``{"num_clients": N, "num_users": M}`` of ``channel``."""
        result = await self._request({"type": "presence_stats", "channel": channel})
        return {str(k): int(v) for k, v in result.items()}

    async def history(
        self,
        channel: str,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        """Kept publications of ``channel`` (after ``since``) and its current position."""
        frame: dict[str, Any] = {"type": "history", "channel": channel}
        if since is not None:
            frame["since"] = {"offset": since.offset, "epoch": since.epoch}
        if limit is not None:
            if limit < 0:
                raise ValueError("limit must be >= 0")
            frame["limit"] = limit
        if reverse:
            frame["reverse"] = True
        result = await self._request(frame)
        return HistoryPage([publication_from(p) for p in result.get("publications") or ()],
                           int(result.get("offset", 0)), str(result.get("epoch", "")),
                           bool(result.get("recovered", True)))

    async def ping(self) -> float:
        """Round trip to the server, in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._request({"type": "ping"})
        return loop.time() - start

    async def pull(self, queue: str, max: int = 1) -> None:
        """Become a consumer of ``queue`` with at most ``max`` items in flight.

        Items then arrive in ``items(queue)``; the pull is re-issued after a
        reconnect (unacked items of the lost connection are redelivered).
        """
        if not isinstance(queue, str) or not queue:
            raise ValueError("queue must be a non-empty string")
        if not isinstance(max, int) or max < 1:
            raise ValueError("max must be an integer >= 1")
        self._item_inbox(queue)
        await self._request({"type": "pull", "queue": queue, "max": max})
        self._pulls[queue] = max
