"""Fuzz target for the native codec: ``decode_command`` and ``peek_id``.

The property: whatever the input, ``decode_command`` returns a command or
raises ``ProtocolError`` (nothing else escapes), ``peek_id`` returns an int,
a str or None and never raises, and neither takes long (no hang).

Run a long campaign (not part of the normal test run)::

    python -m tests.fuzz.fuzz_native --count 1000000                    # mutation engine
    python -m tests.fuzz.fuzz_native --count 1000000 --engine hypothesis

The mutation engine starts from valid frames of every type and applies
random byte- and structure-level mutations (flip, insert, delete, splice,
duplicate, deep nesting, huge numbers, odd unicode); it is fast enough for
10^6 inputs in under a minute. The hypothesis engine generates JSON values
and frame-shaped objects. ``tests/fuzz/test_fuzz_native.py`` runs a short
version of both in the normal suite.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tidings.protocol.errors import ProtocolError
from tidings.protocol.native import Command, decode_command, peek_id

SLOW = 0.25  # seconds: one input taking longer than this counts as a hang

SEEDS: list[dict[str, Any]] = [
    {"type": "subscribe", "id": 1, "channel": "chat/+", "recover": {"offset": 41, "epoch": "e"},
     "join_leave": True},
    {"type": "unsubscribe", "id": "x", "channel": "a/#"},
    {"type": "publish", "id": 3, "channel": "chat/room1", "data": {"text": "hi", "n": [1, 2]}},
    {"type": "send", "id": 4, "to": ["n.a", "n.b"], "data": None},
    {"type": "presence", "id": 5, "channel": "a"},
    {"type": "presence_stats", "channel": "a"},
    {"type": "history", "id": 6, "channel": "a/b", "since": {"offset": 3, "epoch": "e"},
     "limit": 100, "reverse": False},
    {"type": "pull", "id": 7, "queue": "jobs", "max": 1},
    {"type": "ack", "id": 8, "queue": "jobs", "item": "i"},
    {"type": "nack", "id": 9, "queue": "jobs", "item": "i", "delay": 1.5, "requeue": False},
    {"type": "ping", "id": 10},
    {"type": "connect", "token": "eyJ.a.b"},
    {"type": "refresh", "id": 11, "token": "t"},
]

ODD: list[Any] = [None, True, False, 0, -1, 2**63, -(2**64), 1e308, -0.0, "", "\x00", "\ud7ff",
                  "#", "+", "$sys/x", "a//b", "a" * 300, [], {}, [[[]]], {"offset": -1},
                  "é/ü/ñ", "\u202e", 10**30]


class Finding(Exception):
    """The property failed for an input."""


def check(data: str | bytes) -> None:
    """Run both targets on one input; raise :class:`Finding` if the property fails."""
    started = time.perf_counter()
    try:
        cmd = decode_command(data, max_depth=64, max_name=255)
    except ProtocolError:
        pass
    except Exception as exc:
        raise Finding(f"decode_command raised {exc!r} for {data[:200]!r}") from exc
    else:
        if not isinstance(cmd, Command.__args__):  # type: ignore[attr-defined]
            raise Finding(f"decode_command returned {cmd!r}")
    try:
        rid = peek_id(data)
    except Exception as exc:
        raise Finding(f"peek_id raised {exc!r} for {data[:200]!r}") from exc
    if rid is not None and (not isinstance(rid, (int, str)) or isinstance(rid, bool)):
        raise Finding(f"peek_id returned {rid!r}")
    elapsed = time.perf_counter() - started
    if elapsed > SLOW:
        raise Finding(f"{elapsed:.3f} s for an input of {len(data)} bytes")


# --- mutation engine ---------------------------------------------------------------------


def _structural(rng: random.Random) -> Any:
    frame = dict(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice([*frame.keys(), "id", "type", "channel", "data", "extra"])
        frame[key] = rng.choice(ODD) if rng.random() < 0.8 else _nested(rng)
    if rng.random() < 0.1:
        return [frame]
    return frame


def _nested(rng: random.Random) -> Any:
    depth = rng.choice([1, 10, 63, 64, 65, 200, 400])  # json.dumps recurses: deeper is raw
    value: Any = rng.choice(ODD)
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    buf = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random or interesting bytes
            chunk = rng.choice([b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"\\u",
                                b"\xff", b"\x00", b'"id":', bytes([rng.randrange(256)])])
            buf[pos:pos] = chunk
        elif op == 2 and buf:  # delete a range
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:  # duplicate a range
            buf[pos:pos] = buf[max(0, pos - 16):pos]
        elif op == 4:  # splice another seed
            other = json.dumps(rng.choice(SEEDS)).encode()
            buf[pos:] = other[rng.randrange(len(other)):]
        else:  # overwrite with a digit run (huge numbers)
            buf[pos:pos] = b"9" * rng.randint(1, 400)
    return bytes(buf)


def mutations(seed: int) -> Iterator[str | bytes]:
    rng = random.Random(seed)
    corpus = [json.dumps(s).encode() for s in SEEDS]
    while True:
        roll = rng.random()
        if roll < 0.35:
            data: str | bytes = _mutate(rng.choice(corpus), rng)
        elif roll < 0.7:
            data = json.dumps(_structural(rng))
        elif roll < 0.85:
            data = _mutate(json.dumps(_structural(rng)).encode(), rng)
        elif roll < 0.93:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        elif roll < 0.95:  # nesting far beyond any parser's recursion limit
            depth = rng.choice([65, 1023, 1025, 5000, 100_000])
            data = ('{"type":"publish","channel":"a","data":' + rng.choice("[{") * depth
                    + "]" * rng.randrange(depth + 1) + "}")
        else:
            data = "".join(chr(rng.randrange(0x2FFFF)) for _ in range(rng.randint(0, 32)))
        if isinstance(data, bytes) and rng.random() < 0.3:
            data = data.decode("utf-8", "replace")
        yield data


def run_mutations(count: int, seed: int = 0) -> tuple[int, float]:
    slowest = 0.0
    for n, data in enumerate(mutations(seed), 1):
        started = time.perf_counter()
        check(data)
        slowest = max(slowest, time.perf_counter() - started)
        if n >= count:
            return n, slowest
    raise AssertionError("unreachable")  # pragma: no cover


# --- hypothesis engine -------------------------------------------------------------------


def hypothesis_test(count: int) -> Callable[[], None]:
    """A hypothesis test function running ``count`` examples."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=20)
    kinds = st.sampled_from([s["type"] for s in SEEDS] + ["", "frobnicate", "welcome"])
    keys = st.sampled_from(["id", "channel", "data", "to", "since", "recover", "limit", "max",
                            "queue", "item", "delay", "requeue", "token", "join_leave",
                            "reverse"])
    frames = st.builds(lambda k, extra: json.dumps({"type": k, **extra}), kinds,
                       st.dictionaries(keys, values, max_size=5))
    inputs = (st.binary(max_size=512) | st.text(max_size=256) | frames
              | values.map(json.dumps))

    @settings(max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs)
    def fuzz(data: str | bytes) -> None:
        check(data)

    return fuzz  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--engine", choices=["mutate", "hypothesis"], default="mutate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.engine == "mutate":
            count, slowest = run_mutations(args.count, args.seed)
            extra = f", slowest input {slowest * 1000:.1f} ms"
        else:
            hypothesis_test(args.count)()
            count, extra = args.count, ""
    except Finding as exc:
        print(f"FINDING: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    print(f"{args.engine}: {count} inputs in {elapsed:.1f} s ({count / elapsed:,.0f}/s){extra}: "
          "no exception but ProtocolError, no hang")
    return 0


if __name__ == "__main__":
    sys.exit(main())
