"""Error handlers for hub callbacks and the handle/ahandle decorators."""

from __future__ import annotations

import logging

import pytest

from tidings.core.hooks import ErrorContext, ErrorHandlers, ahandle, handle
from tidings.exceptions import AuthError, HookError


def test_handle_sync() -> None:
    @handle(KeyError, lambda exc: f"missing {exc.args[0]}")
    def lookup(key: str) -> str:
        return {"a": "A"}[key]

    assert lookup("a") == "A"
    assert lookup("b") == "missing b"
    assert lookup.__name__ == "lookup"
    with pytest.raises(TypeError):
        handle(KeyError, str)(ahandle_target)


async def ahandle_target() -> None:
    raise KeyError("x")


async def test_ahandle_sync_and_async() -> None:
    async def on_value_error(exc: ValueError) -> int:
        return -1

    @ahandle(ValueError, on_value_error)
    async def parse(text: str) -> int:
        return int(text)

    @ahandle((KeyError, IndexError), lambda exc: "none")
    def first(items: list[str]) -> str:
        return items[0]

    assert await parse("3") == 3
    assert await parse("x") == -1
    assert await first(["a"]) == "a"
    assert await first([]) == "none"
    with pytest.raises(ZeroDivisionError):
        await ahandle(ValueError, lambda exc: 0)(lambda: 1 // 0)()


async def test_error_handlers(caplog: pytest.LogCaptureFixture) -> None:
    handlers = ErrorHandlers(passthrough=(AuthError,))
    ctx = ErrorContext("can_subscribe", "n.c", "alice", "a/b")

    def boom() -> None:
        raise LookupError("x")

    async def refuse() -> None:
        raise AuthError("no")

    with caplog.at_level(logging.ERROR, "tidings.core.hooks"), pytest.raises(HookError):
        await handlers.call(boom, context=ctx)
    assert "can_subscribe conn=n.c user=alice name='a/b' raised LookupError" in caplog.text
    with pytest.raises(AuthError):
        await handlers.call(refuse, context=ctx)
    handlers.register(LookupError, lambda exc, c: "handled")
    assert await handlers.call(boom, context=ctx) == "handled"

    async def async_handler(exc: Exception, c: ErrorContext) -> str:
        return c.hook

    handlers.register(KeyError, async_handler)  # the most specific type wins
    assert await handlers.call(lambda: {}["k"], context=ctx) == "can_subscribe"
    handlers.register(IndexError, lambda exc, c: [][0])  # a failing handler
    with pytest.raises(HookError):
        await handlers.call(lambda: [][1], context=ctx)
    with pytest.raises(TypeError):
        handlers.register(BaseException, lambda exc, c: None)
