"""Conformance suites a broker backend runs to show it keeps the Broker contract.

The suites are plain pytest tests that take one fixture, so an out-of-tree
backend runs them by importing them into a test module and defining that
fixture (pytest, pytest-asyncio in auto mode)::

    # tests/test_my_broker.py
    import pytest
    from tidings.testing import hubs_on
    from tidings.testing.pubsub import *  # noqa: F403 - the suite's tests

    @pytest.fixture
    async def world():
        async with hubs_on("mybroker://localhost/test") as make:
            yield make

- :mod:`tidings.testing.pubsub`: what crosses between nodes (pub/sub,
  patterns, offsets and order, direct messages, interest routing, history,
  presence and join/leave). Fixture ``world``: a factory of hubs on one broker.
- :mod:`tidings.testing.queue_store`: the :class:`~tidings.brokers.base.QueueStore`
  semantics (leases, atomic requeue, claims of a dead node's items, dead
  letters, delays, stats). Fixture ``world`` too; it skips unless the broker
  has a queue store.

A test that needs a capability the broker does not state
(:class:`~tidings.brokers.base.Capabilities`) skips with that reason, never
silently: a pub/sub-only broker passes the rest.
"""

from tidings.testing.support import Sink, World, hubs_on, requires, started, subscriber

__all__ = ["Sink", "World", "hubs_on", "requires", "started", "subscriber"]
