"""Work queues in Redis streams, shared by every node of a ``redis://`` broker.

One stream per queue and one consumer group (``g``) per stream; each node is a
consumer of the group named after its node id. The hub keeps the consumer
logic (credit, round robin, visibility timers); this store is only the source
and sink of items:

- push: ``XADD`` behind a length check in one script. The bound
  (``?queue_max_len=``, default 1,000,000 items waiting or in flight per
  queue) *refuses* pushes with :class:`~tidings.exceptions.QueueFull` instead
  of trimming with ``MAXLEN``: a trim drops the oldest items, which nobody has
  processed yet. Dead-letter streams are trimmed instead (``MAXLEN ~`` the
  same bound), since refusing there would leave the item nowhere to go.
- fetch: ``XREADGROUP ... >`` for exactly the free credit of the node's local
  consumers (backpressure), on a connection of its own per queue (a blocking
  read must not hold up acks and pushes), blocking at most ``block`` s.
- ack: ``XACK`` + ``XDEL`` in one script (an acked entry is garbage; deleting
  it keeps ``XLEN`` = waiting + in flight, which the bound and the stats use).
- requeue / nack / dead-letter / visibility timeout of a live node: one script
  checks that this node still holds the lease (``XPENDING``), then re-adds the
  entry (to the tail, to a delay sorted set, or to ``<name>.dead``) and acks
  the old one, atomically: nothing lost, nothing duplicated on that path.
- expired leases (a node died holding items, or hung): ``XPENDING IDLE`` +
  ``XCLAIM`` in one script; the delivery count plus the attempts carried in
  the entry (field ``a``) give the attempts, and an item out of attempts goes
  to ``<name>.dead`` instead of being claimed.

Every key of queue ``jobs`` and of ``jobs.dead`` carries the hash tag
``{jobs}``, so the dead-letter moves are single-slot on Redis Cluster too.
Durability is Redis's: with AOF/RDB the items survive a Redis restart; without
persistence a Redis restart loses them (the node recreates the group).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from tidings.brokers.base import QueueStoreStats, StoredItem
from tidings.brokers.redis.wire import decode_data, encode_data
from tidings.exceptions import BrokerUnavailable, QueueFull

if TYPE_CHECKING:
    from tidings.brokers.redis.broker import RedisBroker

__all__ = ["DEFAULT_MAX_LEN", "RedisQueueStore"]

log = logging.getLogger("tidings.brokers.redis.broker")

DEFAULT_MAX_LEN = 1_000_000
GROUP = "g"
_READ_TIMEOUT_MARGIN = 5.0  # socket timeout of a fetch = block + this: a hung read ends

_HELPERS = """
local function get(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
  return nil
end
local function with_attempts(flat, a)
  local out = {}
  for i = 1, #flat, 2 do
    if flat[i] ~= 'a' then out[#out + 1] = flat[i]; out[#out + 1] = flat[i + 1] end
  end
  out[#out + 1] = 'a'; out[#out + 1] = tostring(a)
  return out
end
local function entry(key, id)
  local e = redis.call('XRANGE', key, id, id)
  if #e == 0 then return nil end
  return e[1][2]
end
local function bury(dead, maxlen, flat, queue, id, a)
  redis.call('XADD', dead, 'MAXLEN', '~', maxlen, '*', 'd', get(flat, 'd'), 'a', '0',
             'q', queue, 'i', id, 'x', tostring(a))
end
"""

# KEYS: stream.  ARGV: max length (0: none), data
PUSH_LUA = """
local max = tonumber(ARGV[1])
if max > 0 and redis.call('XLEN', KEYS[1]) >= max then return false end
return redis.call('XADD', KEYS[1], '*', 'd', ARGV[2], 'a', '0')
"""

# KEYS: stream.  ARGV: group, ids...
ACK_LUA = """
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return n
"""

# KEYS: stream, dead stream, delayed zset.
# ARGV: group, consumer, id, mode (q requeue, z delay, d dead, x drop), attempts,
#       delay ms, queue name, dead max length
REQUEUE_LUA = _HELPERS + """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if type(p) ~= 'table' or p.err or #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
local flat = entry(KEYS[1], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if not flat then return 0 end
local mode, a = ARGV[4], tonumber(ARGV[5])
if mode == 'q' then
  redis.call('XADD', KEYS[1], '*', unpack(with_attempts(flat, a)))
elseif mode == 'z' then
  local t = redis.call('TIME')
  local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6])
  redis.call('ZADD', KEYS[3], due, cmsgpack.pack({ARGV[3], with_attempts(flat, a)}))
elseif mode == 'd' then
  bury(KEYS[2], ARGV[8], flat, ARGV[7], ARGV[3], a)
end
return 1
"""

# KEYS: stream, delayed zset.  ARGV: max items to move.  Returns ms until the next due.
PROMOTE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local item = cmsgpack.unpack(m)
  redis.call('XADD', KEYS[1], '*', unpack(item[2]))
  redis.call('ZREM', KEYS[2], m)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt == 0 then return false end
return math.max(0, tonumber(nxt[2]) - now)
"""

# KEYS: stream, dead stream.
# ARGV: group, consumer, min idle ms, count, max attempts, queue name, dead max length,
#       dead mode (d: dead-letter, x: drop)
CLAIM_LUA = _HELPERS + """
local pend = redis.pcall('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[3]), '-', '+',
                         tonumber(ARGV[4]))
if type(pend) ~= 'table' or pend.err then return {} end
local out = {}
for _, p in ipairs(pend) do
  local id, n = p[1], tonumber(p[4])
  local flat = entry(KEYS[1], id)
  if not flat then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local a = tonumber(get(flat, 'a') or '0') + n
    if a >= tonumber(ARGV[5]) then
      if ARGV[8] == 'd' then bury(KEYS[2], ARGV[7], flat, ARGV[6], id, a) end
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
    else
      local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), id)
      if #c > 0 then out[#out + 1] = {id, flat, tostring(a)} end
    end
  end
end
-- forget consumers (dead nodes) that hold nothing and were idle for an hour
local cs = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(cs) == 'table' and not cs.err then
  for _, c in ipairs(cs) do
    local name, pending, idle
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1]
      elseif c[i] == 'pending' then pending = c[i + 1]
      elseif c[i] == 'idle' then idle = c[i + 1] end
    end
    if name ~= ARGV[2] and pending == 0 and idle > 3600000 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    end
  end
end
return out
"""

# KEYS: stream, delayed zset.  ARGV: group.
STATS_LUA = """
local len = redis.call('XLEN', KEYS[1])
local pending, last = 0, '0-0'
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) == 'table' and not groups.err then
  for _, g in ipairs(groups) do
    local name, pend, ld
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1]
      elseif g[i] == 'pending' then pend = g[i + 1]
      elseif g[i] == 'last-delivered-id' then ld = g[i + 1] end
    end
    if name == ARGV[1] then pending = pend; last = ld end
  end
end
local first = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
local oldest = ''
if #first > 0 then oldest = first[1][1] end
local t = redis.call('TIME')
return {len, pending, oldest, redis.call('ZCARD', KEYS[2]), t[1], t[2]}
"""


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


class RedisQueueStore:
    """The :class:`~tidings.brokers.base.QueueStore` of a :class:`RedisBroker`."""

    def __init__(self, broker: RedisBroker, *, max_len: int = DEFAULT_MAX_LEN) -> None:
        self._broker = broker
        self.max_len = max_len
        self._scripts: dict[str, Any] = {}
        self._readers: dict[str, Any] = {}  # queue -> its own connection (standalone Redis)
        self._groups: set[str] = set()  # streams whose group this node created or saw
        self._pending: list[tuple[str, bytes, asyncio.Future[Any]]] = []
        self._flush_scheduled = False

    # -- names ----------------------------------------------------------------

    def _keys(self, queue: str) -> tuple[str, str, str, bool]:
        """(stream, dead-letter stream, delayed set, is a dead-letter queue)."""
        dead = queue.endswith(".dead") and len(queue) > 5
        base = queue[:-5] if dead else queue
        root = self._broker.keys.queue_root(base)
        stream = root + ":dead" if dead else root
        return stream, root + ":dead", stream + ":z", dead

    @property
    def _consumer(self) -> str:
        return self._broker.node or "anonymous"

    @property
    def _client(self) -> Any:
        client = self._broker.client
        if client is None:
            raise BrokerUnavailable("not connected")
        return client

    @property
    def _cluster(self) -> bool:
        from redis.asyncio.cluster import RedisCluster

        return isinstance(self._client, RedisCluster)

    def _script(self, lua: str) -> Any:
        client = self._client
        script = self._scripts.get(lua)
        if script is None or script.registered_client is not client:
            script = self._scripts[lua] = client.register_script(lua)
        return script

    async def _run(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._script(lua)(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    # -- items ----------------------------------------------------------------------

    @staticmethod
    def _item(entry_id: Any, fields: dict[bytes, bytes], attempts: int) -> StoredItem:
        item_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        data = decode_data(fields[b"d"])
        if b"q" in fields:  # a dead letter: the shape the memory queue gives it too
            data = {"id": fields[b"i"].decode(), "data": data,
                    "attempts": int(fields[b"x"]), "queue": fields[b"q"].decode()}
        return StoredItem(item_id, data, attempts)

    async def push(self, queue: str, data: Any) -> str:
        """Batched: the pushes made while the previous batch was on the wire go out
        in one pipeline, one batch at a time, so items keep the order they were
        pushed in (batches on two pooled connections could overtake each other)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((queue, encode_data(data), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().create_task(self._flush_all())
        result = await future
        if result is None:
            raise QueueFull(f"queue {queue!r} holds {self.max_len} items")
        return result.decode() if isinstance(result, bytes) else str(result)

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._flush(batch)
        finally:
            self._flush_scheduled = False

    async def _flush(self, batch: list[tuple[str, bytes, asyncio.Future[Any]]]) -> None:
        try:
            script = self._script(PUSH_LUA)
            calls = [([self._keys(queue)[0]], [self.max_len, data]) for queue, data, _ in batch]
            if self._cluster:  # cluster pipelines refuse EVALSHA: concurrent calls instead
                results = await asyncio.gather(
                    *(script(keys=k, args=a) for k, a in calls), return_exceptions=True)
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        await script(keys=keys, args=args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            results = [exc] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, (RedisError, OSError)):
                future.set_exception(BrokerUnavailable(str(result)))
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self._client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    def _reader(self, queue: str) -> Any:
        """The connection fetches of ``queue`` block on: its own, so a blocking
        read never holds up acks and pushes (cluster: the shared client)."""
        if self._cluster:
            return self._client
        reader = self._readers.get(queue)
        if reader is None:
            broker = self._broker
            reader = self._readers[queue] = aioredis.Redis.from_url(
                broker.redis_url, single_connection_client=True, socket_connect_timeout=2,
                socket_keepalive=True, socket_timeout=1.0 + _READ_TIMEOUT_MARGIN,
            )
        return reader

    async def _drop_reader(self, queue: str) -> None:
        reader = self._readers.pop(queue, None)
        if reader is not None:
            try:
                await reader.aclose()
            except Exception:  # a broken or cancelled connection: nothing to save
                pass

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        stream = self._keys(queue)[0]
        if count <= 0:
            return []
        block_ms = max(1, int(block * 1000)) if block > 0 else None
        for _ in range(2):
            if stream not in self._groups:
                await self._ensure_group(stream)
            try:
                reply = await self._reader(queue).xreadgroup(
                    GROUP, self._consumer, {stream: ">"}, count=count, block=block_ms)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise BrokerUnavailable(str(exc)) from exc
                self._groups.discard(stream)  # Redis lost it (restart): recreate
                continue
            except BaseException as exc:
                # cancelled or broken mid-read: the connection's state is unknown
                await self._drop_reader(queue)
                if isinstance(exc, (RedisError, OSError)):
                    raise BrokerUnavailable(str(exc)) from exc
                raise
            out: list[StoredItem] = []
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    if fields:
                        out.append(self._item(entry_id, fields, int(fields.get(b"a", 0))))
            return out
        return []

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        if not item_ids:
            return 0
        n = await self._run(ACK_LUA, [self._keys(queue)[0]], [GROUP, *item_ids])
        return int(n)

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        stream, dead_stream, delayed, is_dead = self._keys(queue)
        # a dead-letter queue does not dead-letter again: "x" drops
        mode = ("x" if is_dead else "d") if dead else ("z" if delay > 0 else "q")
        done = await self._run(REQUEUE_LUA, [stream, dead_stream, delayed], [
            GROUP, self._consumer, item_id, mode, attempts, int(delay * 1000), queue,
            self.max_len])
        return bool(done)

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        stream, dead_stream, _, is_dead = self._keys(queue)
        rows = await self._run(CLAIM_LUA, [stream, dead_stream], [
            GROUP, self._consumer, int(min_idle * 1000), count, max_attempts, queue,
            self.max_len, "x" if is_dead else "d"])
        out: list[StoredItem] = []
        for entry_id, flat, attempts in rows:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            out.append(self._item(entry_id, fields, int(attempts)))
        return out

    async def release_delayed(self, queue: str) -> float | None:
        stream, _, delayed, _ = self._keys(queue)
        ms = await self._run(PROMOTE_LUA, [stream, delayed], [100])
        return None if ms is None else int(ms) / 1000

    async def stats(self, queue: str) -> QueueStoreStats:
        stream, _, delayed, _ = self._keys(queue)
        length, pending, oldest, n_delayed, sec, usec = await self._run(
            STATS_LUA, [stream, delayed], [GROUP])
        age = 0.0
        if oldest:
            now_ms = int(sec) * 1000 + int(usec) // 1000
            age = max(0.0, (now_ms - _ms(oldest.decode())) / 1000)
        pending = int(pending)
        return QueueStoreStats(max(0, int(length) - pending), pending, int(n_delayed), age)

    async def release(self, queue: str) -> None:
        await self._drop_reader(queue)

    async def close(self) -> None:
        """Close the fetch connections (the broker closes the shared client)."""
        for queue in list(self._readers):
            await self._drop_reader(queue)
        self._scripts.clear()
        self._groups.clear()
