"""History and positions of the ``kafka://`` broker, read from channel topics.

A channel's topic has one partition, so Kafka's log gives its publications
one order and dense offsets whichever node wrote them: the publication at
Kafka offset ``k`` is the channel's offset ``k + 1``, and the channel's
position is the partition's end offset. The epoch is the topic's id (from
Metadata v12): a topic deleted (``remove_history``) or lost (a server without
durable storage restarted) comes back with another id, so a client recovering
from the old one is told ``recovered: false``.

The window (size, ttl) each publication was published with travels in its
record's header ``w``; reads apply the window of the channel's last record,
as the NATS broker does. Physical trimming is the server's: topics are
created with ``retention.ms`` (``?retention=``).
"""

from __future__ import annotations

import time
from typing import Any

from tidings.brokers.kafka.link import KafkaLink
from tidings.brokers.kafka.wire import channel_topic
from tidings.brokers.plain_wire import parse_publication
from tidings.types import HistoryPage, Publication, StreamPos

__all__ = ["epoch_of_id", "publications_of", "read_history", "window_of"]


def epoch_of_id(topic_id: str) -> str:
    """A channel's epoch from its topic's id (hex). The last 16 digits are the
    random part of a UUID v4 and of the v7 ids some servers (tansu) give."""
    return topic_id[-16:]


def window_of(record: Any) -> tuple[int, float]:
    """(size, ttl) of the history window a record was published with."""
    for key, value in record.headers or ():
        if key == "w":
            size, _, ttl = bytes(value).partition(b",")
            return int(size), float(ttl or 0)
    return 0, 0.0


def publications_of(records: list[Any], epoch: str) -> list[Publication]:
    """The channel topic's records as publications at their channel offsets."""
    pubs = []
    for record in records:
        pub = parse_publication(record.value)
        pub.offset = record.offset + 1
        pub.epoch = epoch
        pubs.append(pub)
    return pubs


def _fresh(pubs: list[Publication], ttl: float) -> list[Publication]:
    """``pubs`` from the first one younger than ``ttl`` on (clocks of several
    nodes may disagree a little: no holes in the middle of a page)."""
    horizon = int((time.time() - ttl) * 1000)
    for i, pub in enumerate(pubs):
        if pub.ts >= horizon:
            return pubs[i:]
    return []


async def read_history(link: KafkaLink, prefix: str, channel: str, epoch: str, *,
                       since: StreamPos | None, limit: int | None,
                       reverse: bool) -> HistoryPage:
    """A history page of ``channel`` (whose topic exists, in ``epoch``)."""
    topic = channel_topic(prefix, channel)
    begin, end = await link.offsets(topic)
    pubs: list[Publication] = []
    recovered = True
    if since is not None and since.epoch != epoch:
        recovered = False
    elif end > begin and (since is None or since.offset < end):
        last = await link.read(topic, end - 1, end - 1)
        size, ttl = window_of(last[0]) if last else (0, 0.0)
        first = max(begin, end - size) if size > 0 and ttl > 0 else end
        start = first if since is None else max(first, since.offset)
        pubs = _fresh(publications_of(await link.read(topic, start, end - 1), epoch), ttl)
        if since is not None:
            # recovered when the publication right after ``since`` is still in the window
            recovered = bool(pubs) and pubs[0].offset == since.offset + 1
    elif since is not None and since.offset < end:
        recovered = False  # nothing kept after it
    if reverse:
        pubs.reverse()
    if limit is not None:
        pubs = pubs[:limit]
    return HistoryPage(pubs, end, epoch, recovered)
