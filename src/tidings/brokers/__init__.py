"""Brokers, chosen by URL scheme and imported lazily so drivers stay optional."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from tidings.brokers.base import (
    Broker,
    BrokerHandler,
    BrokerHealth,
    Capabilities,
    HistoryOptions,
    HistoryStore,
    MemberEvent,
    NowaitPublisher,
    PipelinedPublisher,
    PresenceStore,
    QueueStore,
    QueueStoreProvider,
    QueueStoreStats,
    StoredItem,
    capabilities_of,
)

__all__ = [
    "Broker",
    "BrokerHandler",
    "BrokerHealth",
    "Capabilities",
    "HistoryOptions",
    "HistoryStore",
    "MemberEvent",
    "NowaitPublisher",
    "PipelinedPublisher",
    "PresenceStore",
    "QueueStore",
    "QueueStoreProvider",
    "QueueStoreStats",
    "StoredItem",
    "capabilities_of",
    "create_broker",
]

# scheme -> (module, class, pip extra)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "memory": ("tidings.brokers.memory", "MemoryBroker", ""),
    "ipc": ("tidings.brokers.ipc.broker", "IpcBroker", ""),
    "redis": ("tidings.brokers.redis.broker", "RedisBroker", "redis"),
    "rediss": ("tidings.brokers.redis.broker", "RedisBroker", "redis"),
    "redis+cluster": ("tidings.brokers.redis.cluster", "RedisClusterBroker", "redis"),
    "amqp": ("tidings.brokers.rabbitmq", "RabbitMQBroker", "rabbitmq"),
    "amqps": ("tidings.brokers.rabbitmq", "RabbitMQBroker", "rabbitmq"),
    "mqtt": ("tidings.brokers.mqtt", "MqttBroker", "mqtt"),
    "mqtts": ("tidings.brokers.mqtt", "MqttBroker", "mqtt"),
    "postgresql": ("tidings.brokers.postgres", "PostgresBroker", "postgres"),
    "postgres": ("tidings.brokers.postgres", "PostgresBroker", "postgres"),
    "nats": ("tidings.brokers.nats.broker", "NatsBroker", "nats"),
    "nats+tls": ("tidings.brokers.nats.broker", "NatsBroker", "nats"),
    "kafka": ("tidings.brokers.kafka.broker", "KafkaBroker", "kafka"),
}


def create_broker(url: str) -> Broker:
    """Build the broker for ``url`` (``memory://`` by default)."""
    scheme = urlsplit(url).scheme or url.rstrip(":/")
    try:
        module_name, class_name, extra = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in sorted(_BACKENDS))
        raise ValueError(
            f"unknown broker URL scheme {scheme!r} in {url!r}; known: {known}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"the {scheme}:// broker needs extra packages: pip install 'tidings[{extra}]' ({exc})"
        ) from exc
    broker: Broker = getattr(module, class_name)(url)
    return broker
