"""The Python client of the native protocol (:class:`Client`)."""

from tidings.client.client import Client
from tidings.client.subscription import Message, Subscription

__all__ = ["Client", "Message", "Subscription"]
