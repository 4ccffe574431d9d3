"""When frames queued for direct transports are written: at once, or at the end of the turn.

A connection on a direct transport (tidings' own server, or uvicorn with
``tidings.server.wsproto``) writes whole frames to its socket. Two things
are wanted of those writes, and they pull apart:

- **low load, latency**: a lone publication should be on the subscriber's
  socket in the event-loop turn its frame was read in, with no callback hop
  and no extra turn;
- **high load, throughput**: everything a connection is sent in one turn
  should go out in one ``write`` (one system call), however many publishers
  it came from.

The policy (docs/latency.md): a burst of work that delivers frames (one
producer's read, one fan-out) is a **scope**. The first scope of a turn
writes *through*: each connection whose outbox is empty and whose socket
takes data gets its frame written at once. Whatever else a connection is sent
in that turn (a second scope, a reply queued by a task, a connection that was
already written to) is queued, and the end-of-turn flush writes it in one
``write``. So a connection sees at most two writes per turn. A turn that had
more than one scope marks the hub busy: the next turn queues from its first
scope on (one write per connection per turn, as a purely batching server
would do), and a turn with one scope clears it again, as does a pause: the
mark is for the turn right after (the end-of-turn callback runs at the start
of the next iteration, just before its reads), so a scope that comes more
than ``BUSY_SECONDS`` later found the loop idle, and writes through.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tidings.core.connection import Connection

__all__ = ["BUSY_SECONDS", "Flusher"]

log = logging.getLogger("tidings.core.flush")

BUSY_SECONDS: Final = 0.002  # how long a busy mark holds (loop.time(): ms on uvloop)


class Flusher:
    """A hub's write policy for direct transports (see the module docstring).

    ``through`` is true while the current scope writes through; ``turn`` counts
    turns that wrote through, so a connection can tell whether it was already
    written to in this one.
    """

    __slots__ = ("_busy", "_busy_at", "_dirty", "_loop", "_scheduled", "_scopes", "depth",
                 "through", "turn")

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False  # the end-of-turn flush is pending
        self._scopes = 0  # scopes seen in this turn (while the flush is pending)
        self._busy = False  # the last turn had more than one scope: queue everything
        self._busy_at = 0.0  # when that turn ended (loop.time())
        # kept: asyncio.get_running_loop() costs a getpid() call on CPython 3.11
        self._loop: asyncio.AbstractEventLoop | None = None
        self.depth = 0
        self.through = False
        self.turn = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the end-of-turn flushes run on (the hub's)."""
        self._loop = loop

    def enter(self) -> None:
        """A scope starts: one read's frames, or one fan-out. Scopes nest; the
        outermost decides."""
        depth = self.depth
        self.depth = depth + 1
        if depth:
            return
        if self._scheduled:  # this turn already queued frames: join them
            self._scopes += 1
            return
        self._arm()  # whatever else this turn brings goes out at its end
        self._scopes = 1
        if self._busy and self._loop is not None:  # still the turn right after?
            self._busy = self._loop.time() - self._busy_at < BUSY_SECONDS
        self.through = not self._busy

    def leave(self) -> None:
        """The scope :meth:`enter` opened ends."""
        depth = self.depth - 1
        self.depth = depth
        if not depth:
            self.through = False

    def schedule(self, conn: Connection) -> None:
        """Write ``conn``'s queued frames at the end of this turn, in one write with
        whatever else it is sent meanwhile."""
        self._dirty.append(conn)
        if not self._scheduled:
            self._arm()

    def _arm(self) -> None:
        self._scheduled = True
        (self._loop or asyncio.get_running_loop()).call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._scheduled = False
        self._busy = self._scopes > 1
        if self._busy and self._loop is not None:
            self._busy_at = self._loop.time()
        self._scopes = 0
        self.turn += 1
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken socket must not cost the others their frames
                log.exception("flush of %s failed", conn.conn_id)
                conn.abort()
