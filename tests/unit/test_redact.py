"""Secrets never reach the logs."""

from __future__ import annotations

import logging

import pytest

from tidings.security.auth import encode_jwt
from tidings.security.redact import RedactingFilter, redact

JWT = encode_jwt({"sub": "alice"}, "secret-secret")


@pytest.mark.parametrize("text", [
    f'127.0.0.1:5000 - "WebSocket /ws?token={JWT}" [accepted]',
    f"GET /ws?a=1&token={JWT}&b=2",
    f"Authorization: Bearer {JWT}",
    "Authorization: apikey my-api-key-1",
    "{'x-api-key': 'my-api-key-1'}",
    f"subprotocols ['tidings', 'token.{JWT}']",
])
def test_redact(text: str) -> None:
    out = redact(text)
    assert JWT not in out and "my-api-key-1" not in out
    assert "***" in out


def test_filter_masks_args_and_known_secrets() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s"', ("1.2.3.4", "GET", f"/ws?token={JWT}"), None)
    RedactingFilter(secrets=["hunter22"]).filter(record)
    assert JWT not in record.getMessage()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key is hunter22", None, None)
    RedactingFilter(secrets=["hunter22"]).filter(record)
    assert record.getMessage() == "key is ***"


def test_broker_url_passwords_are_masked() -> None:
    from tidings.security.redact import redact

    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("amqp://guest:guest@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert redact("postgresql://app:p%40ss@db/test?prefix=x") == "postgresql://app:***@db/test?prefix=x"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"  # a port is not a password
