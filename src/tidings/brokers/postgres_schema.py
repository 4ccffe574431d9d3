"""The PostgreSQL broker's schema, its functions and its NOTIFY names, sans I/O.

Every table and function name starts with the URL's ``prefix`` (default
``tidings``), so several deployments (or test runs) share one database
without meeting. :func:`schema_sql` is idempotent (``IF NOT EXISTS`` and
``CREATE OR REPLACE``); the broker runs it on first use under an advisory
lock (:func:`schema_lock_key`), so nodes starting together do not race.

Tables:

- ``<p>_meta``: one row per channel: ``top`` (last offset), ``epoch``, the
  history ``size`` last published with, ``touched`` (ms);
- ``<p>_history``: one row per published group (``first_o`` .. ``last_o``,
  primary key ``(channel, first_o)``) holding the group's message body and
  ``exp`` (ms): publications above ``top - size`` in rows not expired are the
  history;
- ``<p>_spill``: bodies of notifications over the NOTIFY payload limit, read
  by reference and swept after ``spill_ttl``;
- ``<p>_presence``: ``(channel, conn_id)``, the node holding it, the member
  and its expiry (s, the server's clock);
- ``<p>_queue`` and ``<p>_qmeta``: work-queue items and per-queue counts
  (:mod:`tidings.brokers.postgres_queue`).

With ``?unlogged=1`` the first four are ``UNLOGGED``: no WAL, so a publish
commits without waiting for a disk flush; PostgreSQL empties them after a
crash (not after a clean restart), and the fresh meta rows then get new
epochs, so clients are told their history is gone. Queues stay logged.

Notifications are text: a kind letter then fields separated by ``\\x1f``
(JSON text never holds a raw 0x1f; binary data travels as base64):

- ``P<first>␟<epoch>␟<len>␟<channel>␟`` then, per publication,
  ``<ts>␟<sender>␟<len>␟<data>`` joined by ``␟``: consecutive offsets;
- ``E<len>␟<channel>␟<frame>``: a join/leave event;
- ``N<t|b><payload>``: a node message (text, or base64 bytes);
- ``Q``: work-queue wake-up;
- ``@<spill id>␟<head>``: a message whose body was too big for NOTIFY: the
  head (all of the above up to the body) inline, the body in ``<p>_spill``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson

__all__ = ["NOTIFY_LIMIT", "SEP", "T_BUCKETS", "Names", "decode_data", "encode_data",
           "schema_lock_key", "schema_sql"]

SEP = "\x1f"
# NOTIFY payloads must be shorter than 8000 bytes: longer messages are spilled
# (the head of a spilled one, with its channel name, must still fit)
NOTIFY_LIMIT = 7900
# pattern interest: one LISTEN name per bucket of first channel levels
T_BUCKETS = 64

_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


def encode_data(data: Any) -> str:
    """``j`` + JSON text, or ``b`` + base64 of bytes (NOTIFY payloads are text)."""
    if isinstance(data, bytes):
        return "b" + base64.b64encode(data).decode()
    return "j" + orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS).decode()


def decode_data(raw: str) -> Any:
    if raw[:1] == "b":
        return base64.b64decode(raw[1:])
    return orjson.loads(raw[1:])


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class Names:
    """Table, function and LISTEN names of one prefix (identifiers < 64 bytes)."""

    def __init__(self, prefix: str) -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(f"prefix {prefix!r} must match {_PREFIX.pattern} (it names tables)")
        self.prefix = prefix
        self.all = f"{prefix}_a"
        self._exact: dict[str, str] = {}
        self._top: dict[str, str] = {}

    def exact(self, channel: str) -> str:
        """The LISTEN name of one channel (a hash: channel names can be long)."""
        name = self._exact.get(channel)
        if name is None:
            if len(self._exact) > 100_000:
                self._exact.clear()
            name = self._exact[channel] = f"{self.prefix}_e{_digest(channel)}"
        return name

    def top(self, first_level: str) -> str:
        """The LISTEN name of the bucket of a first level (for patterns)."""
        name = self._top.get(first_level)
        if name is None:
            if len(self._top) > 100_000:
                self._top.clear()
            bucket = int(_digest(first_level), 16) % T_BUCKETS
            name = self._top[first_level] = f"{self.prefix}_t{bucket}"
        return name

    def tops(self) -> list[str]:
        return [f"{self.prefix}_t{i}" for i in range(T_BUCKETS)]

    def targets(self, channel: str) -> str:
        """Both names a publication of ``channel`` is notified on, space separated."""
        return f"{self.exact(channel)} {self.top(channel.split('/', 1)[0])}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}_n{_digest(node_id)}"

    def queue(self, queue: str) -> str:
        return f"{self.prefix}_q{_digest(queue)}"

    def kind(self, listen_name: str) -> str:
        """``e``, ``t``, ``n``, ``a`` or ``q``: what a LISTEN name is for."""
        return listen_name[len(self.prefix) + 1:len(self.prefix) + 2]


def schema_lock_key(prefix: str) -> int:
    """The advisory lock the schema is created under (a signed 64-bit key)."""
    return int.from_bytes(hashlib.blake2b(f"tidings:{prefix}".encode(),
                                          digest_size=8).digest(), "big", signed=True)


_SCHEMA = """
CREATE {unlogged}TABLE IF NOT EXISTS {p}_meta (
  channel text PRIMARY KEY,
  top bigint NOT NULL,
  epoch text NOT NULL,
  size integer NOT NULL DEFAULT 0,
  touched bigint NOT NULL DEFAULT 0
);
CREATE {unlogged}TABLE IF NOT EXISTS {p}_history (
  channel text NOT NULL,
  first_o bigint NOT NULL,
  last_o bigint NOT NULL,
  body text NOT NULL,
  exp bigint NOT NULL,
  PRIMARY KEY (channel, first_o)
);
CREATE {unlogged}TABLE IF NOT EXISTS {p}_spill (
  id bigserial PRIMARY KEY,
  created double precision NOT NULL,
  body text NOT NULL
);
CREATE {unlogged}TABLE IF NOT EXISTS {p}_presence (
  channel text NOT NULL,
  conn_id text NOT NULL,
  node text NOT NULL,
  member text NOT NULL,
  expires double precision NOT NULL,
  PRIMARY KEY (channel, conn_id)
);
CREATE INDEX IF NOT EXISTS {p}_presence_node ON {p}_presence (node);
CREATE TABLE IF NOT EXISTS {p}_queue (
  id bigserial PRIMARY KEY,
  queue text NOT NULL,
  state text NOT NULL DEFAULT 'w',
  data text NOT NULL,
  attempts integer NOT NULL DEFAULT 0,
  deliveries integer NOT NULL DEFAULT 0,
  owner text,
  leased_at double precision,
  due double precision,
  enq double precision NOT NULL,
  dead_of text,
  dead_id text,
  dead_x integer
);
CREATE INDEX IF NOT EXISTS {p}_queue_next ON {p}_queue (queue, state, id);
CREATE TABLE IF NOT EXISTS {p}_qmeta (
  queue text PRIMARY KEY,
  n bigint NOT NULL
);

