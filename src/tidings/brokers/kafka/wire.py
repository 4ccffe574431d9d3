"""The ``kafka://`` broker's sans-I/O parts: topic names, bus records, and the
per-channel ordering of live publications (:class:`ChannelOrder`).

Topics (``<prefix>`` is the URL's ``?prefix=``):

- ``<prefix>.bus``: one partition that every node reads from its end. It
  carries every live publication (with the offset and epoch its channel topic
  gave it), join/leave events, node messages and history removals.
- ``<prefix>.h.<levels>``: one single-partition topic per channel, created on
  first use; Kafka's offsets in it are the channel's offsets (minus one), and
  its topic id is the channel's epoch. A level keeps ``A-Z a-z 0-9 -`` and
  writes any other character as ``_XX`` per UTF-8 byte (``_`` itself too);
  levels are joined by ``.``, so names are one to one. A name longer than
  Kafka's 249 characters becomes ``<prefix>.x.<sha256 of the channel>``.

Bus records (first byte):

- ``O<offset>\\x1f<epoch>\\x1f`` + the channel topic's record: a publication;
- ``E...``: a join/leave event (:func:`~tidings.brokers.plain_wire.encode_event`);
- ``N<node length>\\x1f<node><payload>``: a message for one node;
- ``A<payload>``: a message for every node;
- ``X<channel>``: the channel's history was removed (its epoch changes).

A channel topic's record is a ``P`` publication of
:mod:`~tidings.brokers.plain_wire` (no position: the topic's offset is it)
with header ``w`` = ``<size>,<ttl>``, the history window it was published with.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from tidings.brokers.plain_wire import SEP, parse_publication
from tidings.types import Publication

__all__ = [
    "MAX_TOPIC",
    "ChannelOrder",
    "bus_channel",
    "bus_publication",
    "channel_topic",
    "node_record",
    "parse_bus_publication",
    "parse_node_record",
    "valid_prefix",
]

MAX_TOPIC = 249  # Kafka's longest topic name
MAX_PREFIX = 100  # so that ``<prefix>.x.<64 hex>`` always fits
_PLAIN = frozenset(string.ascii_letters + string.digits + "-")
_TOPIC_CHARS = frozenset(string.ascii_letters + string.digits + "-._")


def valid_prefix(prefix: str) -> bool:
    """A prefix is 1-100 of Kafka's topic characters (``A-Z a-z 0-9 . _ -``)."""
    return 0 < len(prefix) <= MAX_PREFIX and all(c in _TOPIC_CHARS for c in prefix)


def _escape_level(level: str) -> str:
    if all(c in _PLAIN for c in level):
        return level
    return "".join(c if c in _PLAIN else "".join(f"_{b:02X}" for b in c.encode())
                   for c in level)


def channel_topic(prefix: str, channel: str) -> str:
    """The single-partition topic that holds ``channel``'s publications."""
    name = f"{prefix}.h." + ".".join(_escape_level(level) for level in channel.split("/"))
    if len(name) > MAX_TOPIC:
        return f"{prefix}.x.{hashlib.sha256(channel.encode()).hexdigest()}"
    return name


def bus_publication(offset: int, epoch: str, record: bytes) -> bytes:
    """The bus copy of a channel topic's ``record`` at ``offset`` in ``epoch``."""
    return b"O%d\x1f%b\x1f%b" % (offset, epoch.encode(), record)


def parse_bus_publication(body: bytes) -> Publication:
    """The publication of an ``O`` bus record, with its offset and epoch."""
    offset_end = body.index(SEP)
    epoch_end = body.index(SEP, offset_end + 1)
    pub = parse_publication(body[epoch_end + 1:])
    pub.offset = int(body[1:offset_end])
    pub.epoch = body[offset_end + 1:epoch_end].decode()
    return pub


def bus_channel(body: bytes) -> str:
    """The channel of an ``O`` bus record, without decoding its data (every
    node reads every record: most are not for it)."""
    start = body.index(SEP, body.index(SEP) + 1) + 1  # the ``P`` record
    ts_end = body.index(SEP, start)
    sender_end = body.index(SEP, ts_end + 1)
    channel_end = body.index(SEP, sender_end + 1)
    first = channel_end + 1 + int(body[ts_end + 1:sender_end])
    return body[first:first + int(body[sender_end + 1:channel_end])].decode()


def node_record(node: str, payload: bytes) -> bytes:
    node_b = node.encode()
    return b"N%d\x1f%b%b" % (len(node_b), node_b, payload)


def parse_node_record(body: bytes) -> tuple[str, bytes]:
    """(node, payload) of an ``N`` bus record."""
    end = body.index(SEP)
    start = end + 1
    n = int(body[1:end])
    return body[start:start + n].decode(), body[start + n:]


@dataclass(slots=True)
class _Cursor:
    epoch: str
    last: int  # the last offset delivered
    held: dict[int, Publication] = field(default_factory=dict)
    waiting: bool = False  # a gap timer is set
    filling: bool = False  # a read of the gap from the channel topic is under way
    fill_to: int = 0  # the last offset that read asked for
    starting: bool = False  # the first copies seen are held until the timer fires


