"""HTTP API (SPEC 5), in Centrifugo's request/response shapes so ``cent`` works.

``POST /api/<method>`` with a JSON object; ``{"result": ...}`` or
``{"error": {"code": N, "message": ...}}``. Malformed requests get HTTP 400,
unknown methods 404, a wrong API key 401; never a 5xx for bad input.

Keys (compared in constant time): ``hub.api_key`` is the admin key (every
method); ``hub.api_key_publish`` only allows ``publish`` and ``broadcast``
(also inside ``batch``); other methods answer 403 with code 103. With only a
publish key configured, the admin methods are refused to everyone.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tidings.core.operations import classify
from tidings.endpoints.schema import type_name
from tidings.exceptions import BrokerUnavailable, NotAvailable
from tidings.protocol.errors import ProtocolError
from tidings.protocol.names import validate_channel
from tidings.protocol.native import StreamPos, loads

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = ["ApiError", "Endpoint", "api_endpoint", "health_endpoint"]

# Centrifugo's API error codes
INTERNAL, UNAUTHORIZED, UNKNOWN_CHANNEL, PERMISSION_DENIED = 100, 101, 102, 103
METHOD_NOT_FOUND, BAD_REQUEST, NOT_AVAILABLE, UNRECOVERABLE = 104, 107, 108, 112

Endpoint = Callable[[Request], Awaitable[Response]]
PUBLISH_METHODS = frozenset({"publish", "broadcast"})


class ApiError(Exception):
    def __init__(self, code: int, message: str, status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def _bad(message: str) -> ApiError:
    return ApiError(BAD_REQUEST, message, 400)


def _str(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"'{name}' must be a non-empty string")
    return value


def _data(params: dict[str, Any]) -> Any:
    if "b64data" in params:
        try:
            return base64.b64decode(_str(params, "b64data"), validate=True)
        except (binascii.Error, ValueError):
            raise _bad("'b64data' is not valid base64") from None
    if "data" not in params:
        raise _bad("missing field 'data'")
    return params["data"]


async def _publish(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    pub = await hub.publish(_str(params, "channel"), _data(params))
    return {"offset": pub.offset, "epoch": pub.epoch}


async def _broadcast(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    channels = params.get("channels")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise _bad("'channels' must be a list of strings")
    data = _data(params)
    responses: list[dict[str, Any]] = []
    for channel in channels:
        try:
            pub = await hub.publish(channel, data)
        except ProtocolError as exc:
            responses.append({"error": {"code": BAD_REQUEST, "message": exc.message}})
        else:
            responses.append({"result": {"offset": pub.offset, "epoch": pub.epoch}})
    return {"responses": responses}


async def _subscribe(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    await hub.subscribe_user(_str(params, "user"), _str(params, "channel"))
    return {}


async def _unsubscribe(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    await hub.unsubscribe_user(_str(params, "user"), _str(params, "channel"))
    return {}


async def _disconnect(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    await hub.disconnect(_str(params, "user"))
    return {}


async def _presence(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    members = await hub.presence(_str(params, "channel"))
    return {"presence": {
        m.conn_id: {"client": m.conn_id, "user": m.user or "", "conn_info": m.info}
        for m in members
    }}


async def _presence_stats(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    return await hub.presence_stats(_str(params, "channel"))


def _since(params: dict[str, Any]) -> StreamPos | None:
    since = params.get("since")
    if since is None:
        return None
    if not isinstance(since, dict):
        raise _bad("'since' must be {offset, epoch}")
    offset, epoch = since.get("offset", 0), since.get("epoch", "")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _bad("'since.offset' must be an integer >= 0")
    if not isinstance(epoch, str):
        raise _bad("'since.epoch' must be a string")
    return StreamPos(offset, epoch)


async def _history(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    # Centrifugo semantics: no limit (or 0) -> only the stream position; -1 -> all.
    limit = params.get("limit", 0)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < -1:
        raise _bad("'limit' must be an integer >= -1")
    since = _since(params)
    reverse = params.get("reverse", False)
    if not isinstance(reverse, bool):
        raise _bad("'reverse' must be a boolean")
    page = await hub.history(
        _str(params, "channel"), since=since, limit=None if limit == -1 else limit,
        reverse=reverse,
    )
    if since is not None and not page.recovered:
        raise ApiError(UNRECOVERABLE, "unrecoverable position")
    return {
        "publications": [{"data": p.to_dict()["data"], "offset": p.offset}
                         for p in page.publications],
        "offset": page.offset,
        "epoch": page.epoch,
    }


async def _history_remove(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    await hub.remove_history(_str(params, "channel"))
    return {}


async def _channels(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    pattern = params.get("pattern") or None
    if pattern is not None and not isinstance(pattern, str):
        raise _bad("'pattern' must be a string")
    return {"channels": {name: {"num_clients": n} for name, n in hub.channels(pattern).items()}}


async def _info(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": [hub.info()]}


def _limit(params: dict[str, Any], default: int) -> int:
    limit = params.get("limit", default)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise _bad("'limit' must be a non-negative integer")
    return limit


async def _connections(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    """This node's connections (a user's only, with ``user``), at most ``limit``
    (1000) of them, and how many there are in all."""
    user = params.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string")
    limit = _limit(params, 1000)
    conns = (hub.users.get(user, set()) if user is not None else hub.connections.values())
    listed = [{"conn_id": c.conn_id, "user": c.user, "protocol": c.kind.value,
               "address": c.ip, "num_subs": len(c.subs),
               "subscriptions": sorted(c.subs)[:100]}
              for _, c in zip(range(limit), conns, strict=False)]
    return {"node": hub.node, "total": len(conns), "connections": listed}


async def _queues(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    """The stats of every queue this node has used (pushed, pulled or asked about)."""
    await hub.queues.refresh()  # shared stores: their numbers, fetched together (bounded)
    return {"queues": {name: queue.stats() for name, queue in list(hub.queues.queues.items())}}


async def _channel_types(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    """The typed channels: pattern, type name and JSON Schema (the ``$defs`` of
    each kept with it), in the order they match."""
    declared = hub.channel_types.json_schemas("#/$defs/{model}")
    return {"channel_types": [{"pattern": pattern, "name": type_name(type_, index),
                               "schema": schema}
                              for index, (pattern, type_, schema) in enumerate(declared, 1)]}


async def _validate(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    """Check ``data`` for ``channel`` as a publish would, publishing nothing:
    ``{"valid": true, "data": what would go out}`` or error 107 with the locations."""
    channel = _str(params, "channel")
    validate_channel(channel, hub.limits.max_name)
    data, _ = hub.channel_types.check(channel, _data(params), None)
    return {"valid": True, "data": data}


async def _queue_stats(hub: HubCore, params: dict[str, Any]) -> dict[str, Any]:
    queue = hub.queue(_str(params, "queue"))
    await queue.refresh()  # a shared queue: the store's numbers, across every node
    return queue.stats()


Method = Callable[["HubCore", dict[str, Any]], Awaitable[dict[str, Any]]]

METHODS: dict[str, Method] = {
    "publish": _publish,
    "broadcast": _broadcast,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "disconnect": _disconnect,
    "presence": _presence,
    "presence_stats": _presence_stats,
    "history": _history,
    "history_remove": _history_remove,
    "channels": _channels,
    "info": _info,
    "queue_stats": _queue_stats,
    "queues": _queues,
    "connections": _connections,
    "channel_types": _channel_types,
    "validate": _validate,
}


async def _call(hub: HubCore, method: str, params: Any, role: str = "admin") -> dict[str, Any]:
    handler = METHODS.get(method)
    if handler is None:
        raise ApiError(METHOD_NOT_FOUND, f"method {method[:64]!r} not found", 404)
    if role != "admin" and method not in PUBLISH_METHODS:
        hub.stats.refusals["api_permission"] += 1
        raise ApiError(PERMISSION_DENIED, f"this key may not call {method!r}", 403)
    if not isinstance(params, dict):
        raise _bad("the request body must be a JSON object")
    try:
        return await handler(hub, params)
    except ProtocolError as exc:
        raise _bad(exc.message) from None
    except NotAvailable as exc:
        raise ApiError(NOT_AVAILABLE, str(exc)) from None
    except BrokerUnavailable as exc:  # expected during an outage: no traceback
        raise ApiError(INTERNAL, classify(hub, None, method, exc)[1], 503) from None


async def _batch(hub: HubCore, params: Any, role: str) -> dict[str, Any]:
    commands = params.get("commands") if isinstance(params, dict) else None
    if not isinstance(commands, list):
        raise _bad("'commands' must be a list")
    replies: list[dict[str, Any]] = []
    for command in commands:
        if not isinstance(command, dict) or len(command) != 1:
            replies.append({"error": {"code": BAD_REQUEST, "message": "bad command"}})
            continue
        ((method, sub_params),) = command.items()
        try:
            replies.append({method: await _call(hub, method, sub_params, role)})
        except ApiError as exc:
            replies.append({"error": {"code": exc.code, "message": exc.message}})
    return {"replies": replies}


def _role(hub: HubCore, request: Request) -> str | None:
    """``admin``, ``publish`` or None (refused), from the request's API key."""
    admin, publish = hub.api_key, hub.api_key_publish
    if not admin and not publish:
        return "admin"
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip() if scheme.lower() == "apikey" else ""
    raw = given.encode()
    # both comparisons always run: the time taken says nothing about which key matched
    is_admin = hmac.compare_digest(raw, (admin or "\x00").encode()) and bool(admin)
    is_publish = hmac.compare_digest(raw, (publish or "\x00").encode()) and bool(publish)
    return "admin" if is_admin else "publish" if is_publish else None


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}},
                        status_code=exc.status)


