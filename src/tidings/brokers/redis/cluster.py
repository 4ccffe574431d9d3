"""``redis+cluster://host:port``: the Redis broker on a Redis Cluster.

The same broker on the cluster topology (:class:`~tidings.brokers.redis.topology.ClusterTopology`:
hash-tagged keys, sharded pub/sub for exact channels, classic pub/sub for
patterns); ``host:port`` is any node of the cluster, ``?patterns=off`` turns
classic pub/sub off when no client subscribes with wildcards.
"""

from __future__ import annotations

from tidings.brokers.redis.broker import RedisBroker
from tidings.brokers.redis.topology import ClusterTopology

__all__ = ["RedisClusterBroker"]


class RedisClusterBroker(RedisBroker):
    """Broker, HistoryStore and PresenceStore on a Redis Cluster."""

    def __init__(self, url: str) -> None:
        super().__init__(url.replace("redis+cluster://", "redis://", 1), topology=ClusterTopology)
        self.url = url
