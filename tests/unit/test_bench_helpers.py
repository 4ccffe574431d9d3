"""The pure helpers of the benchmark harness (benchmarks/): NATS protocol text as
the load generator reads it from nats-server's websocket, latency percentiles,
and which process holds each end of a TCP connection."""

from __future__ import annotations

import math
import os
import socket
import sys

import pytest
from benchmarks import natsws
from benchmarks.procfs import connection_owners
from benchmarks.report import percentiles_ms


def test_nats_parse_returns_message_payloads_in_order_and_counts_pings() -> None:
    stream = (b'INFO {"server_id":"x"}\r\nPONG\r\n'
              b"MSG bench.fanout 1 5\r\nhello\r\n"
              b"PING\r\n"
              b"MSG bench.fanout 1 reply.to 3\r\nabc\r\n"
              b"MSG bench.fanout 1 0\r\n\r\n")
    msgs, pings, other, used = natsws.parse(stream)
    assert msgs == [b"hello", b"abc", b""]
    assert pings == 1 and other == [] and used == len(stream)


def test_nats_parse_leaves_an_incomplete_message_for_the_next_bytes() -> None:
    whole = natsws.pub(b"s", b"x" * 10).replace(b"PUB ", b"MSG ").replace(b"s ", b"s 7 ", 1)
    assert whole == b"MSG s 7 10\r\n" + b"x" * 10 + b"\r\n"
    for cut in range(1, len(whole)):
        buf = b"MSG s 7 1\r\na\r\n" + whole[:cut]
        msgs, _, _, used = natsws.parse(buf)
        assert msgs == [b"a"] and used == 14  # only the first, complete one
        msgs, _, _, used = natsws.parse(buf[used:] + whole[cut:])
        assert msgs == [b"x" * 10] and used == len(whole)


def test_nats_parse_reports_errors_and_payloads_that_hold_crlf() -> None:
    body = b"line1\r\nMSG fake 1 2\r\n"
    stream = (b"MSG s 1 " + str(len(body)).encode() + b"\r\n" + body
              + b"\r\n-ERR 'Slow Consumer'\r\n")
    msgs, pings, other, used = natsws.parse(stream)
    assert msgs == [body] and pings == 0
    assert other == [b"-ERR 'Slow Consumer'"] and used == len(stream)


def test_nats_client_frames() -> None:
    assert natsws.pub(b"a.b", b"{}") == b"PUB a.b 2\r\n{}\r\n"
    hello = natsws.connect_frame("bench.fanout", 3)
    assert hello.startswith(b"CONNECT {") and hello.endswith(b"SUB bench.fanout 3\r\nPING\r\n")
    assert b"SUB" not in natsws.connect_frame()


@pytest.mark.parametrize("n", [1, 2, 3, 99, 100, 101, 1000, 12345])
def test_percentiles_are_nearest_rank(n: int) -> None:
    values = [k * 1_000_000 for k in range(n, 0, -1)]  # 1..n ms, unsorted
    got = percentiles_ms(values)
    for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        assert got[name] == max(1, math.ceil(q * n - 1e-9))  # the k-th smallest, in ms
    assert got["max"] == n
    assert percentiles_ms([]) == {}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_connection_owners_finds_the_process_holding_the_server_side() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                owners = connection_owners([os.getpid()], port)
                assert owners == {client.getsockname()[1]: os.getpid()}
                assert connection_owners([os.getppid()], port) == {}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_the_load_generator_policy_applies_to_its_own_thread() -> None:
    """``--loadgen-policy batch``: the thread that asks runs as SCHED_BATCH (a
    load-generator process is one thread); the caller's policy is untouched;
    an unknown name is refused."""
    import threading

    from benchmarks.loadgen import set_policy

    seen: list[int] = []

    def run(policy: str) -> None:
        set_policy(policy)
        seen.append(os.sched_getscheduler(0))

    for policy in ("batch", "normal"):
        thread = threading.Thread(target=run, args=(policy,))
        thread.start()
        thread.join(10)
    assert seen == [os.SCHED_BATCH, os.SCHED_OTHER]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        set_policy("fifo")
