"""What a client may ask of the hub, once, for every protocol.

The native endpoint, the Centrifuge endpoint and the HTTP API each decode
their own frames and encode their own replies, and run the same operations
here in between (as centrifuge's one ``handleSubscribe`` serves every
encoding). So there is one policy for the things that must not drift apart:

- permissions (:func:`tidings.core.permissions.check`) and limits come first;
- a recovery whose replay would not fit one reply (the outbox's bound) is
  answered ``recovered: false`` rather than with a frame the connection could
  never send;
- while the broker is down a subscription still succeeds and delivers live
  publications: its position is unknown (offset 0, no epoch) and a recovering
  client is told ``recovered: false``, never an error that leaves it
  subscribed server-side and told otherwise;
- a feature the broker does not offer raises :class:`~tidings.exceptions.NotAvailable`;
- :func:`classify` turns any exception into one (code, message) pair, logging
  what was unexpected once, with context, and never a traceback for an outage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidings.core.connection import Connection
from tidings.core.permissions import check
from tidings.exceptions import BrokerUnavailable, HookError, NotAvailable
from tidings.protocol.codes import ErrorCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import is_pattern
from tidings.protocol.native import dumps
from tidings.types import HistoryPage, Publication, StreamPos

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = ["Subscribed", "Unrecoverable", "classify", "history", "subscribe"]

log = logging.getLogger("tidings.operations")


@dataclass(slots=True)
class Subscribed:
    """The outcome of :func:`subscribe`, for the protocol to encode.

    ``positioned`` is False for a pattern and while the broker is down (the
    position is unknown); ``publications`` are the recovered ones, in order.
    """

    channel: str
    offset: int = 0
    epoch: str = ""
    recovering: bool = False
    recovered: bool = False
    positioned: bool = False
    publications: list[Publication] = field(default_factory=list)


class Unrecoverable(ProtocolError):
    """A subscription asked to be refused when its position cannot be recovered."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.NOT_FOUND, "unrecoverable position")


def classify(hub: HubCore, conn: Connection | None, what: str,
             exc: Exception) -> tuple[ErrorCode, str]:
    """The error a client gets for ``exc`` raised while serving ``what``.

    Expected failures (refusals, outages, missing features) are answered
    without a log line; anything else is logged once with its traceback and
    answered ``internal`` (hook errors were logged where they happened).
    """
    if isinstance(exc, ProtocolError):
        return exc.code, exc.message
    if isinstance(exc, NotAvailable):
        return ErrorCode.NOT_AVAILABLE, str(exc)
    if isinstance(exc, BrokerUnavailable):
        return ErrorCode.INTERNAL, f"broker unavailable: {exc}"
    if isinstance(exc, HookError):
        return ErrorCode.INTERNAL, "internal error"
    who = conn.conn_id if conn is not None else "the HTTP API"
    log.error("node %s: %s from %s failed", hub.node, what, who, exc_info=exc)
    return ErrorCode.INTERNAL, "internal error"


async def subscribe(
    hub: HubCore,
    conn: Connection,
    channel: str,
    *,
    join_leave: bool = False,
    recover: StreamPos | None = None,
    reject_unrecovered: bool = False,
    reply: Callable[[Subscribed], str],
) -> None:
    """Subscribe ``conn`` to ``channel`` (or a pattern), recovering from ``recover``.

    ``reply`` encodes the outcome; its frame is queued before any live
    publication of the channel, and recovered publications between the two, so
    the client sees reply -> recovered -> live, each offset once and in order.
    On any exception nothing is queued and the connection is not subscribed.
    """
    limit = hub.limits.max_subscriptions
    if channel not in conn.subs and len(conn.subs) >= limit:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"too many subscriptions (limit {limit})")
    await check(hub, "subscribe", conn, channel)
    if is_pattern(channel):  # a pattern has no position
        await hub.subscribe(conn, channel, join_leave=join_leave)
        conn.send_frame(reply(Subscribed(channel)))
        return
    was_subscribed = channel in conn.subs
    conn.hold()
    try:
        await hub.subscribe(conn, channel, join_leave=join_leave)
        outcome = await _position(hub, channel, recover, reject_unrecovered)
        if recover is not None and not outcome.recovered and reject_unrecovered:
            raise Unrecoverable()
    except BaseException:
        conn.release({channel: _UNTIL_END})
        if not was_subscribed:
            await hub.unsubscribe(conn, channel)
        raise
    conn.send_frame(reply(outcome))
    conn.release({channel: outcome.offset} if outcome.positioned else None)


_UNTIL_END = 2**63  # release(): drop every held publication of the channel


async def _position(hub: HubCore, channel: str, recover: StreamPos | None,
                    reject_unrecovered: bool) -> Subscribed:
    try:
        if recover is None:
            pos = await hub.position(channel)
            return Subscribed(channel, pos.offset, pos.epoch, positioned=True)
        page = await hub.history(channel, since=recover)
    except (BrokerUnavailable, NotAvailable):
        if recover is not None and reject_unrecovered:
            # the client wants a refusal rather than a gap; whether there is one is
            # unknown until the broker is back: a temporary error, retried later
            raise
        # subscribed and delivering live; the position is unknown until the broker is back
        return Subscribed(channel, recovering=recover is not None)
    pubs = list(page.publications) if page.recovered else []
    if pubs and replay_size(pubs) > hub.limits.outbox_bytes * REPLY_ROOM:
        # one reply that big would overflow the outbox (close 1013) on every
        # try: the client is told it did not recover and reads history in pages
        return Subscribed(channel, page.offset, page.epoch, recovering=True,
                          positioned=True)
    return Subscribed(channel, page.offset, page.epoch, recovering=True,
                      recovered=page.recovered, positioned=True, publications=pubs)


# a connection queues a reply until its outbox holds twice ``outbox_bytes``
# (Connection.send_frame); a replay is refused a little before that
REPLY_ROOM = 1.9
ENVELOPE = 256  # bytes of a replayed publication besides its data, at most


def replay_size(pubs: list[Publication]) -> int:
    """About the bytes a reply carrying ``pubs`` takes (data as JSON, envelopes)."""
    return sum((len(p.text) if p.text is not None else len(dumps(p.to_dict()["data"])))
               + ENVELOPE for p in pubs)


async def history(hub: HubCore, conn: Connection | None, channel: str, *,
                  since: StreamPos | None = None, limit: int | None = None,
                  reverse: bool = False) -> HistoryPage:
    """A channel's history for a client (``conn``) or the HTTP API (None)."""
    if conn is not None:
        await check(hub, "history", conn, channel)
    return await hub.history(channel, since=since, limit=limit, reverse=reverse)
