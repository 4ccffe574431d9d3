"""Work queues in JetStream, shared by every node of a ``nats://`` broker.

One work-queue stream ``<prefix>_Q`` on ``<prefix>.q.>`` (retention
``workqueue``: an acked item is deleted) and one durable pull consumer per
queue, filtered on the queue's subject ``<prefix>.q.<queue token>``:

- push: a JetStream publish; the stream refuses a subject holding
  ``queue_max_len`` items (``discard: new`` per subject), which becomes
  :class:`~tidings.exceptions.QueueFull` (waiting + in flight, never a trim).
- fetch: a pull of exactly the free credit (``no_wait``), and when nothing
  waits a pull of one item that expires after ``block`` s. An item id is its
  stream sequence; its attempts are ``T-A`` (carried by requeues) plus the
  consumer's delivery count minus one.
- leases are JetStream's ack wait: the hub's lease (the ``min_idle`` of its
  ``claim`` calls) becomes the consumer's ``ack_wait``; an item not acked in
  time is redelivered by the server to whichever node pulls next, so
  ``claim`` is a pull that takes what the server hands back, and buries the
  items that are out of attempts. A node that held an item beyond its lease
  no longer holds it (``requeue`` answers False, ``ack`` does not count it).
- requeue: a copy with its attempts goes to the tail, then the original is
  acked (acks wait for the server's confirmation); dead-lettering publishes
  ``{"id", "data", "attempts", "queue"}`` to ``<queue>.dead`` then acks; a
  delay is a NAK with that delay (the server redelivers when due) plus a
  record in ``<prefix>_QZ`` so ``stats`` can count delayed items across nodes.
- The bound on dead-letter queues is the same per-subject bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from nats.aio.msg import Msg

from tidings.brokers.base import QueueStoreStats, StoredItem
from tidings.brokers.nats.subjects import NatsLink, NatsSubjects
from tidings.exceptions import BrokerUnavailable, NotAvailable, QueueFull

__all__ = ["DEFAULT_LEASE", "NatsQueueStore"]

DEFAULT_LEASE = 30.0
_TIMEOUT = 5.0
_DELAY_HORIZON = 7 * 86400.0  # delay records are kept that long at most


def _encode(data: Any) -> bytes:
    return b"b" + data if isinstance(data, bytes) else b"j" + orjson.dumps(data)


def _decode(raw: bytes) -> Any:
    return raw[1:] if raw[:1] == b"b" else orjson.loads(raw[1:])


class NatsQueueStore:
    """The :class:`~tidings.brokers.base.QueueStore` of a NATS broker, over its link."""

    def __init__(self, link: NatsLink, subjects: NatsSubjects, *, replicas: int = 1,
                 max_len: int = 1_000_000) -> None:
        self.link = link
        self.subjects = subjects
        self.replicas = replicas
        self.max_len = max_len
        self.stream = subjects.queue_stream
        self.delay_stream = subjects.delay_stream
        self._ready = False
        self._consumers: dict[str, float] = {}  # queue -> ack wait its consumer has
        self._leases: dict[str, float] = {}  # queue -> lease the hub asked for
        self._max_attempts: dict[str, int] = {}
        # queue -> item id -> (ack subject, payload, attempts, leased at)
        self._held: dict[str, dict[str, tuple[str, bytes, int, float]]] = {}

    # -- names and setup ----------------------------------------------------------

    @staticmethod
    def _consumer(queue: str) -> str:
        return "q" + hashlib.sha256(queue.encode()).hexdigest()[:24]

    async def setup(self) -> None:
        """Create the streams (again after a reconnect: a server may have lost them)."""
        if not self.link.jetstream:
            raise NotAvailable("queues", "nats (JetStream is not enabled on the server)")
        await self._ensure_stream({
            "name": self.stream, "subjects": [self.subjects.under("q")],
            "retention": "workqueue", "storage": "file", "discard": "new",
            "discard_new_per_subject": True, "max_msgs_per_subject": self.max_len,
            "num_replicas": self.replicas})
        await self._ensure_stream({
            "name": self.delay_stream, "subjects": [self.subjects.under("qz")],
            "retention": "limits", "storage": "memory", "discard": "old",
            "max_msgs_per_subject": 1, "max_age": int(_DELAY_HORIZON * 1e9),
            "num_replicas": self.replicas})
        self._consumers.clear()
        self._ready = True

    async def _ensure_stream(self, config: dict[str, Any]) -> None:
        try:
            await self.link.ensure_stream(config)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"queue stream: {exc}") from exc

    async def _ensure(self, queue: str) -> str:
        if not self._ready:
            await self.setup()
        name = self._consumer(queue)
        lease = self._leases.get(queue, DEFAULT_LEASE)
        if self._consumers.get(queue) != lease:
            try:
                await self.link.api(f"CONSUMER.DURABLE.CREATE.{self.stream}.{name}", {
                    "stream_name": self.stream, "config": {
                        "durable_name": name, "filter_subject": self.subjects.queue(queue),
                        "ack_policy": "explicit", "ack_wait": int(lease * 1e9),
                        "deliver_policy": "all", "max_deliver": -1, "max_ack_pending": -1,
                        "replay_policy": "instant", "num_replicas": 0}})
            except BrokerUnavailable:
                raise
            except Exception as exc:
                if getattr(exc, "err_code", 0) == 10059:  # the stream is gone: again
                    self._ready = False
                raise BrokerUnavailable(f"queue {queue!r}: {exc}") from exc
            self._consumers[queue] = lease
        return name

    # -- items --------------------------------------------------------------------------

    async def push(self, queue: str, data: Any) -> str:
        if not self._ready:
            await self.setup()
        reply = await self._js_publish(self.subjects.queue(queue), _encode(data))
        err = reply.get("error")
        if err:
            if "maximum messages" in str(err.get("description", "")):
                raise QueueFull(f"queue {queue!r} holds {self.max_len} items")
            if err.get("err_code") == 10059 or err.get("code") == 503:
                self._ready = False
            raise BrokerUnavailable(f"push to {queue!r}: {err.get('description')}")
        return str(reply["seq"])

    async def _js_publish(self, subject: str, payload: bytes,
                          headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            msg = await self.link.client.request(subject, payload, timeout=_TIMEOUT,
                                                 headers=headers)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            self._ready = False  # no stream answered: create it again next time
            raise BrokerUnavailable(f"publish to {subject}: {exc!r}") from exc
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply

    async def _pull(self, queue: str, count: int, block: float) -> list[Msg]:
        """One pull request: up to ``count`` messages, waiting ``block`` s at most."""
        name = await self._ensure(queue)
        nc = self.link.client
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=-1, pending_bytes_limit=-1)
        out: list[Msg] = []
        try:
            body: dict[str, Any] = {"batch": count}
            if block > 0:
                body["expires"] = int(block * 1e9)
            else:
                body["no_wait"] = True
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}",
                             orjson.dumps(body), reply=inbox)
            deadline = time.monotonic() + block + _TIMEOUT
            while len(out) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                if not msg.reply:  # a status: no messages, request expired, ...
                    break
                out.append(msg)
        except (BrokerUnavailable, NotAvailable):
            raise
        except Exception as exc:
            if out:
                return out
            raise BrokerUnavailable(f"fetch from {queue!r}: {exc!r}") from exc
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is gone: so is the subscription
                pass
        return out

    def _held_of(self, queue: str) -> dict[str, tuple[str, bytes, int, float]]:
        held = self._held.get(queue)
        if held is None:
            held = self._held[queue] = {}
        return held

    def _lease(self, queue: str) -> float:
        return self._consumers.get(queue, DEFAULT_LEASE)

    async def _take(self, queue: str, msgs: Sequence[Msg]) -> list[StoredItem]:
        """Leased messages as items; those out of attempts are buried instead."""
        held = self._held_of(queue)
        limit = self._max_attempts.get(queue)
        now = time.monotonic()
        out: list[StoredItem] = []
        for msg in msgs:
            meta = msg.metadata
            item_id = str(meta.sequence.stream)
            attempts = int((msg.headers or {}).get("T-A", "0")) + meta.num_delivered - 1
            assert msg.reply
            held[item_id] = (msg.reply, msg.data, attempts, now)
            if limit is not None and attempts >= limit:
                await self.requeue(queue, item_id, attempts, dead=True)
                continue
            out.append(StoredItem(item_id, _decode(msg.data), attempts))
        return out

    async def fetch(self, queue: str, count: int, *, block: float) -> list[StoredItem]:
        if count <= 0:
            return []
        msgs = await self._pull(queue, count, 0)
        if not msgs and block > 0:
            msgs = await self._pull(queue, 1, block)
            if msgs and count > 1:
                msgs += await self._pull(queue, count - 1, 0)
        return await self._take(queue, msgs)

    def _holds(self, queue: str, item_id: str, ack_wait: float | None = None
               ) -> tuple[str, bytes, int, float] | None:
        """This node's lease of ``item_id`` (taken out of the table), if still valid."""
        lease = self._held_of(queue).pop(item_id, None)
        wait = self._lease(queue) if ack_wait is None else ack_wait
        if lease is None or time.monotonic() - lease[3] > wait:
            return None  # never ours, settled already, or the server took it back
        return lease

    async def _ack_wait(self, queue: str) -> float:
        """The consumer's ack wait as the server has it now (another node may have
        changed it): a requeue must not move an item the server gave to another."""
        try:
            info = await self.link.api(
                f"CONSUMER.INFO.{self.stream}.{self._consumer(queue)}")
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"queue {queue!r}: {exc!r}") from exc
        return min(self._lease(queue), int(info["config"].get("ack_wait", 0)) / 1e9)

    async def _settle(self, ack_subject: str, body: bytes = b"+ACK") -> None:
        """An ack (or term), confirmed by the server."""
        try:
            await self.link.client.request(ack_subject, body, timeout=_TIMEOUT)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"ack: {exc!r}") from exc

    async def ack(self, queue: str, item_ids: Sequence[str]) -> int:
        leases = [lease for i in item_ids if (lease := self._holds(queue, i)) is not None]
        await asyncio.gather(*(self._settle(lease[0]) for lease in leases))
        return len(leases)

    async def requeue(self, queue: str, item_id: str, attempts: int, *,
                      delay: float = 0.0, dead: bool = False) -> bool:
        if item_id not in self._held_of(queue):
            return False
        lease = self._holds(queue, item_id, await self._ack_wait(queue))
        if lease is None:
            return False
        ack_subject, payload, _, _ = lease
        is_dead = queue.endswith(".dead") and len(queue) > 5
        if dead:
            if not is_dead:
                letter = {"id": item_id, "data": _decode(payload), "attempts": attempts,
                          "queue": queue}
                reply = await self._js_publish(self.subjects.queue(queue + ".dead"),
                                               _encode(letter))
                if reply.get("error"):
                    raise BrokerUnavailable(
                        f"dead letter of {queue!r}: {reply['error'].get('description')}")
            await self._settle(ack_subject, b"+TERM")
        elif delay > 0:
            due = int((time.time() + delay) * 1000)
            await self._js_publish(self.subjects.delay(queue, item_id), b"%d" % due)
            await self._settle(ack_subject, b"-NAK " + orjson.dumps({"delay": int(delay * 1e9)}))
        else:
            reply = await self._js_publish(self.subjects.queue(queue), payload,
                                           {"T-A": str(attempts)})
            if reply.get("error"):
                raise BrokerUnavailable(f"requeue to {queue!r}: "
                                        f"{reply['error'].get('description')}")
            await self._settle(ack_subject)
        return True

    async def claim(self, queue: str, *, min_idle: float, count: int,
                    max_attempts: int) -> list[StoredItem]:
        """The hub's lease becomes the consumer's ack wait; what the server hands
        back (leases that expired) is taken, or buried when out of attempts."""
        self._leases[queue] = min_idle
        self._max_attempts[queue] = max_attempts
        if count <= 0:
            return []
        return await self._take(queue, await self._pull(queue, count, 0))

    async def release_delayed(self, queue: str) -> float | None:
        return None  # the server redelivers a NAK-delayed item when it is due

    async def stats(self, queue: str) -> QueueStoreStats:
        name = await self._ensure(queue)
        link = self.link
        try:
            info = await link.api(f"CONSUMER.INFO.{self.stream}.{name}")
            delayed = 0
            now_ms = int(time.time() * 1000)
            for msg in await link.scan(self.delay_stream, self.subjects.delay(queue),
                                       "last_per_subject"):
                if int(msg.data or b"0") > now_ms:
                    delayed += 1
            waiting = int(info.get("num_pending", 0))
            age = 0.0
            if waiting:
                last = int(info.get("delivered", {}).get("stream_seq", 0))
                got = await link.api(f"STREAM.MSG.GET.{self.stream}",
                                     {"seq": last + 1,
                                      "next_by_subj": self.subjects.queue(queue)})
                stamp = got["message"]["time"]
                age = max(0.0, time.time() - _parse_time(stamp))
        except (BrokerUnavailable, NotAvailable):
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"stats of {queue!r}: {exc!r}") from exc
        in_flight = max(0, int(info.get("num_ack_pending", 0)) - delayed)
        return QueueStoreStats(waiting, in_flight, delayed, age)

    async def release(self, queue: str) -> None:
        """Nothing to free: a pull holds nothing once it returned."""

    async def close(self) -> None:
        self._held.clear()
        self._consumers.clear()
        self._ready = False


def _parse_time(stamp: str) -> float:
    """An RFC 3339 time of the server (nanoseconds) as a Unix time."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float("0." + frac) if frac else 0.0)
