"""The kafka:// broker's sans-I/O parts: bus records and the per-channel
ordering of publications whose bus copies arrive out of order."""

from __future__ import annotations

import random

import pytest

from tidings.brokers.kafka.wire import (
    ChannelOrder,
    bus_channel,
    bus_publication,
    node_record,
    parse_bus_publication,
    parse_node_record,
)
from tidings.brokers.plain_wire import encode_publication
from tidings.types import Publication


def pub(offset: int, epoch: str = "e1", channel: str = "c") -> Publication:
    return Publication(channel, offset, offset, epoch)


class Harness:
    """A ChannelOrder whose timers and reads the test runs by hand."""

    def __init__(self) -> None:
        self.out: list[tuple[str, int]] = []
        self.timers: list[str] = []
        self.fills: list[tuple[str, str, int, int]] = []
        self.order = ChannelOrder(lambda p: self.out.append((p.channel, p.offset)),
                                  lambda c: self.timers.append(c),
                                  lambda c, e, a, b: self.fills.append((c, e, a, b)))

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for channel in timers:
            self.order.waited(channel)

    def offsets(self) -> list[int]:
        return [o for _, o in self.out]


def test_bus_records_round_trip() -> None:
    record = encode_publication("a/b\x1fc", {"x": 1}, None, "sender.1", 1234)
    body = bus_publication(42, "0123abcd", record)
    assert bus_channel(body) == "a/b\x1fc"
    got = parse_bus_publication(body)
    assert (got.channel, got.data, got.offset, got.epoch, got.sender, got.ts) == (
        "a/b\x1fc", {"x": 1}, 42, "0123abcd", "sender.1", 1234)
    raw = parse_bus_publication(bus_publication(1, "e", encode_publication("c", b"\x1f\x00", None,
                                                                        None, 5)))
    assert raw.data == b"\x1f\x00" and raw.sender is None
    assert parse_node_record(node_record("nödé.1", b"\x1fpayload")) == ("nödé.1", b"\x1fpayload")


def test_in_order_is_delivered_at_once() -> None:
    h = Harness()
    for i in range(1, 6):
        h.order.offer(pub(i))
    assert h.offsets() == [1, 2, 3, 4, 5]
    assert h.timers == [] and h.fills == []
    h.order.offer(pub(3))  # a duplicate copy
    assert h.offsets() == [1, 2, 3, 4, 5]


def test_a_late_copy_closes_the_gap_before_the_timer() -> None:
    h = Harness()
    h.order.offer(pub(1))
    h.order.offer(pub(3))
    h.order.offer(pub(4))
    assert h.offsets() == [1] and h.timers == ["c"]
    h.order.offer(pub(2))  # the other node's copy arrives
    assert h.offsets() == [1, 2, 3, 4]
    h.fire()
    assert h.fills == []  # nothing left to read


def test_a_gap_still_open_is_read_then_skipped_if_gone() -> None:
    h = Harness()
    h.order.offer(pub(1))
    h.order.offer(pub(4))
    h.fire()
    assert h.fills == [("c", "e1", 2, 3)]
    h.order.offer(pub(5))  # held while the read is under way
    h.order.filled("c", "e1", [pub(3), pub(2)])
    assert h.offsets() == [1, 2, 3, 4, 5]
    h.order.offer(pub(8))
    h.fire()
    h.order.filled("c", "e1", [pub(7)])  # 6 is no longer in the topic: skipped
    assert h.offsets() == [1, 2, 3, 4, 5, 7, 8]


def test_a_second_gap_beyond_the_first_is_read_too() -> None:
    h = Harness()
    h.order.offer(pub(1))
    h.order.offer(pub(3))
    h.order.offer(pub(6))
    h.fire()
    assert h.fills == [("c", "e1", 2, 2)]
    h.order.filled("c", "e1", [pub(2)])
    assert h.offsets() == [1, 2, 3] and h.timers == ["c"]
    h.fire()
    assert h.fills[-1] == ("c", "e1", 4, 5)
    h.order.filled("c", "e1", [pub(4), pub(5)])
    assert h.offsets() == [1, 2, 3, 4, 5, 6]


