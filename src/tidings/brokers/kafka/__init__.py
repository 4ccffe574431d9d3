"""``kafka://``: the Kafka broker (:mod:`tidings.brokers.kafka.broker`), with its
link to the server (``link``), channel history reads (``history``) and the
sans-I/O bus records and per-channel ordering (``wire``)."""

from tidings.brokers.kafka.broker import KafkaBroker

__all__ = ["KafkaBroker"]