def api_endpoint(hub: HubCore) -> Endpoint:
    async def api(request: Request) -> Response:
        role = _role(hub, request)
        if role is None:
            hub.stats.refusals["api_key"] += 1
            return _error(ApiError(UNAUTHORIZED, "unauthorized", 401))
        method = request.path_params["method"]
        try:
            body = await request.body()
            try:
                params = loads(body) if body else {}
            except ProtocolError:
                raise _bad("the request body is not valid JSON") from None
            if not hub.running:
                raise ApiError(NOT_AVAILABLE, "server not running", 503)
            if method == "batch":
                return JSONResponse(await _batch(hub, params, role))
            return JSONResponse({"result": await _call(hub, method, params, role)})
        except ApiError as exc:
            return _error(exc)
        except Exception as exc:
            return _error(ApiError(INTERNAL, classify(hub, None, f"API {method[:64]}", exc)[1]))

    return api


def health_endpoint(hub: HubCore) -> Endpoint:
    async def health(request: Request) -> Response:
        state = hub.health()
        if state.up and hub.running:
            return JSONResponse({"status": "ok", "broker": "up", "node": hub.node})
        return JSONResponse(
            {"status": "unavailable", "broker": "down", "node": hub.node,
             "reason": state.reason or "not running"},
            status_code=503,
        )

    return health