class ChannelOrder:
    """Delivers each channel's publications in offset order, once.

    Two nodes that publish to one channel get their offsets from the channel
    topic, then each writes its copy to the bus: the bus may hold offset 6
    before 5. A publication that comes after a gap is held; if the gap is
    still open ``wait`` later (the broker calls :meth:`waited`), the missing
    offsets are read from the channel topic (``fill``; the broker calls
    :meth:`filled`), where they always are (a publication is on the bus only
    after its channel topic has it), so nothing is lost even if its publisher
    died before writing the bus copy. What the channel topic no longer holds
    is skipped. A channel's cursor starts at the first publication the node
    sees of it (held for the same ``wait``, so that copies of lower offsets
    still on their way come first; at once for offset 1); a new epoch starts
    it again.
    """

    __slots__ = ("_cursors", "_deliver", "_fill", "_wait", "max_channels", "max_held")

    def __init__(self, deliver: Callable[[Publication], None], wait: Callable[[str], None],
                 fill: Callable[[str, str, int, int], None], *, max_held: int = 10_000,
                 max_channels: int = 100_000) -> None:
        self._deliver = deliver
        self._wait = wait  # call ``waited(channel)`` a little later
        self._fill = fill  # read (channel, epoch, first, last), then call ``filled``
        self._cursors: dict[str, _Cursor] = {}
        self.max_held = max_held
        self.max_channels = max_channels

    def __len__(self) -> int:
        return len(self._cursors)

    def offer(self, pub: Publication) -> None:
        """A publication from the bus, in bus order."""
        cur = self._cursors.get(pub.channel)
        if cur is None or cur.epoch != pub.epoch:
            if cur is not None:
                self._skip(pub.channel, cur)  # what the old epoch held goes out first
            elif len(self._cursors) >= self.max_channels:
                self._trim()
            if pub.offset == 1:  # the epoch's first publication: nothing comes before it
                self._cursors[pub.channel] = _Cursor(pub.epoch, 1)
                self._deliver(pub)
                return
            # a copy of an earlier offset, published after this node began to
            # listen, may still be on its way: wait for it before starting
            cur = self._cursors[pub.channel] = _Cursor(pub.epoch, 0, starting=True)
        if pub.offset <= cur.last or pub.offset in cur.held:
            return  # delivered already (a late bus copy of a filled gap)
        if pub.offset == cur.last + 1:
            cur.starting = False
            cur.last = pub.offset
            self._deliver(pub)
            self._drain(cur)
            return
        cur.held[pub.offset] = pub
        if len(cur.held) > self.max_held:
            self._skip(pub.channel, cur)
        elif not cur.waiting and not cur.filling:
            cur.waiting = True
            self._wait(pub.channel)

    def waited(self, channel: str) -> None:
        """The gap timer of ``channel`` fired: read what is still missing."""
        cur = self._cursors.get(channel)
        if cur is None or not cur.waiting:
            return
        cur.waiting = False
        if cur.starting:  # start at the lowest offset that came meanwhile
            cur.starting = False
            if cur.held:
                cur.last = min(cur.held) - 1
                self._drain(cur)
            if cur.held:
                cur.waiting = True
                self._wait(channel)
            return
        if not cur.held or cur.filling:
            return
        cur.filling = True
        cur.fill_to = min(cur.held) - 1
        self._fill(channel, cur.epoch, cur.last + 1, cur.fill_to)

    def filled(self, channel: str, epoch: str, pubs: list[Publication]) -> None:
        """The result of ``fill``: the gap's publications the topic still had
        (none when it could not be read)."""
        cur = self._cursors.get(channel)
        if cur is None or cur.epoch != epoch:
            return
        if not cur.filling:
            return
        cur.filling = False
        for pub in pubs:
            if pub.offset > cur.last:
                cur.held.setdefault(pub.offset, pub)
        while cur.last < cur.fill_to:  # what the topic no longer has is skipped
            cur.last += 1
            found = cur.held.pop(cur.last, None)
            if found is not None:
                self._deliver(found)
        self._drain(cur)
        if cur.held and not cur.waiting:  # another gap, further on
            cur.waiting = True
            self._wait(channel)

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the cursors of channels this node no longer wants (they would
        otherwise make a later subscriber read a stale gap)."""
        for channel in [c for c in self._cursors if not keep(c)]:
            del self._cursors[channel]

    def reset(self) -> None:
        """Start every channel again (the node reads the bus anew from its end):
        what is held goes out first, in order, as when a gap is given up; a
        late fill is then ignored."""
        for channel, cur in list(self._cursors.items()):
            self._skip(channel, cur)
        self._cursors.clear()

    def _drain(self, cur: _Cursor) -> None:
        held = cur.held
        while held and cur.last + 1 in held:
            cur.last += 1
            self._deliver(held.pop(cur.last))

    def _skip(self, channel: str, cur: _Cursor) -> None:
        """Give up on the gap: deliver what is held, in order."""
        for offset in sorted(cur.held):
            if offset > cur.last:
                cur.last = offset
                self._deliver(cur.held[offset])
        cur.held.clear()
        cur.waiting = False

    def _trim(self) -> None:
        for channel in [c for c, cur in self._cursors.items()
                        if not cur.held and not cur.filling][: self.max_channels // 2]:
            del self._cursors[channel]
