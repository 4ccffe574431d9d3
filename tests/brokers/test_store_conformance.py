"""The queue-store conformance suite (tidings.testing.queue_store), run against
every broker of conftest.world; brokers without a shared store skip with the reason."""

from tidings.testing.queue_store import *  # noqa: F403 - the suite's tests
