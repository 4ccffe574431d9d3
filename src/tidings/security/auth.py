"""Connection authentication: who a websocket is, and what its token allows.

An :class:`Authenticator` turns a token into an :class:`Identity` or raises
:class:`AuthError`; the hub asks it once per connection (and again on each
``refresh`` frame). :class:`JWTAuth` is the one tidings ships: JSON Web
Tokens verified with the standard library for HS256/384/512 and with the
optional ``cryptography`` package (``pip install tidings[jwt]``) for
RS256/384/512 and ES256/384/512.

Why so strict: the algorithm is pinned by configuration and a token whose
header names another one is refused, so ``alg: none`` and the classic
HS256-signed-with-the-RSA-public-key confusion cannot be played against us;
``exp`` and ``nbf`` are enforced with a small leeway for clock skew; ``crit``
headers we do not understand refuse the token.

Claims read: ``sub`` is the user; ``exp``/``nbf``; optional ``channels``
(a list of MQTT patterns the token may subscribe to *and* publish to, or
``{"subscribe": [...], "publish": [...]}`` to separate them); optional
``admin: true`` (wide wildcards and other users' private channels allowed);
optional ``info`` (any JSON value, shown in presence).

Where a client puts its token (:func:`token_from_scope`): ``?token=``,
``Authorization: Bearer <token>``, or the websocket subprotocol list as
``token.<token>`` (browsers cannot set headers; offer ``["tidings",
"token.<jwt>"]`` and the server answers with ``tidings``), or, with none of
these, a first frame ``{"type": "connect", "token": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

# the annotation FastAPI reads to inject the socket into the dependencies below
from starlette.websockets import WebSocket

from tidings.exceptions import AuthError
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_pattern

__all__ = [
    "ALGORITHMS",
    "AuthError",
    "Authenticator",
    "Grants",
    "Identity",
    "JWTAuth",
    "RequireIdentity",
    "WebSocketTokenBearer",
    "encode_jwt",
    "select_subprotocol",
    "token_from_scope",
]

SUBPROTOCOL: Final = "tidings"
TOKEN_PREFIX: Final = "token."
MAX_TOKEN: Final = 16 * 1024  # bytes; a bigger "token" is an attack, not a credential

_HMAC: Final = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_ASYM: Final = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
ALGORITHMS: Final = (*_HMAC, *_ASYM)
_EC_CURVES: Final = {"ES256": ("secp256r1", 32), "ES384": ("secp384r1", 48),
                     "ES512": ("secp521r1", 66)}
_JWK_CURVES: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


@dataclass(frozen=True, slots=True)
class Grants:
    """Patterns a token may subscribe to (and read presence/history of) and publish to."""

    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()

    @classmethod
    def from_claim(cls, claim: Any) -> Grants:
        """``["a/#", ...]`` (both) or ``{"subscribe": [...], "publish": [...]}``."""
        if isinstance(claim, list):
            patterns = _patterns(claim)
            return cls(patterns, patterns)
        if isinstance(claim, dict) and set(claim) <= {"subscribe", "publish"}:
            return cls(_patterns(claim.get("subscribe", [])), _patterns(claim.get("publish", [])))
        raise AuthError("bad 'channels' claim: a list of patterns or {subscribe, publish}")


def _patterns(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise AuthError("bad 'channels' claim: expected a list of patterns")
    try:
        return tuple(validate_pattern(p) for p in value)
    except ProtocolError as exc:
        raise AuthError(f"bad 'channels' claim: {exc.message}") from None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is. ``channels`` None: no per-token limit (rules apply)."""

    user: str | None
    channels: Grants | None = None
    info: Any = None
    admin: bool = False
    expires: float | None = None  # Unix time after which the connection is closed


class Authenticator:
    """Turn a token into an :class:`Identity`; raise :class:`AuthError` to refuse.

    Subclass it to plug your own user lookup (sessions, opaque tokens, an
    OAuth introspection endpoint). ``leeway`` is added to ``Identity.expires``
    before an expired connection is closed.
    """

    leeway: float = 0.0

    async def authenticate(self, token: str) -> Identity:
        raise NotImplementedError


# --- base64url and JSON ---------------------------------------------------------------


