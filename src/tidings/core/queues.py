"""Every work queue of one hub: in-process ones, or ones a broker's store holds."""

from __future__ import annotations

import asyncio
import logging

from tidings.brokers.base import QueueStore
from tidings.core.channels import ChannelTypes
from tidings.core.queue import DEFAULT_MAX_ATTEMPTS, DEFAULT_VISIBILITY, Waiter, WorkQueue
from tidings.core.store_queue import StoreQueue

__all__ = ["WorkQueues"]

log = logging.getLogger("tidings.queue")


class WorkQueues:
    """Every queue of one hub."""

    def __init__(self, node: str, *, visibility_timeout: float = DEFAULT_VISIBILITY,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 store: QueueStore | None = None) -> None:
        self.node = node
        self.store = store
        self.visibility_timeout = visibility_timeout
        self.max_attempts = max_attempts
        self.queues: dict[str, WorkQueue] = {}
        self.types = ChannelTypes()  # typed queues (hub.queue_type), matched by name
        self.closed = False
        self.waiters: set[Waiter] = set()

    def get(self, name: str) -> WorkQueue:
        queue = self.queues.get(name)
        if queue is None:
            if self.store is not None:
                queue = self.queues[name] = StoreQueue(
                    self, name, self.store, visibility_timeout=self.visibility_timeout,
                    max_attempts=self.max_attempts,
                )
            else:
                queue = self.queues[name] = WorkQueue(
                    self, name, visibility_timeout=self.visibility_timeout,
                    max_attempts=self.max_attempts,
                )
        return queue

    async def refresh(self, timeout: float = 2.0) -> None:
        """Refresh every queue's stats from the store (bounded; failures keep the old)."""
        if self.store is None or not self.queues:
            return
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *(q.refresh() for q in list(self.queues.values())), return_exceptions=True),
                timeout)
        except TimeoutError:
            log.debug("queue stats refresh timed out")
            return
        for result in results:
            if isinstance(result, Exception):
                log.debug("queue stats refresh failed: %s", result)
                break

    def close(self) -> None:
        """Wake every blocked Python consumer so it returns; cancel timers."""
        self.closed = True
        for waiter in list(self.waiters):
            waiter.wake()
        for queue in self.queues.values():
            queue.close()

    async def aclose(self) -> None:
        """``close``, then let Python consumers unwind (their items go back) and
        wait, bounded, for acks and requeues to reach the store."""
        self.close()
        for _ in range(3):
            await asyncio.sleep(0)
        await asyncio.gather(*(q.aclose() for q in list(self.queues.values())))
