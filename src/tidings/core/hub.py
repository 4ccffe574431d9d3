"""The hub: the public API of tidings, one per process (node).

It owns the local connections and their subscription index, talks to one
broker, and fans publications out: each publication is encoded once and the
same frame is appended to every matching connection's outbox, without
awaiting any of them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self, TypeVar

from tidings._version import __version__
from tidings.brokers import (
    Broker,
    BrokerHealth,
    Capabilities,
    HistoryStore,
    MemberEvent,
    PresenceStore,
    QueueStoreProvider,
    capabilities_of,
    create_broker,
)
from tidings.brokers.base import PublishDone
from tidings.core.channels import ChannelTypes, checker_for
from tidings.core.config import HistoryConfig, HistoryRule, Limits
from tidings.core.connection import Connection, ConnectionKind, DirectTransport
from tidings.core.fanout import FanOut
from tidings.core.flush import Flusher
from tidings.core.hooks import ErrorHandlers
from tidings.core.messaging import NodeMessenger
from tidings.core.permissions import Rule
from tidings.core.publishing import Publisher
from tidings.core.queue import WorkQueue
from tidings.core.queues import WorkQueues
from tidings.exceptions import AuthError, BrokerUnavailable, HubError, NotAvailable
from tidings.protocol.codes import CloseCode
from tidings.protocol.errors import ProtocolError
from tidings.protocol.index import SubscriptionIndex
from tidings.protocol.names import is_pattern, pattern_matches, validate_channel, validate_pattern
from tidings.protocol.native import StreamPos
from tidings.security.auth import Authenticator, Identity
from tidings.security.redact import redact
from tidings.types import HistoryPage, Member, Publication

if TYPE_CHECKING:
    pass

__all__ = ["HubCore", "HubStats", "PermissionHook"]

log = logging.getLogger("tidings.core.hub")

PermissionHook = Callable[[Connection, str], bool | Awaitable[bool | None] | None]
E = TypeVar("E", bound=Exception)


class HubStats:
    """Plain counters, read by ``/metrics`` at scrape time (cheap on the hot path)."""

    __slots__ = ("deliveries", "dropped", "errors", "messages", "overflows",
                 "publications_in", "publications_out", "refusals")

    def __init__(self) -> None:
        self.publications_in = 0  # publish calls on this node
        self.publications_out = 0  # publications received from the broker
        self.deliveries = 0  # publication frames queued to connections
        self.messages = 0  # direct messages queued to connections
        self.dropped = 0
        self.overflows = 0
        self.errors: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()  # connections/requests refused, by reason


class HubCore:
    """Real-time channels for one process. See the README for a tour.

    ``broker`` is a URL (``memory://``, ``redis://...``) or a Broker object.
    History keeps ``history_size`` publications for ``history_ttl`` seconds per
    channel (0 turns it off); ``history_rules`` override that per pattern.

    Security (docs/security.md): ``auth`` (e.g. ``JWTAuth(secret=...)``) makes
    every websocket authenticate; ``rules`` and the ``can_*`` hooks decide
    permissions (see :mod:`tidings.core.permissions`); ``admins`` are users allowed
    everything but publishing to ``$`` channels; ``allowed_origins`` refuses
    browsers of other sites; ``api_key`` is the HTTP API's admin key and
    ``api_key_publish`` a key limited to ``publish`` and ``broadcast``.

    ``channels``: ``(pattern, type)`` pairs, as many :meth:`channel` calls.
    """

    def __init__(
        self,
        broker: str | Broker = "memory://",
        *,
        node: str | None = None,
        history_size: int = 1000,
        history_ttl: float = 600.0,
        history_rules: Iterable[HistoryRule] = (),
        limits: Limits | None = None,
        presence: bool = True,
        queue_visibility_timeout: float = 30.0,
        queue_max_attempts: int = 5,
        can_subscribe: PermissionHook | None = None,
        can_publish: PermissionHook | None = None,
        can_presence: PermissionHook | None = None,
        can_history: PermissionHook | None = None,
        api_key: str | None = None,
        api_key_publish: str | None = None,
        auth: Authenticator | None = None,
        rules: Iterable[Rule] = (),
        admins: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        channels: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.broker: Broker = create_broker(broker) if isinstance(broker, str) else broker
        # what the broker offers beyond pub/sub; what it does not is NotAvailable
        self.capabilities: Capabilities = capabilities_of(self.broker)
        self._presence: PresenceStore | None = (
            self.broker if isinstance(self.broker, PresenceStore) and presence
            and self.capabilities.presence else None
        )
        # join/leave events go out with Hub(presence=True), on brokers without a
        # presence store too (what crosses nodes is the event, not the member list)
        self._member_events = presence
        self._history: HistoryStore | None = (
            self.broker if isinstance(self.broker, HistoryStore)
            and self.capabilities.history else None
        )
        self.node = node or secrets.token_hex(4)
        if "." in self.node:
            raise ValueError("node ids must not contain '.'")
        self.history_config = HistoryConfig(history_size, history_ttl, list(history_rules))
        self.limits = limits or Limits()
        self.can_subscribe = can_subscribe
        self.can_publish = can_publish
        self.can_presence = can_presence
        self.can_history = can_history
        self.api_key = api_key
        self.api_key_publish = api_key_publish
        self.auth = auth
        self.rules: list[Rule] = list(rules)
        self.admins: frozenset[str] = frozenset(admins)
        self.allowed_origins: frozenset[str] = frozenset(
            o.strip().rstrip("/").lower() for o in allowed_origins if o.strip())
        self.error_handlers = ErrorHandlers(passthrough=(ProtocolError, AuthError))
        self.ips: Counter[str] = Counter()  # open connections per client address
        self.stats = HubStats()
        self.connections: dict[str, Connection] = {}
        self.users: dict[str, set[Connection]] = {}
        # the parts: fan-out of what the broker delivers, publishing to it, and
        # messages between nodes
        # when direct transports are written to: at once, or at the end of the turn
        self.flusher = Flusher()
        self.fanout = FanOut(self.node, self.stats, self.flusher)
        self.index: SubscriptionIndex[Connection] = self.fanout.index
        # the subset of subscriptions that asked for join/leave frames
        self.join_leave_index: SubscriptionIndex[Connection] = self.fanout.join_leave_index
        self.channel_types = ChannelTypes()
        for pattern, type_ in channels:
            self.channel_types.declare(pattern, type_, max_name=self.limits.max_name)
        self.publisher = Publisher(self, self.broker, self.fanout)
        self.messenger = NodeMessenger(self, self.broker)
        # queues live in the broker when it can share them between nodes (Redis),
        # else in this process
        self.queues = WorkQueues(
            self.node, visibility_timeout=queue_visibility_timeout,
            max_attempts=queue_max_attempts,
            store=(self.broker.queue_store()
                   if isinstance(self.broker, QueueStoreProvider) else None),
        )
        self._broker_patterns: set[str] = set()
        self._interest_lock = asyncio.Lock()
        self._health = BrokerHealth(False, "not started")
        self._started = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # the loop it runs on, kept: asyncio.get_running_loop() costs a getpid()
        # system call on CPython 3.11 (its fork check)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the broker. Idempotent."""
        if self._started:
            return
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.flusher.bind(self._loop)
        await self.broker.connect(self.node, BrokerCallbacks(self))
        self._started = True
        log.info("tidings node %s started on %s (offers: %s)", self.node, self.broker_url,
                 ", ".join(self.capabilities.offered()))

    async def stop(self, *, timeout: float = 2.0) -> None:
        """Close every connection with 1001, wake blocked consumers, close the broker."""
        if not self._started:
            return
        self._closing = True
        await self.close_all(CloseCode.GOING_AWAY, "server shutting down", timeout=timeout)
        await self.queues.aclose()  # before the broker: acks and requeues still reach it
        for task in list(self._tasks):
            task.cancel()
        await self.broker.close()
        self._broker_patterns.clear()  # the broker forgot them; a restart subscribes again
        self._started = False
        log.info("tidings node %s stopped", self.node)

    async def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "",
                        *, timeout: float = 2.0) -> None:
        """Close every local connection after its queued frames; wait up to ``timeout``."""
        conns = list(self.connections.values())
        for conn in conns:
            conn.close(code, reason)
        if conns:
            await asyncio.gather(*(conn.wait_closed(timeout) for conn in conns))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """``FastAPI(lifespan=hub.lifespan)``: start the broker, stop it on shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    @property
    def hooks(self) -> dict[str, PermissionHook | None]:
        """The permission hooks by action (``subscribe``, ``publish``, ...)."""
        return {"subscribe": self.can_subscribe, "publish": self.can_publish,
                "presence": self.can_presence, "history": self.can_history}

    def on_error(self, exc_type: type[E]) -> Callable[[Callable[[E, Any], Any]],
                                                      Callable[[E, Any], Any]]:
        """Register a handler (sync or async) for ``exc_type`` raised in hub callbacks::

            @hub.on_error(LookupError)
            def no_such_room(exc, ctx):    # ctx: tidings.core.hooks.ErrorContext
                return False               # stands in for the hook's verdict
        """
        def register(handler: Callable[[E, Any], Any]) -> Callable[[E, Any], Any]:
            self.error_handlers.register(exc_type, handler)
            return handler

        return register

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background, owned by the hub; a failure is logged."""
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task of node %s failed", self.node)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections -------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the hub runs on."""
        return self._loop or asyncio.get_running_loop()

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._started and not self._closing

    def require_started(self) -> None:
        """Raise HubError unless the hub is running."""
        if not self._started or self._closing:
            raise HubError("the hub is not running: use hub.lifespan, `async with hub`, "
                           "or await hub.start()")

    def register(
        self,
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
        *,
        kind: ConnectionKind = ConnectionKind.NATIVE,
        user: str | None = None,
        info: Any = None,
        identity: Identity | None = None,
        ip: str | None = None,
        direct: DirectTransport | None = None,
    ) -> Connection:
        """Create a connection for an accepted websocket and start its writer.

        With an ``identity``, ``user`` and ``info`` default to its own, and the
        connection is closed with 1008 "token expired" when it expires.
        """
        self.require_started()
        if identity is not None:
            user = user if user is not None else identity.user
            info = info if info is not None else identity.info
        conn = Connection(self, f"{self.node}.{secrets.token_urlsafe(6)}", send,
                          kind=kind, user=user, info=info)
        conn.identity = identity
        conn.ip = ip
        self.connections[conn.conn_id] = conn
        if user is not None:
            self.users.setdefault(user, set()).add(conn)
        if ip is not None:
            self.ips[ip] += 1
        conn.start_writer(direct)
        self.arm_expiry(conn)
        return conn

    def arm_expiry(self, conn: Connection) -> None:
        """(Re)arm the timer that closes ``conn`` with 1008 when its token expires."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        identity = conn.identity
        if identity is None or identity.expires is None:
            return
        leeway = self.auth.leeway if self.auth is not None else 0.0
        delay = max(0.0, identity.expires + leeway - time.time())

        def expire() -> None:
            conn.expiry = None
            self.stats.refusals["token_expired"] += 1
            conn.close(CloseCode.POLICY_VIOLATION, "token expired")

        conn.expiry = asyncio.get_running_loop().call_later(delay, expire)

    async def unregister(self, conn: Connection) -> None:
        """Forget a connection: its subscriptions, presence, queue leases."""
        if self.connections.pop(conn.conn_id, None) is None:
            return
        conn.abort()
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if conn.ip is not None:
            self.ips[conn.ip] -= 1
            if self.ips[conn.ip] <= 0:
                del self.ips[conn.ip]
        if conn.user is not None:
            same = self.users.get(conn.user)
            if same is not None:
                same.discard(conn)
                if not same:
                    del self.users[conn.user]
        for queue in list(self.queues.queues.values()):
            queue.remove_owner(conn)
        for pattern in list(conn.subs):
            await self._drop_subscription(conn, pattern)

    # -- subscriptions -----------------------------------------------------------------

    async def subscribe(self, conn: Connection, pattern: str, *, join_leave: bool = False) -> None:
        """Subscribe ``conn``; subscribes at the broker on the first local subscriber."""
        validate_pattern(pattern, self.limits.max_name)
        joined = conn.join_leave
        if join_leave and (joined is None or pattern not in joined):
            if joined is None:
                joined = conn.join_leave = set()
            joined.add(pattern)
            self.join_leave_index.add(pattern, conn)
        elif not join_leave and joined is not None and pattern in joined:
            joined.discard(pattern)
            self.join_leave_index.remove(pattern, conn)
        if pattern in conn.subs:
            return
        conn.subs.add(pattern)
        if self.index.add(pattern, conn):
            await self._sync_interest(pattern)
        if self._member_events and not is_pattern(pattern):
            try:
                if self._presence is not None:
                    await self._presence.add_member(
                        pattern, Member(conn.conn_id, conn.user, conn.info))
                await self.broker.publish_event(
                    pattern, MemberEvent("join", pattern, conn.conn_id, conn.user).encode()
                )
            except BrokerUnavailable:  # brokers re-add their members when they reconnect
                log.debug("presence join of %s in %s deferred", conn.conn_id, pattern)

    async def unsubscribe(self, conn: Connection, pattern: str) -> bool:
        """Unsubscribe ``conn``; False if it was not subscribed."""
        if pattern not in conn.subs:
            return False
        await self._drop_subscription(conn, pattern)
        return True

    async def _drop_subscription(self, conn: Connection, pattern: str) -> None:
        conn.subs.discard(pattern)
        conn.forget_floor(pattern)
        if conn.join_leave is not None and pattern in conn.join_leave:
            conn.join_leave.discard(pattern)
            self.join_leave_index.remove(pattern, conn)
        if self.index.remove(pattern, conn):
            await self._sync_interest(pattern)
        if self._member_events and not is_pattern(pattern):
            try:
                if self._presence is not None:
                    await self._presence.remove_member(pattern, conn.conn_id)
                await self.broker.publish_event(
                    pattern, MemberEvent("leave", pattern, conn.conn_id, conn.user).encode()
                )
            except Exception:  # broker down: the member expires there by TTL
                log.debug("presence leave of %s in %s not recorded", conn.conn_id, pattern)

    async def _sync_interest(self, pattern: str) -> None:
        """Make the broker subscription of ``pattern`` match local interest."""
        async with self._interest_lock:
            want = self.index.has(pattern)
            have = pattern in self._broker_patterns
            # Brokers record the interest before talking to the server and restore it
            # when they reconnect, so an outage here only delays it: local delivery
            # works meanwhile.
            try:
                if want and not have:
                    self._broker_patterns.add(pattern)
                    await self.broker.subscribe(pattern)
                elif have and not want:
                    self._broker_patterns.discard(pattern)
                    await self.broker.unsubscribe(pattern)
            except BrokerUnavailable as exc:
                log.info("broker interest in %r deferred: %s", pattern, exc)

    def on_broker_state(self, health: BrokerHealth) -> None:
        if health.up != self._health.up:
            if health.up and self._health.reason == "not started":
                log.debug("broker %s is up", self.broker_url)
            elif health.up:
                log.warning("broker %s is up again", self.broker_url)
            else:
                log.warning("broker %s is down: %s", self.broker_url, health.reason)
        self._health = health

    def health(self) -> BrokerHealth:
        return self.broker.health() if self._started else BrokerHealth(False, "not started")

    # -- presence and history -------------------------------------------------------------

    async def presence(self, channel: str) -> list[Member]:
        """Members of ``channel`` across every node."""
        validate_channel(channel, self.limits.max_name)
        if self._presence is None:
            if not self.capabilities.presence:
                raise NotAvailable("presence", self.broker_name)
            return []  # turned off with Hub(presence=False)
        return await self._presence.members(channel)

    async def presence_stats(self, channel: str) -> dict[str, int]:
        members = await self.presence(channel)
        return {"num_clients": len(members),
                "num_users": len({m.user for m in members if m.user is not None})}

    async def history(
        self,
        channel: str,
        *,
        since: StreamPos | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        """Kept publications of ``channel`` after ``since``, and its current position.

        ``limit``: at most this many; None or a negative value (Centrifugo's -1): all.
        """
        validate_channel(channel, self.limits.max_name)
        if limit is not None and limit < 0:
            limit = None
        if self._history is None:
            raise NotAvailable("history", self.broker_name)
        return await self._history.history(channel, since=since, limit=limit, reverse=reverse)

    async def remove_history(self, channel: str) -> None:
        validate_channel(channel, self.limits.max_name)
        if self._history is None:
            raise NotAvailable("history", self.broker_name)
        await self._history.remove_history(channel)

    async def position(self, channel: str) -> StreamPos:
        if self._history is None:
            return StreamPos(0, "")
        return await self._history.position(channel)

    # -- publishing, fan-out and messages: the parts ---------------------------------

    def channel(self, pattern: str, type_: Any) -> None:
        """Declare what channels matching ``pattern`` carry: a Pydantic model, any
        type ``pydantic.TypeAdapter`` takes (``list[int]``, a TypedDict...), or a
        :class:`~tidings.core.channels.JsonSchema`.

        Every publish on a matching channel, from any protocol, is validated
        first: invalid data is refused with ``bad_request`` and the error
        locations, and nothing is published; valid data goes out as the type
        dumps it to JSON. The first matching declaration wins."""
        self.channel_types.declare(pattern, type_, max_name=self.limits.max_name)

    def queue_type(self, pattern: str, type_: Any) -> None:
        """Declare what items of the queues named by ``pattern`` (wildcards as
        for channels) carry, as :meth:`channel` does for channels: every push
        (``queue.push``, ``/ws/push``) is checked, an invalid item is refused
        with ``bad_request`` and its locations, and nothing is queued."""
        self.queues.types.declare(pattern, type_, max_name=self.limits.max_name)

    def message_type(self, type_: Any) -> None:
        """Declare what direct messages carry (``send``, ``send_user``,
        ``broadcast``, a native ``send``): checked like a channel's type before
        they leave; use a union for several kinds."""
        self.messenger.message_type = checker_for("messages", type_)
        self.messenger.message_decl = type_

    async def publish(self, channel: str, data: Any, *, sender: str | None = None,
                      text: str | None = None) -> Publication:
        """Publish to a channel on every node; returns it with its offset and epoch.

        ``text``: ``data`` as JSON text, when the caller has it already (a raw
        producer's frame); raw-stream subscribers then get that text as is.
        """
        return await self.publisher.publish(channel, data, sender=sender, text=text)

    @property
    def can_publish_nowait(self) -> bool:
        """True when the broker publishes synchronously (a ``NowaitPublisher``)."""
        return self.publisher.can_publish_nowait

    @property
    def pipelined(self) -> bool:
        """True when the broker keeps the order of publishes issued without waiting."""
        return self.publisher.pipelined

    def publish_nowait(self, channel: str, data: Any, *, sender: str | None = None,
                       text: str | None = None) -> Publication:
        """:meth:`publish` without a coroutine, on brokers that never wait."""
        return self.publisher.publish_nowait(channel, data, sender=sender, text=text)

    def publish_many_nowait(self, channel: str, items: Sequence[tuple[Any, str | None]], *,
                            sender: str | None = None) -> list[Publication]:
        """:meth:`publish_nowait` of several ``(data, text)`` items, in order."""
        return self.publisher.publish_many_nowait(channel, items, sender=sender)

    def publish_soon(self, channel: str, data: Any, *, sender: str | None = None,
                     text: str | None = None) -> asyncio.Future[Publication]:
        """Start a publish and return at once; the future gets the publication."""
        return self.publisher.publish_soon(channel, data, sender=sender, text=text)

    def publish_then(self, channel: str, data: Any, *, sender: str | None = None,
                     text: str | None = None, done: PublishDone) -> None:
        """:meth:`publish_soon` with a callback instead of a future."""
        self.publisher.publish_then(channel, data, sender=sender, text=text, done=done)

    async def send(self, to: str | Iterable[str], data: Any, *, sender: str = "server") -> int:
        """Send ``data`` as a ``message`` to one or many conn_ids on any node."""
        return await self.messenger.send(to, data, sender=sender)

    async def send_user(self, user: str, data: Any, *, sender: str = "server") -> None:
        """Send to every connection of ``user`` on every node."""
        await self.messenger.send_user(user, data, sender=sender)

    async def broadcast(self, data: Any, *, sender: str = "server") -> None:
        """Send a ``message`` to every connection on every node."""
        await self.messenger.broadcast(data, sender=sender)

    async def disconnect(self, user: str, *, code: int = CloseCode.NORMAL,
                         reason: str = "disconnected by server") -> None:
        """Close every connection of ``user`` on every node."""
        await self.messenger.disconnect(user, code=code, reason=reason)

    async def subscribe_user(self, user: str, channel: str) -> None:
        """Subscribe every connection of ``user``, on every node, to ``channel``."""
        await self.messenger.subscribe_user(user, channel)

    async def unsubscribe_user(self, user: str, channel: str) -> None:
        """Unsubscribe every connection of ``user``, on every node, from ``channel``."""
        await self.messenger.unsubscribe_user(user, channel)

    # -- queues and introspection ----------------------------------------------------------

    def queue(self, name: str) -> WorkQueue:
        """The work queue ``name`` (created on first use)."""
        if not name or len(name) > self.limits.max_name:
            raise ValueError(f"queue names are 1-{self.limits.max_name} characters")
        return self.queues.get(name)

    def channels(self, pattern: str | None = None) -> dict[str, int]:
        """Channels and patterns with local subscribers, and how many each."""
        out: dict[str, int] = {}
        for name in self.index.names():
            if pattern is None or pattern_matches(pattern, name) or pattern == name:
                out[name] = self.index.subscribers(name)
        return out

    @property
    def broker_url(self) -> str:
        """The broker's URL with any password masked, for logs."""
        return redact(self.broker.url)

    @property
    def broker_name(self) -> str:
        """The broker's kind as errors name it: ``redis``, ``memory``, ..."""
        return self.broker.url.partition(":")[0] or type(self.broker).__name__

    def info(self) -> dict[str, Any]:
        return {
            "uid": self.node,
            "name": self.node,
            "version": __version__,
            "num_clients": len(self.connections),
            "num_users": len(self.users),
            "num_subs": sum(len(c.subs) for c in self.connections.values()),
            "num_channels": len(self.index),
            "broker": self.broker_name,
            "capabilities": self.capabilities.offered(),
            "stats": {"publications_in": self.stats.publications_in,
                      "publications_out": self.stats.publications_out,
                      "deliveries": self.stats.deliveries, "messages": self.stats.messages,
                      "dropped": self.stats.dropped, "overflows": self.stats.overflows},
        }


class BrokerCallbacks:
    """What a hub's broker calls (the BrokerHandler protocol), wired straight to
    the parts: the fan-out's methods are attributes here, so a publication costs
    no extra call on its way to the subscribers."""

    __slots__ = ("hub", "on_event", "on_node_message", "on_publication", "on_publications")

    def __init__(self, hub: HubCore) -> None:
        self.hub = hub
        self.on_publication = hub.fanout.on_publication
        self.on_publications = hub.fanout.on_publications
        self.on_event = hub.fanout.on_event
        self.on_node_message = hub.messenger.on_node_message

    def on_broker_state(self, health: BrokerHealth) -> None:
        """The hub's own, looked up at each (rare) transition."""
        self.hub.on_broker_state(health)