def _b64decode(part: str) -> bytes:
    if not part or any(c in part for c in "=+/ \n"):
        raise AuthError("malformed token")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise AuthError("malformed token") from None


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AuthError("malformed token") from None
    if not isinstance(value, dict):
        raise AuthError("malformed token")
    return value


def _int_from(raw: str) -> int:
    return int.from_bytes(_b64decode(raw), "big")


# --- keys -----------------------------------------------------------------------------


def _crypto_missing() -> AuthError:
    return AuthError("RS*/ES* tokens need the 'cryptography' package: "
                     "pip install 'tidings[jwt]'")


def _load_pem(pem: str | bytes, algorithm: str) -> Any:
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise _crypto_missing() from None
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"cannot read the public key: {exc}") from None
    _check_key_type(key, algorithm)
    return key


def _check_key_type(key: Any, algorithm: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if algorithm.startswith("RS"):
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"{algorithm} needs an RSA public key")
        if key.key_size < 2048:
            raise ValueError("RSA keys shorter than 2048 bits are refused")
    else:
        curve, _ = _EC_CURVES[algorithm]
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
            raise ValueError(f"{algorithm} needs an EC public key on {curve}")


def _jwk_key(jwk: Mapping[str, Any], algorithm: str) -> Any:
    """The verification key of one JWK (``oct``, ``RSA`` or ``EC``)."""
    kty = jwk.get("kty")
    if algorithm in _HMAC:
        if kty != "oct":
            raise ValueError(f"{algorithm} needs an 'oct' JWK")
        return _b64decode(str(jwk.get("k", "")))
    try:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
    except ImportError:
        raise _crypto_missing() from None
    if algorithm.startswith("RS") and kty == "RSA":
        key: Any = rsa.RSAPublicNumbers(_int_from(str(jwk["e"])),
                                        _int_from(str(jwk["n"]))).public_key()
    elif algorithm.startswith("ES") and kty == "EC" and _JWK_CURVES.get(
            str(jwk.get("crv"))) == algorithm:
        curve = ec.SECP256R1() if algorithm == "ES256" else (
            ec.SECP384R1() if algorithm == "ES384" else ec.SECP521R1())
        key = ec.EllipticCurvePublicNumbers(_int_from(str(jwk["x"])), _int_from(str(jwk["y"])),
                                            curve).public_key()
    else:
        raise ValueError(f"a {kty!r} JWK cannot verify {algorithm}")
    _check_key_type(key, algorithm)
    return key


def _load_jwks(jwks: str | Path | Mapping[str, Any], algorithm: str) -> dict[str | None, Any]:
    if isinstance(jwks, Mapping):
        doc: Any = jwks
    else:
        try:
            doc = json.loads(Path(jwks).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the JWKS file {jwks}: {exc}") from None
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list):
        raise ValueError("a JWKS document is {\"keys\": [...]}")
    out: dict[str | None, Any] = {}
    for jwk in keys:
        if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("alg", algorithm) != algorithm:
            continue  # a key pinned to another algorithm is never used for this one
        try:
            out[jwk.get("kid")] = _jwk_key(jwk, algorithm)
        except (KeyError, ValueError, AuthError):
            continue
    if not out:
        raise ValueError(f"the JWKS holds no usable {algorithm} key")
    return out


# --- signing (for tests and for apps that issue their own tokens) -------------------------


