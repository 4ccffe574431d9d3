"""Error handlers: per exception type, for hub callbacks and for your own endpoints.

HubCore callbacks (permission hooks, authenticators) run through
:meth:`ErrorHandlers.call`. An exception a handler was registered for (with
``@hub.on_error(SomeError)``, most specific type first by MRO) is given to
that handler, whose return value stands in for the callback's (a permission
hook's verdict, an authenticator's Identity). Any other exception is logged
once with its context and becomes :class:`~tidings.exceptions.HookError`,
which the hub answers with ``internal`` (or a refused handshake): the hub
never dies of it and the client never sees a traceback. A callback refuses
on purpose by raising ``ProtocolError`` or ``AuthError``; those pass through.

:func:`handle` and :func:`ahandle` are the same idea for your own code: wrap a
function so that an exception type goes to a handler (the
fastapi-distributed-websocket decorators, typed, with ``functools.wraps``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from tidings.exceptions import HookError

__all__ = ["ErrorContext", "ErrorHandlers", "ahandle", "handle"]

log = logging.getLogger("tidings.core.hooks")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

Handler = Callable[[Any, "ErrorContext"], Any]


@dataclass(frozen=True, slots=True)
class ErrorContext:
    """Where a callback failed: which one, for which connection, on what name."""

    hook: str  # "can_subscribe", "authenticate", ...
    conn_id: str | None = None
    user: str | None = None
    name: str | None = None  # the channel or pattern, when there is one

    def __str__(self) -> str:
        parts = [self.hook]
        if self.conn_id:
            parts.append(f"conn={self.conn_id}")
        if self.user:
            parts.append(f"user={self.user}")
        if self.name:
            parts.append(f"name={self.name!r}")
        return " ".join(parts)


class ErrorHandlers:
    """Exception handlers by type; see the module docstring."""

    def __init__(self, passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self._handlers: dict[type[BaseException], Handler] = {}
        self.passthrough = passthrough

    def register(self, exc_type: type[BaseException], handler: Handler) -> None:
        if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
            raise TypeError("handlers are registered for Exception subclasses")
        self._handlers[exc_type] = handler

    def find(self, exc: BaseException) -> Handler | None:
        for klass in type(exc).__mro__:
            handler = self._handlers.get(klass)
            if handler is not None:
                return handler
        return None

    async def call(self, fn: Callable[..., Any], *args: Any, context: ErrorContext) -> Any:
        """``fn(*args)``, awaited if it returns an awaitable; errors handled as above."""
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except self.passthrough:
            raise
        except Exception as exc:
            return await self.recover(exc, context)

    async def recover(self, exc: Exception, context: ErrorContext) -> Any:
        """Give ``exc`` to its handler, or log it and raise :class:`HookError`."""
        handler = self.find(exc)
        if handler is None:
            log.error("%s raised %s", context, type(exc).__name__, exc_info=exc)
            raise HookError(str(context)) from exc
        try:
            out = handler(exc, context)
            if inspect.isawaitable(out):
                out = await out
            return out
        except self.passthrough:
            raise
        except Exception as again:
            log.error("the %s handler for %s failed", type(exc).__name__, context,
                      exc_info=again)
            raise HookError(str(context)) from again


def handle(
    exc_type: type[E] | tuple[type[E], ...], handler: Callable[[E], T]
) -> Callable[[Callable[P, R]], Callable[P, R | T]]:
    """Decorate a sync function: an ``exc_type`` it raises goes to ``handler(exc)``,
    whose return value is returned instead."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R | T]:
        if inspect.iscoroutinefunction(fn):
            raise TypeError("handle() wraps sync functions; use ahandle() for async ones")

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | T:
            try:
                return fn(*args, **kwargs)
            except exc_type as exc:
                return handler(exc)

        return wrapper

    return decorate


def ahandle(
    exc_type: type[E] | tuple[type[E], ...], handler: Callable[[E], T | Awaitable[T]]
) -> Callable[[Callable[P, R | Awaitable[R]]], Callable[P, Awaitable[R | T]]]:
    """Like :func:`handle`, for a sync or async function and a sync or async
    handler; the decorated function is a coroutine function."""

    def decorate(fn: Callable[P, R | Awaitable[R]]) -> Callable[P, Awaitable[R | T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | T:
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    return await result
                return result
            except exc_type as exc:
                out = handler(exc)
                if inspect.isawaitable(out):
                    return await out
                return out

        return wrapper

    return decorate
