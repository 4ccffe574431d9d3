"""``nats://``: the NATS family (JetStream for positions, history, presence, queues).

``broker`` (connection, interest, receiving, faults, the JetStream plumbing;
the link its parts share), ``publishing`` (the per-channel compare-and-set
publish path), ``history`` (the history stream: tails, epoch markers,
reads), ``presence``, ``queue`` (the shared queue store on a work-queue
stream), ``subjects`` (every subject and stream name, and the ``NatsLink``
Protocol) and ``wire`` (the message format). ``from tidings.brokers.nats
import NatsBroker`` works as before.
"""

from tidings.brokers.nats.broker import NatsBroker

__all__ = ["NatsBroker"]
