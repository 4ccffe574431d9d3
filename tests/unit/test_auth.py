"""JWT verification (tidings.security.auth): algorithms, pinning, claims, key sources."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tidings.exceptions import AuthError
from tidings.security.auth import (
    Grants,
    Identity,
    JWTAuth,
    RequireIdentity,
    WebSocketTokenBearer,
    encode_jwt,
    select_subprotocol,
    token_from_scope,
)

SECRET = "s3cret-s3cret-s3cret"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()),
                     b64(signature)))


def pem(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def refused(auth: JWTAuth, token: str) -> str:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    assert "eyJ" not in info.value.reason  # reasons never echo the token
    return info.value.reason


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_round_trip(alg: str) -> None:
    auth = JWTAuth(SECRET, algorithm=alg)
    claims = auth.verify(encode_jwt({"sub": "alice", "exp": time.time() + 60}, SECRET, alg))
    assert claims["sub"] == "alice"


def test_identity_from_claims() -> None:
    auth = JWTAuth(SECRET)
    ident = auth.identity({"sub": "bob", "channels": ["public/#"], "admin": True, "exp": 5,
                           "info": {"name": "Bob"}})
    assert ident == Identity("bob", Grants(("public/#",), ("public/#",)), {"name": "Bob"},
                             True, 5.0)
    split = auth.identity({"sub": "bob", "channels": {"subscribe": ["a/#"], "publish": []}})
    assert split.channels == Grants(("a/#",), ())
    with pytest.raises(AuthError):
        auth.identity({"sub": "bob", "channels": ["a/#/b"]})
    with pytest.raises(AuthError):
        auth.identity({"sub": "bob", "channels": "a/#"})
    with pytest.raises(AuthError):
        auth.identity({"channels": []})
    assert auth.identity({"sub": "x", "admin": "yes"}).admin is False  # only a real true


def test_expired_and_not_yet_valid_with_leeway() -> None:
    auth = JWTAuth(SECRET, leeway=5)
    now = time.time()
    assert auth.verify(encode_jwt({"sub": "a", "exp": now - 3}, SECRET))  # within leeway
    assert refused(auth, encode_jwt({"sub": "a", "exp": now - 10}, SECRET)) == "token expired"
    assert refused(auth, encode_jwt({"sub": "a", "nbf": now + 60}, SECRET)) == \
        "token not valid yet"
    assert "number" in refused(auth, encode_jwt({"sub": "a", "exp": "soon"}, SECRET))
    assert "number" in refused(auth, encode_jwt({"sub": "a", "exp": True}, SECRET))


def test_wrong_signature_and_tampering() -> None:
    auth = JWTAuth(SECRET)
    assert refused(auth, encode_jwt({"sub": "a"}, "other-secret")) == "bad signature"
    token = encode_jwt({"sub": "alice"}, SECRET)
    head, _, sig = token.split(".")
    evil = b64(json.dumps({"sub": "admin"}).encode())
    assert refused(auth, f"{head}.{evil}.{sig}") == "bad signature"


def test_alg_none_is_never_accepted() -> None:
    auth = JWTAuth(SECRET)
    for alg in ("none", "None", "NONE"):
        assert "unsigned" in refused(auth, forge({"alg": alg}, {"sub": "a"}))
    with pytest.raises(ValueError, match="never 'none'"):
        JWTAuth(SECRET, algorithm="none")


def test_algorithm_is_pinned(rsa_key: rsa.RSAPrivateKey) -> None:
    hs = JWTAuth(SECRET)
    assert "configured" in refused(hs, encode_jwt({"sub": "a"}, rsa_key, "RS256"))
    assert "configured" in refused(hs, encode_jwt({"sub": "a"}, SECRET, "HS512"))
    # the classic confusion: an HS256 token whose "secret" is the RSA public key
    rs = JWTAuth(public_key=pem(rsa_key), algorithm="RS256")
    assert "configured" in refused(rs, encode_jwt({"sub": "a"}, pem(rsa_key), "HS256"))
    with pytest.raises(ValueError, match="not a public key"):
        JWTAuth(public_key=pem(rsa_key), algorithm="HS256")
    with pytest.raises(ValueError, match="not a secret"):
        JWTAuth(SECRET, algorithm="RS256")


def test_malformed_tokens() -> None:
    auth = JWTAuth(SECRET)
    for token in ("", "a", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.", forge({"alg": "HS256"}, [1]),
                  "x" * 20_000, b64(b"[]") + ".e30.AA", b64(b"{") + ".e30.AA"):
        refused(auth, token)
    refused(auth, forge({"alg": "HS256", "crit": ["b64"]}, {"sub": "a"}))


def test_rs256_and_es256_with_public_keys(rsa_key: rsa.RSAPrivateKey,
                                          ec_key: ec.EllipticCurvePrivateKey) -> None:
    rs = JWTAuth(public_key=pem(rsa_key), algorithm="RS256")
    assert rs.verify(encode_jwt({"sub": "r"}, rsa_key, "RS256"))["sub"] == "r"
    es = JWTAuth(public_key=pem(ec_key).decode(), algorithm="ES256")
    assert es.verify(encode_jwt({"sub": "e"}, ec_key, "ES256"))["sub"] == "e"
    other = ec.generate_private_key(ec.SECP256R1())
    assert refused(es, encode_jwt({"sub": "e"}, other, "ES256")) == "bad signature"
    token = encode_jwt({"sub": "e"}, ec_key, "ES256")
    assert refused(es, token[:-4]) in ("bad signature", "malformed token")
    with pytest.raises(ValueError, match="EC public key"):
        JWTAuth(public_key=pem(rsa_key), algorithm="ES256")
    with pytest.raises(ValueError, match="RSA public key"):
        JWTAuth(public_key=pem(ec_key), algorithm="RS256")


def _jwk_rsa(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()

    def enc(n: int) -> str:
        return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "kid": kid, "alg": "RS256", "n": enc(numbers.n), "e": enc(numbers.e)}


def test_jwks_kid_lookup(tmp_path: Any, rsa_key: rsa.RSAPrivateKey,
                         ec_key: ec.EllipticCurvePrivateKey) -> None:
    second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = ec_key.public_key().public_numbers()
    doc = {"keys": [_jwk_rsa(rsa_key, "k1"), _jwk_rsa(second, "k2"),
                    {"kty": "EC", "crv": "P-256", "kid": "e1", "x": b64(nums.x.to_bytes(32, "big")),
                     "y": b64(nums.y.to_bytes(32, "big"))}]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(doc))
    auth = JWTAuth(jwks=str(path), algorithm="RS256")
    ok = encode_jwt({"sub": "a"}, second, "RS256", headers={"kid": "k2"})
    assert auth.verify(ok)["sub"] == "a"
    swapped = encode_jwt({"sub": "a"}, rsa_key, "RS256", headers={"kid": "k2"})
    assert refused(auth, swapped) == "bad signature"
    assert refused(auth, encode_jwt({"sub": "a"}, rsa_key, "RS256")) == "unknown key id"
    es = JWTAuth(jwks=doc, algorithm="ES256")
    assert es.verify(encode_jwt({"sub": "e"}, ec_key, "ES256", headers={"kid": "e1"}))
    hs = JWTAuth(jwks={"keys": [{"kty": "oct", "kid": "h", "k": b64(b"k" * 32)}]})
    assert hs.verify(encode_jwt({"sub": "h"}, b"k" * 32, headers={"kid": "h"}))
    with pytest.raises(ValueError, match="no usable"):
        JWTAuth(jwks={"keys": [_jwk_rsa(rsa_key, "k1")]}, algorithm="RS512")


def test_audience_and_issuer() -> None:
    auth = JWTAuth(SECRET, audience="rt", issuer="me")
    assert auth.verify(encode_jwt({"sub": "a", "aud": ["x", "rt"], "iss": "me"}, SECRET))
    assert refused(auth, encode_jwt({"sub": "a", "aud": "x", "iss": "me"}, SECRET)) == \
        "wrong audience"
    assert refused(auth, encode_jwt({"sub": "a", "aud": "rt"}, SECRET)) == "wrong issuer"


def test_repr_hides_the_secret() -> None:
    assert SECRET not in repr(JWTAuth(SECRET))


def scope(query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
          subprotocols: list[str] | None = None) -> dict[str, Any]:
    return {"type": "websocket", "query_string": query, "headers": headers or [],
            "subprotocols": subprotocols or []}


def test_token_sources() -> None:
    assert token_from_scope(scope(b"a=1&token=T1")) == "T1"
    assert token_from_scope(scope(headers=[(b"authorization", b"Bearer T2")])) == "T2"
    assert token_from_scope(scope(headers=[(b"authorization", b"Basic xx")])) is None
    assert token_from_scope(scope(subprotocols=["tidings", "token.T3"])) == "T3"
    assert token_from_scope(scope()) is None
    assert select_subprotocol(scope(subprotocols=["tidings", "token.T3"])) == "tidings"
    assert select_subprotocol(scope(subprotocols=["token.T3"])) == "token.T3"
    assert select_subprotocol(scope(subprotocols=["mqtt"])) is None


class FakeWS:
    def __init__(self, s: dict[str, Any]) -> None:
        self.scope = s


async def test_dependencies() -> None:
    from starlette.exceptions import WebSocketException

    bearer = WebSocketTokenBearer()
    assert await bearer(FakeWS(scope(b"token=abc"))) == "abc"
    with pytest.raises(WebSocketException) as info:
        await bearer(FakeWS(scope()))
    assert info.value.code == 1008
    assert await WebSocketTokenBearer(auto_error=False)(FakeWS(scope())) is None
    need = RequireIdentity(JWTAuth(SECRET))
    ident = await need(FakeWS(scope(b"token=" + encode_jwt({"sub": "z"}, SECRET).encode())))
    assert ident.user == "z"
    with pytest.raises(WebSocketException):
        await need(FakeWS(scope(b"token=bad")))


def test_jwt_auth_with_a_public_key_pickles_for_worker_processes() -> None:
    import pickle

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tidings.security.auth import JWTAuth as Auth

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    auth = Auth(public_key=pem, algorithm="ES256", leeway=3)
    copy = pickle.loads(pickle.dumps(auth))
    assert (copy.algorithm, copy.leeway) == ("ES256", 3.0)
    assert copy._keys.keys() == auth._keys.keys()
