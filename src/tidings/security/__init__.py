"""Who a connection is: tokens (JWT), identities, and redaction of secrets in logs."""

from tidings.security.auth import JWTAuth

__all__ = ["JWTAuth"]