def test_the_first_copies_seen_wait_for_lower_offsets() -> None:
    h = Harness()
    h.order.offer(pub(7))  # the node began listening after offsets 1-6 were published
    assert h.offsets() == [] and h.timers == ["c"]
    h.order.offer(pub(6))  # published after this node listened, copied later
    h.order.offer(pub(8))
    h.fire()
    assert h.offsets() == [6, 7, 8]
    assert h.fills == []  # what came before the first copy is not read
    g = Harness()
    g.order.offer(pub(1))  # the epoch's first publication: nothing can come before it
    assert g.offsets() == [1] and g.timers == []


def test_a_new_epoch_starts_again() -> None:
    h = Harness()
    for i in (1, 2, 3):
        h.order.offer(pub(i))
    h.order.offer(pub(1, "e2"))  # the stream began again (history removed, server lost)
    h.order.offer(pub(2, "e2"))
    assert h.out == [("c", 1), ("c", 2), ("c", 3), ("c", 1), ("c", 2)]
    h.order.offer(pub(5, "e2"))
    h.fire()
    h.order.filled("c", "e1", [pub(3, "e1")])  # the answer to another epoch: ignored
    assert h.offsets()[-1] == 2


def test_forget_drops_cursors_of_channels_no_longer_wanted() -> None:
    h = Harness()
    h.order.offer(pub(1, channel="a"))
    h.order.offer(pub(1, channel="b"))
    h.order.forget(lambda c: c == "a")
    assert len(h.order) == 1
    h.order.offer(pub(9, channel="b"))  # a new start, not a gap 2-8 to read
    h.fire()
    assert h.fills == [] and h.out[-1] == ("b", 9)


def test_a_reset_delivers_what_is_held_then_starts_again() -> None:
    """A reconnect reads the bus anew: held publications (behind a gap, or the
    first ones seen, waiting for lower offsets) are delivered in order, not
    dropped; a fill that answers afterwards is ignored; a channel starts again."""
    h = Harness()
    h.order.offer(pub(1))
    h.order.offer(pub(4))
    h.order.offer(pub(3))
    h.order.offer(pub(7, channel="d"))  # starting: held for lower offsets
    h.fire()  # c: reads the gap 2; d: starts at 7
    assert h.fills == [("c", "e1", 2, 2)] and h.offsets() == [1, 7]
    h.order.offer(pub(9, channel="d"))
    h.order.reset()
    assert h.out == [("c", 1), ("d", 7), ("c", 3), ("c", 4), ("d", 9)]
    assert len(h.order) == 0
    h.order.filled("c", "e1", [pub(2)])  # the read of the gap, too late
    h.order.offer(pub(12))  # c starts again
    h.fire()
    assert h.out[5:] == [("c", 12)]


@pytest.mark.parametrize("seed", range(20))
def test_any_arrival_order_comes_out_in_order_once(seed: int) -> None:
    rnd = random.Random(seed)
    h = Harness()
    h.order.offer(pub(1))
    arrivals = list(range(2, 60))
    for i in range(len(arrivals) - 1):  # copies overtake each other by a few places
        if rnd.random() < 0.4:
            j = min(len(arrivals) - 1, i + rnd.randint(1, 3))
            arrivals[i], arrivals[j] = arrivals[j], arrivals[i]
    # bus copies that never come (the last one does: a lost tail shows only
    # with the next publication)
    lost = set(rnd.sample(range(2, 59), 5))
    for offset in arrivals:
        if offset not in lost:
            h.order.offer(pub(offset))
        if rnd.random() < 0.2:
            h.fire()
    while h.timers or h.fills:
        h.fire()
        fills, h.fills = h.fills, []
        for channel, epoch, first, last in fills:  # the topic has every offset
            h.order.filled(channel, epoch, [pub(o) for o in range(first, last + 1)])
    assert h.offsets() == list(range(1, 60))
