"""One connection generation of the ``kafka://`` broker: the aiokafka clients
and the few Kafka operations the broker is built from.

A :class:`KafkaLink` holds a producer, the bus consumer (assigned to the bus
partition, no group), a reader (a second group-less consumer for reads of a
channel topic: history and gap fills), an admin client (topics) and a plain
client for one request aiokafka does not make: Metadata v12, whose answer
carries topic ids (a channel's epoch). When the server is lost the broker
drops the whole link and builds a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from io import BytesIO
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from tidings.exceptions import BrokerUnavailable

__all__ = ["KafkaLink", "KafkaSettings"]

NO_ERROR, UNKNOWN_TOPIC, TOPIC_EXISTS = 0, 3, 36


class _Uuid(AbstractType):  # type: ignore[misc]
    """Kafka's UUID: 16 raw bytes."""

    @classmethod
    def encode(cls, value: bytes) -> bytes:
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        return data.read(16)


_TEXT = CompactString("utf-8")


class _MetadataResponseV12(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", CompactArray(("node_id", Int32), ("host", _TEXT), ("port", Int32),
                                 ("rack", _TEXT), ("tags", TaggedFields))),
        ("cluster_id", _TEXT),
        ("controller_id", Int32),
        ("topics", CompactArray(
            ("error_code", Int16), ("name", _TEXT), ("topic_id", _Uuid), ("is_internal", Boolean),
            ("partitions", CompactArray(
                ("error_code", Int16), ("partition_index", Int32), ("leader_id", Int32),
                ("leader_epoch", Int32), ("replica_nodes", CompactArray(Int32)),
                ("isr_nodes", CompactArray(Int32)), ("offline_replicas", CompactArray(Int32)),
                ("tags", TaggedFields))),
            ("topic_authorized_operations", Int32), ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class _MetadataRequestV12(RequestStruct):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 12
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = _MetadataResponseV12
    SCHEMA = Schema(
        ("topics", CompactArray(("topic_id", _Uuid), ("name", _TEXT), ("tags", TaggedFields))),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicIds(Request[_MetadataRequestV12]):  # type: ignore[misc]
    """Metadata of some topics, with their ids; never creates a topic."""

    API_KEY = 3

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def build(self, request_struct_class: type[_MetadataRequestV12]) -> _MetadataRequestV12:
        return request_struct_class([(bytes(16), n, {}) for n in self.names], False, False, {})


class KafkaSettings:
    """What the URL says, as the link needs it."""

    def __init__(self, servers: list[str], *, timeout: float, fetch_wait_ms: int,
                 retention_ms: int, replicas: int, client_id: str) -> None:
        self.servers = servers
        self.timeout = timeout
        self.fetch_wait_ms = fetch_wait_ms
        self.retention_ms = retention_ms
        self.replicas = replicas
        self.client_id = client_id


class KafkaLink:
    """The clients of one connection to the Kafka cluster."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = s = settings
        ms = int(s.timeout * 1000)
        common: dict[str, Any] = {"bootstrap_servers": s.servers, "client_id": s.client_id,
                                  "request_timeout_ms": ms, "retry_backoff_ms": 50,
                                  "connections_max_idle_ms": 3_600_000}
        self.client = AIOKafkaClient(**common)
        self.admin = AIOKafkaAdminClient(**common)
        # acks=all: a publication's offset is given once the topic has it for good
        self.producer = AIOKafkaProducer(**common, acks="all", linger_ms=0,
                                         enable_idempotence=False)
        reading: dict[str, Any] = {**common, "group_id": None, "enable_auto_commit": False,
                                   "fetch_max_wait_ms": s.fetch_wait_ms,
                                   "auto_offset_reset": "earliest"}
        self.bus = AIOKafkaConsumer(**{**reading, "auto_offset_reset": "latest"})
        self.reader = AIOKafkaConsumer(**reading)
        self._read_lock = asyncio.Lock()

    async def start(self) -> None:
        timeout = self.settings.timeout
        await asyncio.wait_for(self.client.bootstrap(), timeout)
        for part in (self.admin, self.producer, self.bus, self.reader):
            await asyncio.wait_for(part.start(), timeout)

    async def stop(self) -> None:
        """Close every client, waiting at most a moment for each (a producer
        flushes on stop, which never ends while the server is gone)."""
        for part in (self.bus, self.reader, self.producer, self.admin, self.client):
            closing = part.close() if part in (self.admin, self.client) else part.stop()
            try:
                await asyncio.wait_for(closing, 0.5)
            except asyncio.CancelledError:
                # aiokafka lets the CancelledError of its own tasks out of stop():
                # swallowed, unless this task itself is being cancelled
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception:  # broken already: nothing more to release
                pass

    # -- topics -----------------------------------------------------------------------

    async def topic_ids(self, names: Sequence[str]) -> dict[str, str]:
        """Each existing topic's id (hex), from any broker of the cluster."""
        node = self.client.get_random_node()
        if node is None:
            raise BrokerUnavailable("no Kafka broker is known")
        reply = await asyncio.wait_for(self.client.send(node, _TopicIds(names)),
                                       self.settings.timeout)
        out: dict[str, str] = {}
        for topic in reply.topics:
            error, name, topic_id = topic[0], topic[1], topic[2]
            if error == NO_ERROR and topic_id != bytes(16):
                out[name] = topic_id.hex()
            elif error != UNKNOWN_TOPIC:
                raise BrokerUnavailable(f"Kafka metadata of {name!r}: error {error}")
        return out

    async def ensure(self, topic: str, *, retention_ms: int | None = None) -> str:
        """The id of ``topic``, which is created (one partition; ``retention_ms``,
        by default the channel topics' retention) if missing."""
        ids = await self.topic_ids([topic])
        if topic in ids:
            return ids[topic]
        retention = self.settings.retention_ms if retention_ms is None else retention_ms
        configs = {"retention.ms": str(retention)}
        reply = await asyncio.wait_for(self.admin.create_topics(
            [NewTopic(topic, 1, self.settings.replicas, topic_configs=configs)]),
            self.settings.timeout)
        for name, error, *_ in reply.topic_errors:
            if error not in (NO_ERROR, TOPIC_EXISTS):
                raise BrokerUnavailable(f"cannot create Kafka topic {name!r}: error {error}")
        ids = await self.topic_ids([topic])
        if topic not in ids:
            raise BrokerUnavailable(f"Kafka topic {topic!r} was created but is not known")
        return ids[topic]

    async def delete(self, topic: str) -> None:
        await asyncio.wait_for(self.admin.delete_topics([topic]), self.settings.timeout)

    # -- reading a channel topic --------------------------------------------------------

    async def offsets(self, topic: str) -> tuple[int, int]:
        """(first kept, next) offsets of the topic's partition."""
        tp = TopicPartition(topic, 0)
        timeout = self.settings.timeout
        begin = await asyncio.wait_for(self.reader.beginning_offsets([tp]), timeout)
        end = await asyncio.wait_for(self.reader.end_offsets([tp]), timeout)
        return int(begin[tp]), int(end[tp])

    async def read(self, topic: str, first: int, last: int) -> list[Any]:
        """The records at offsets ``first`` to ``last`` that the topic still has."""
        if last < first:
            return []
        tp = TopicPartition(topic, 0)
        out: list[Any] = []
        async with self._read_lock:
            self.reader.assign([tp])
            self.reader.seek(tp, first)
            wait = int(self.settings.timeout * 1000)
            while True:
                batch = await self.reader.getmany(tp, timeout_ms=wait,
                                                  max_records=last - first + 1)
                records = batch.get(tp, [])
                if not records:
                    break
                out.extend(r for r in records if first <= r.offset <= last)
                if records[-1].offset >= last:
                    break
        return out
