"""The Redis broker's wire format: its publish script and the messages it
publishes, sans I/O (no sockets, no asyncio), so it can be tested alone.

Data is ``j`` + JSON text or ``b`` + raw bytes. A channel's message is one of:

- ``P<offset>\\x1f<epoch>\\x1f<ts>\\x1f<sender>\\x1f<data>``: one publication;
- ``B<first offset>\\x1f<epoch>\\x1f<n>`` then, per publication,
  ``\\x1f<ts>\\x1f<sender>\\x1f<data length>\\x1f<data>``: n publications of one
  script call, with consecutive offsets (the length because binary data may
  hold the separator);
- ``E<frame>``: a join/leave event.
"""

from __future__ import annotations

from typing import Any

import orjson

from tidings.types import Publication

__all__ = ["GROUP_BYTES", "GROUP_MAX", "PUBLISH_LUA", "SEP", "decode_data", "encode_data",
           "publication_from", "unbatch"]

SEP = b"\x1f"  # JSON never contains a raw 0x1f, so it can separate header fields

# KEYS: meta hash, history stream.  ARGV: classic channel (or ""), shard channel (or ""),
# history size, history ttl ms, meta ttl s, new epoch, then (data, sender, ts) for each of
# the n publications (n >= 1), which get consecutive offsets; publishes one 'P' or 'B'
# message (module docstring) and returns {first offset, epoch}.
PUBLISH_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('DEL', KEYS[2])
end
local n = (#ARGV - 6) / 3
local last = redis.call('HINCRBY', KEYS[1], 'o', n)
local first = last - n + 1
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
local size = tonumber(ARGV[3])
if size > 0 then
  for i = 0, n - 1 do
    local a = 7 + 3 * i
    redis.call('XADD', KEYS[2], (first + i) .. '-1', 'd', ARGV[a], 's', ARGV[a + 1],
               't', ARGV[a + 2])
  end
  redis.call('XTRIM', KEYS[2], 'MAXLEN', size)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
end
local msg
if n == 1 then
  msg = 'P' .. first .. '\\31' .. epoch .. '\\31' .. ARGV[9] .. '\\31' .. ARGV[8]
        .. '\\31' .. ARGV[7]
else
  local parts = {'B' .. first .. '\\31' .. epoch .. '\\31' .. n}
  for i = 0, n - 1 do
    local a = 7 + 3 * i
    parts[#parts + 1] = ARGV[a + 2] .. '\\31' .. ARGV[a + 1] .. '\\31' .. #ARGV[a]
                        .. '\\31' .. ARGV[a]
  end
  msg = table.concat(parts, '\\31')
end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], msg) end
if ARGV[2] ~= '' then redis.call('SPUBLISH', ARGV[2], msg) end
return {first, epoch}
"""
# publications of one channel sent as one script call, at most
GROUP_MAX = 64
GROUP_BYTES = 64 * 1024


def encode_data(data: Any) -> bytes:
    if isinstance(data, bytes):
        return b"b" + data
    return b"j" + orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


def decode_data(raw: bytes) -> Any:
    if raw[:1] == b"b":
        return raw[1:]
    return orjson.loads(raw[1:])


def publication_from(channel: str, offset: int, epoch: str, ts: bytes, sender: bytes,
                     payload: bytes) -> Publication:
    """One publication from its message fields; JSON text is kept as sent."""
    text = payload[1:].decode() if payload[:1] == b"j" else None  # kept: sent as is
    return Publication(channel, decode_data(payload), offset, epoch, sender.decode() or None,
                       int(ts), text=text)


def unbatch(channel: str, data: bytes) -> list[Publication]:
    """The publications of a 'B' message, in order."""
    first_end = data.index(SEP)
    epoch_end = data.index(SEP, first_end + 1)
    count_end = data.index(SEP, epoch_end + 1)
    offset = int(data[1:first_end])
    epoch = data[first_end + 1:epoch_end].decode()
    count = int(data[epoch_end + 1:count_end])
    pos = count_end + 1
    out = []
    for k in range(count):
        ts_end = data.index(SEP, pos)
        sender_end = data.index(SEP, ts_end + 1)
        len_end = data.index(SEP, sender_end + 1)
        end = len_end + 1 + int(data[sender_end + 1:len_end])
        out.append(publication_from(channel, offset + k, epoch, data[pos:ts_end],
                                    data[ts_end + 1:sender_end], data[len_end + 1:end]))
        pos = end + 1
    return out
