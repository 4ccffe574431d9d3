"""The pub/sub conformance suite (tidings.testing.pubsub), run against every
broker of conftest.world."""

from tidings.testing.pubsub import *  # noqa: F403 - the suite's tests