def _sign(algorithm: str, key: Any, signing_input: bytes) -> bytes:
    if algorithm in _HMAC:
        secret = key.encode() if isinstance(key, str) else bytes(key)
        return hmac.new(secret, signing_input, _HMAC[algorithm]).digest()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    if isinstance(key, (str, bytes)):
        key = serialization.load_pem_private_key(
            key.encode() if isinstance(key, str) else key, password=None)
    digest = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[
        algorithm[2:]]
    if algorithm.startswith("RS"):
        return bytes(key.sign(signing_input, padding.PKCS1v15(), digest))
    der = key.sign(signing_input, ec.ECDSA(digest))
    r, s = utils.decode_dss_signature(der)
    size = _EC_CURVES[algorithm][1]
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def encode_jwt(claims: Mapping[str, Any], key: Any, algorithm: str = "HS256", *,
               headers: Mapping[str, Any] | None = None) -> str:
    """A signed JWT: ``key`` is the HMAC secret, or a private key (PEM or object)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported algorithm {algorithm!r}")
    header = {"alg": algorithm, "typ": "JWT", **(headers or {})}
    signing_input = (_b64encode(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64encode(json.dumps(dict(claims), separators=(",", ":")).encode()))
    signature = _sign(algorithm, key, signing_input.encode())
    return signing_input + "." + _b64encode(signature)


# --- verification -------------------------------------------------------------------------


class JWTAuth(Authenticator):
    """Verify JWTs with one pinned algorithm.

    HS256/384/512 take ``secret``; RS*/ES* take ``public_key`` (PEM) or
    ``jwks`` (a JWKS file path or document; the token's ``kid`` picks the
    key). ``audience``/``issuer``, when set, must match ``aud``/``iss``.
    """

    def __init__(
        self,
        secret: str | bytes | None = None,
        *,
        algorithm: str = "HS256",
        public_key: str | bytes | None = None,
        jwks: str | Path | Mapping[str, Any] | None = None,
        leeway: float = 5.0,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)} "
                             f"(never 'none'), got {algorithm!r}")
        self.algorithm = algorithm
        self.leeway = float(leeway)
        self.audience = audience
        self.issuer = issuer
        # what it was built from: key objects do not pickle, and `--workers`
        # hands the authenticator to worker processes
        self._source = (secret, algorithm, public_key, jwks, leeway, audience, issuer)
        self._secret: bytes | None = None
        self._keys: dict[str | None, Any] = {}
        if algorithm in _HMAC:
            if public_key is not None:
                raise ValueError(f"{algorithm} verifies with a shared secret, not a public key")
            if jwks is not None:
                self._keys = _load_jwks(jwks, algorithm)
            elif not secret:
                raise ValueError(f"{algorithm} needs a non-empty secret")
            else:
                self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        else:
            if secret is not None:
                raise ValueError(f"{algorithm} verifies with a public key, not a secret")
            if (public_key is None) == (jwks is None):
                raise ValueError(f"{algorithm} needs exactly one of public_key and jwks")
            if public_key is not None:
                self._keys = {None: _load_pem(public_key, algorithm)}
            elif jwks is not None:
                self._keys = _load_jwks(jwks, algorithm)

    def __repr__(self) -> str:  # never show the secret
        return f"JWTAuth(algorithm={self.algorithm!r}, leeway={self.leeway})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_jwt_auth, self._source)

    async def authenticate(self, token: str) -> Identity:
        return self.identity(self.verify(token))

    def identity(self, claims: Mapping[str, Any]) -> Identity:
        """The :class:`Identity` of verified claims."""
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("the token has no 'sub'")
        channels = claims.get("channels")
        exp = claims.get("exp")
        return Identity(
            user=sub,
            channels=None if channels is None else Grants.from_claim(channels),
            info=claims.get("info"),
            admin=claims.get("admin") is True,
            expires=float(exp) if exp is not None else None,
        )

    def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """The claims of a valid token; :class:`AuthError` otherwise."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN:
            raise AuthError("malformed token")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("malformed token")
        header = _json_object(_b64decode(parts[0]))
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthError("unsigned tokens are refused")
        if alg != self.algorithm:
            raise AuthError(f"algorithm {alg[:16]!r} is not the configured one")
        if "crit" in header:
            raise AuthError("unsupported critical header")
        key = self._key(header.get("kid"))
        signature = _b64decode(parts[2])
        self._check_signature(key, f"{parts[0]}.{parts[1]}".encode(), signature)
        claims = _json_object(_b64decode(parts[1]))
        self._check_claims(claims, time.time() if now is None else now)
        return claims

    def _key(self, kid: Any) -> Any:
        if self._secret is not None:
            return self._secret
        if list(self._keys) == [None]:
            return self._keys[None]  # one PEM key, or a JWKS of one key without kid
        if not isinstance(kid, str) or kid not in self._keys:
            raise AuthError("unknown key id")
        return self._keys[kid]

    def _check_signature(self, key: Any, signing_input: bytes, signature: bytes) -> None:
        alg = self.algorithm
        if alg in _HMAC:
            expected = hmac.new(key, signing_input, _HMAC[alg]).digest()
            if not hmac.compare_digest(expected, signature):
                raise AuthError("bad signature")
            return
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        digest = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[
            alg[2:]]
        try:
            if alg.startswith("RS"):
                key.verify(signature, signing_input, padding.PKCS1v15(), digest)
            else:
                size = _EC_CURVES[alg][1]
                if len(signature) != 2 * size:
                    raise AuthError("bad signature")
                der = utils.encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                                 int.from_bytes(signature[size:], "big"))
                key.verify(der, signing_input, ec.ECDSA(digest))
        except InvalidSignature:
            raise AuthError("bad signature") from None

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool)):
                raise AuthError(f"'{name}' must be a number")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if exp is not None and now > exp + self.leeway:
            raise AuthError("token expired")
        if nbf is not None and now + self.leeway < nbf:
            raise AuthError("token not valid yet")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise AuthError("wrong issuer")
        if self.audience is not None:
            aud = claims.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if self.audience not in auds:
                raise AuthError("wrong audience")