CREATE OR REPLACE FUNCTION {p}_now() RETURNS double precision
LANGUAGE sql VOLATILE AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;

-- notify every name of `names` with head || body; a body that does not fit goes
-- to the spill table and the notification carries its id and the head
CREATE OR REPLACE FUNCTION {p}_send(names text[], head text, body text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  msg text := head || body;
  sid bigint;
  nm text;
BEGIN
  IF octet_length(msg) > {limit} THEN
    INSERT INTO {p}_spill (created, body) VALUES ({p}_now(), body) RETURNING id INTO sid;
    msg := '@' || sid || E'\\x1f' || head;
  END IF;
  FOREACH nm IN ARRAY names LOOP
    PERFORM pg_notify(nm, msg);
  END LOOP;
END $$;

-- a batch of publications in groups of consecutive ones of one channel: each
-- group gets consecutive offsets from one upsert of the channel's meta row (the
-- row lock orders concurrent publishers, and their NOTIFYs, by offset), is
-- kept in history (trimmed by offset range: no scan) and notified as one message
-- (its body, the publications' fields, built by the caller).
CREATE OR REPLACE FUNCTION {p}_publish(
  chans text[], counts integer[], sizes integer[], ttls bigint[], targets text[],
  new_epoch text, bodies text[])
RETURNS TABLE(r_first bigint, r_epoch text)
LANGUAGE plpgsql AS $$
DECLARE
  g integer;
  n integer;
  c text;
  last bigint;
  fresh boolean;
  now_ms bigint := ({p}_now() * 1000)::bigint;
BEGIN
  FOR g IN 1 .. coalesce(array_length(chans, 1), 0) LOOP
    c := chans[g];
    n := counts[g];
    INSERT INTO {p}_meta AS m (channel, top, epoch, size, touched)
      VALUES (c, n, new_epoch, sizes[g], now_ms)
      ON CONFLICT (channel) DO UPDATE SET top = m.top + n, size = EXCLUDED.size,
        touched = EXCLUDED.touched
      RETURNING m.top, m.epoch, (m.xmax = 0) INTO last, r_epoch, fresh;
    r_first := last - n + 1;
    IF fresh THEN  -- a new epoch: rows left by a lost meta row are not its history
      DELETE FROM {p}_history WHERE channel = c;
    END IF;
    IF sizes[g] > 0 THEN
      -- the group is one history row (its message body); rows wholly below the
      -- window go, found by the primary key's range: no scan
      INSERT INTO {p}_history (channel, first_o, last_o, body, exp)
        VALUES (c, r_first, last, bodies[g], now_ms + ttls[g]);
      DELETE FROM {p}_history WHERE channel = c AND first_o <= last - sizes[g]
        AND last_o <= last - sizes[g];
    END IF;
    PERFORM {p}_send(string_to_array(targets[g], ' '),
                     'P' || r_first || E'\\x1f' || r_epoch || E'\\x1f' || length(c)
                     || E'\\x1f' || c || E'\\x1f', bodies[g]);
    RETURN NEXT;
  END LOOP;
END $$;

-- work queues (tidings.brokers.postgres_queue)
CREATE OR REPLACE FUNCTION {p}_push(queues text[], datas text[], max_len bigint,
                                    wakes text[])
RETURNS TABLE(r_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
  i integer;
  ok boolean;
  t double precision := {p}_now();
BEGIN
  FOR i IN 1 .. coalesce(array_length(queues, 1), 0) LOOP
    ok := NULL;
    INSERT INTO {p}_qmeta AS m (queue, n) VALUES (queues[i], 1)
      ON CONFLICT (queue) DO UPDATE SET n = m.n + 1 WHERE max_len <= 0 OR m.n < max_len
      RETURNING true INTO ok;
    IF ok THEN
      INSERT INTO {p}_queue (queue, data, enq) VALUES (queues[i], datas[i], t)
        RETURNING id INTO r_id;
      PERFORM pg_notify(wakes[i], 'Q');
    ELSE
      r_id := NULL;
    END IF;
    RETURN NEXT;
  END LOOP;
END $$;

CREATE OR REPLACE FUNCTION {p}_bury(q text, item bigint, x integer, max_len bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  dq text := q || '.dead';
  dat text;
  total bigint;
BEGIN
  DELETE FROM {p}_queue WHERE id = item RETURNING data INTO dat;
  IF dat IS NULL THEN
    RETURN;
  END IF;
  UPDATE {p}_qmeta SET n = greatest(n - 1, 0) WHERE queue = q;
  INSERT INTO {p}_queue (queue, data, enq, dead_of, dead_id, dead_x)
    VALUES (dq, dat, {p}_now(), q, item::text, x);
  INSERT INTO {p}_qmeta AS m (queue, n) VALUES (dq, 1)
    ON CONFLICT (queue) DO UPDATE SET n = m.n + 1 RETURNING m.n INTO total;
  IF max_len > 0 AND total > max_len THEN  -- dead letters are trimmed, not refused
    WITH old AS (SELECT id FROM {p}_queue WHERE queue = dq AND state = 'w'
                 ORDER BY id LIMIT total - max_len FOR UPDATE SKIP LOCKED),
         gone AS (DELETE FROM {p}_queue WHERE id IN (SELECT id FROM old) RETURNING 1)
    UPDATE {p}_qmeta SET n = n - (SELECT count(*) FROM gone) WHERE queue = dq;
  END IF;
END $$;

CREATE OR REPLACE FUNCTION {p}_drop(q text, item bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM {p}_queue WHERE id = item;
  IF FOUND THEN
    UPDATE {p}_qmeta SET n = greatest(n - 1, 0) WHERE queue = q;
  END IF;
END $$;

-- mode: q (to the tail), z (after delay s), d (dead letter), x (drop)
CREATE OR REPLACE FUNCTION {p}_requeue(q text, item bigint, me text, mode text, a integer,
                                       delay double precision, max_len bigint, wake text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  t double precision := {p}_now();
BEGIN
  PERFORM 1 FROM {p}_queue WHERE id = item AND queue = q AND state = 'l' AND owner = me
    FOR UPDATE;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  IF mode = 'q' THEN
    UPDATE {p}_queue SET id = nextval('{p}_queue_id_seq'), state = 'w', attempts = a,
      deliveries = 0, owner = NULL, leased_at = NULL, enq = t WHERE id = item;
    PERFORM pg_notify(wake, 'Q');
  ELSIF mode = 'z' THEN
    UPDATE {p}_queue SET state = 'd', due = t + delay, attempts = a, deliveries = 0,
      owner = NULL, leased_at = NULL WHERE id = item;
  ELSIF mode = 'd' THEN
    PERFORM {p}_bury(q, item, a, max_len);
  ELSE
    PERFORM {p}_drop(q, item);
  END IF;
  RETURN true;
END $$;

CREATE OR REPLACE FUNCTION {p}_claim(q text, me text, min_idle double precision, cnt integer,
                                     max_attempts integer, dead_mode text, max_len bigint)
RETURNS TABLE(r_id bigint, r_data text, r_attempts integer, r_dead_of text, r_dead_id text,
              r_dead_x integer)
LANGUAGE plpgsql AS $$
DECLARE
  t double precision := {p}_now();
  rec record;
BEGIN
  FOR rec IN SELECT id, data, attempts + deliveries AS a, dead_of, dead_id, dead_x
             FROM {p}_queue WHERE queue = q AND state = 'l' AND leased_at <= t - min_idle
             ORDER BY id LIMIT cnt FOR UPDATE SKIP LOCKED LOOP
    IF rec.a >= max_attempts THEN
      IF dead_mode = 'd' THEN
        PERFORM {p}_bury(q, rec.id, rec.a, max_len);
      ELSE
        PERFORM {p}_drop(q, rec.id);
      END IF;
    ELSE
      UPDATE {p}_queue SET owner = me, leased_at = t, deliveries = deliveries + 1
        WHERE id = rec.id;
      r_id := rec.id;
      r_data := rec.data;
      r_attempts := rec.a;
      r_dead_of := rec.dead_of;
      r_dead_id := rec.dead_id;
      r_dead_x := rec.dead_x;
      RETURN NEXT;
    END IF;
  END LOOP;
END $$;

-- due delayed items wait again (at the tail); seconds until the next is due
CREATE OR REPLACE FUNCTION {p}_promote(q text, wake text) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
  t double precision := {p}_now();
  moved integer;
  nxt double precision;
BEGIN
  WITH due AS (SELECT id FROM {p}_queue WHERE queue = q AND state = 'd' AND due <= t
               ORDER BY due, id LIMIT 100 FOR UPDATE SKIP LOCKED)
  UPDATE {p}_queue AS i SET id = nextval('{p}_queue_id_seq'), state = 'w', due = NULL,
    enq = t FROM due WHERE i.id = due.id;
  GET DIAGNOSTICS moved = ROW_COUNT;
  IF moved > 0 THEN
    PERFORM pg_notify(wake, 'Q');
  END IF;
  SELECT min(due) INTO nxt FROM {p}_queue WHERE queue = q AND state = 'd';
  RETURN greatest(nxt - t, 0);
END $$;
"""


def schema_sql(prefix: str, *, unlogged: bool = False) -> str:
    """Every statement of the schema of ``prefix``, idempotent. ``unlogged``:
    the channel tables (not the queues) skip the WAL; the tables that exist
    already keep what they were created with."""
    Names(prefix)  # validates
    return (_SCHEMA.replace("{p}", prefix).replace("{limit}", str(NOTIFY_LIMIT))
            .replace("{unlogged}", "UNLOGGED " if unlogged else ""))
