"""``nats://``: the NATS family (JetStream for positions, history, presence, queues).

``from tidings.brokers.nats import NatsBroker`` as before; the parts are
``broker``, ``publishing``, ``history``, ``presence``, ``queue``, ``subjects``
and ``wire``.
"""

from tidings.brokers.nats.broker import NatsBroker

__all__ = ["NatsBroker"]
