"""NATS client protocol text, as carried in websocket frames (nats-server's
``websocket`` listener), for the load generator: sans-I/O, no socket here.

nats-server writes its protocol to a websocket client as binary frames whose
payloads, joined, are the same byte stream a TCP client reads: ``INFO {...}``,
then ``MSG <subject> <sid> [reply-to] <#bytes>\\r\\n<payload>\\r\\n`` per
delivery, ``PING``/``PONG``, ``+OK``/``-ERR``. One frame may hold many messages
and a message may in principle span frames, so :func:`parse` works on the
joined stream and says how much of it it consumed.

    https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

__all__ = ["connect_frame", "parse", "pub", "sub_frame"]

CRLF = b"\r\n"


def connect_frame(subject: str | None = None, sid: int = 1) -> bytes:
    """What a client sends first: CONNECT (no +OK acks), optionally a SUB, then a
    PING, whose PONG says the server has applied both."""
    out = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false}\r\n'
    if subject is not None:
        out += sub_frame(subject, sid)
    return out + b"PING\r\n"


def sub_frame(subject: str, sid: int = 1) -> bytes:
    return f"SUB {subject} {sid}\r\n".encode()


def pub(subject: bytes, payload: bytes) -> bytes:
    """One ``PUB`` operation (no reply subject)."""
    return b"PUB " + subject + b" " + str(len(payload)).encode() + CRLF + payload + CRLF


def parse(buf: bytes) -> tuple[list[bytes], int, list[bytes], int]:
    """Operations from the server: (``MSG`` payloads in order, number of
    ``PING``\\ s, other lines that are not ``INFO``/``PONG``/``+OK`` (e.g.
    ``-ERR``), bytes consumed). An incomplete operation at the end is left
    unconsumed, to be parsed again with the bytes that follow it."""
    msgs: list[bytes] = []
    other: list[bytes] = []
    pings = 0
    pos, n = 0, len(buf)
    find = buf.find
    while pos < n:
        eol = find(CRLF, pos)
        if eol < 0:
            break
        if buf.startswith(b"MSG ", pos):
            space = buf.rfind(b" ", pos, eol)
            try:
                size = int(buf[space + 1:eol])
            except ValueError:
                other.append(buf[pos:eol])
                pos = eol + 2
                continue
            start = eol + 2
            end = start + size
            if end + 2 > n:
                break
            msgs.append(buf[start:end])
            pos = end + 2
            continue
        line = buf[pos:eol]
        if line == b"PING":
            pings += 1
        elif line not in (b"PONG", b"+OK") and not line.startswith(b"INFO "):
            other.append(line)
        pos = eol + 2
    return msgs, pings, other, pos


def delete_streams(host: str, port: int, names: list[str], timeout: float = 3.0) -> int:
    """Delete JetStream streams over a plain TCP connection (what a run of
    ``tidings serve --broker nats://...?prefix=...`` left); how many were deleted."""
    import socket

    deleted = 0
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.recv(4096)  # INFO
        inbox = b"_INBOX.bench-cleanup"
        out = connect_frame() + b"SUB " + inbox + b" 1\r\n"
        for name in names:
            out += b"PUB $JS.API.STREAM.DELETE." + name.encode() + b" " + inbox + b" 0\r\n\r\n"
        sock.sendall(out + b"PING\r\n")
        buf = b""
        replies: list[bytes] = []
        while len(replies) < len(names):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            msgs, _, _, used = parse(buf)
            buf = buf[used:]
            replies.extend(msgs)
        deleted = sum(1 for r in replies if b'"success":true' in r)
    return deleted