# --- where tokens come from ----------------------------------------------------------------


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def token_from_scope(scope: Mapping[str, Any], *, query_param: str = "token") -> str | None:
    """The token of a websocket handshake: ``?token=``, ``Authorization: Bearer``,
    or a ``token.<token>`` subprotocol, in that order; None if there is none."""
    raw = scope.get("query_string", b"")
    if raw:
        values = parse_qs(bytes(raw).decode("latin-1")).get(query_param)
        if values and values[-1]:
            return values[-1]
    auth = _header(scope, b"authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for proto in scope.get("subprotocols", ()) or ():
        if isinstance(proto, str) and proto.startswith(TOKEN_PREFIX) and len(proto) > 6:
            return proto[len(TOKEN_PREFIX):]
    return None


def select_subprotocol(scope: Mapping[str, Any]) -> str | None:
    """The subprotocol to answer with: ``tidings`` if offered, else the offered
    ``token.*`` one (a browser fails a handshake that offered subprotocols and
    got none back), else None."""
    offered = [p for p in scope.get("subprotocols", ()) or () if isinstance(p, str)]
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    for proto in offered:
        if proto.startswith(TOKEN_PREFIX):
            return proto
    return None


# --- FastAPI / Starlette dependencies ----------------------------------------------------------


def _policy_violation(reason: str) -> Exception:
    from starlette.exceptions import WebSocketException

    return WebSocketException(code=1008, reason=reason)


class WebSocketTokenBearer:
    """A dependency for websocket endpoints, like FastAPI's ``OAuth2PasswordBearer``::

        bearer = WebSocketTokenBearer()

        @app.websocket("/live")
        async def live(ws: WebSocket, token: str = Depends(bearer)): ...

    It returns the handshake's token (see :func:`token_from_scope`). Without
    one it refuses the handshake (HTTP 403; close 1008 once accepted), or
    returns None with ``auto_error=False``. Accept with
    ``ws.accept(subprotocol=select_subprotocol(ws.scope))`` when browsers send
    the token as a subprotocol.
    """

    def __init__(self, *, auto_error: bool = True, query_param: str = "token") -> None:
        self.auto_error = auto_error
        self.query_param = query_param

    async def __call__(self, websocket: WebSocket) -> str | None:
        token = token_from_scope(websocket.scope, query_param=self.query_param)
        if token is None and self.auto_error:
            raise _policy_violation("not authenticated")
        return token


class RequireIdentity:
    """A dependency that authenticates the handshake's token with ``authenticator``
    and returns the :class:`Identity` (refusing with 403/1008 otherwise)."""

    def __init__(self, authenticator: Authenticator, *, query_param: str = "token") -> None:
        self.authenticator = authenticator
        self.bearer = WebSocketTokenBearer(query_param=query_param)

    async def __call__(self, websocket: WebSocket) -> Identity:
        token = await self.bearer(websocket)
        if token is None:  # unreachable: the bearer raises first
            raise _policy_violation("not authenticated")
        try:
            return await self.authenticator.authenticate(token)
        except AuthError as exc:
            raise _policy_violation(exc.reason) from None


def _rebuild_jwt_auth(secret: str | bytes | None, algorithm: str,
                      public_key: str | bytes | None,
                      jwks: str | Path | Mapping[str, Any] | None, leeway: float,
                      audience: str | None, issuer: str | None) -> JWTAuth:
    """Unpickle a :class:`JWTAuth` by building it again from its sources."""
    return JWTAuth(secret, algorithm=algorithm, public_key=public_key, jwks=jwks,
                   leeway=leeway, audience=audience, issuer=issuer)
