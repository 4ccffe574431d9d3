"""A chat: rooms, auth, direct messages, a gateway and exception handlers.

    uvicorn examples.chat:app                                   # one process
    TIDINGS_BROKER=redis://127.0.0.1:6379 uvicorn examples.chat:app --workers 4

The fastapi-distributed-websocket feature list, on tidings' own protocol:

- ``POST /login {"user", "password"}`` -> a JWT; the websocket takes it as
  ``/rt/ws?token=...`` (or ``Authorization: Bearer``); a bad one gets HTTP 403.
- Rooms are channels ``chat/<room>``: ``{"type": "subscribe", "channel":
  "chat/lobby", "join_leave": true}`` brings join/leave frames, ``{"type":
  "presence", ...}`` who is in, ``{"type": "history", ...}`` the last
  messages, ``{"type": "publish", ..., "data": {"text": "hi"}}`` a message
  (validated: see ``Message``).
- Direct messages: ``{"type": "send", "to": "<conn_id from presence>"}`` on
  the socket, or ``POST /dm/<user>`` for every tab of that user.
- ``/gateway`` is an API gateway's route: it checks the token at the edge and
  forwards the socket to the chat service (``CHAT_UPSTREAM``, else this app).
- A permission hook raises the chat's own exceptions; ``@hub.on_error`` turns
  them into error frames the client can show, and the socket stays open.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Annotated, NoReturn

from fastapi import Depends, FastAPI, HTTPException, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from tidings import (
    AuthError,
    Connection,
    ErrorCode,
    ErrorContext,
    Hub,
    JWTAuth,
    ProtocolError,
    RequireIdentity,
    Rule,
    WebSocketProxy,
    encode_jwt,
    token_from_scope,
)

SECRET = os.environ.get("CHAT_SECRET", "dev only: set CHAT_SECRET")  # same on every worker
USERS = {"alice": "wonderland", "bob": "builder", "carol": "caroling"}  # your user store
# room -> who may post there (None: everyone); rooms not listed do not exist
ROOMS: dict[str, set[str] | None] = {"lobby": None, "random": None, "news": {"carol"}}


class Message(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


class ChatError(Exception):
    """What the chat refuses, in its own words (see ``chat_error``)."""

    code = ErrorCode.FORBIDDEN


class NoSuchRoom(ChatError):
    code = ErrorCode.NOT_FOUND


def can_join(conn: Connection, channel: str) -> None:
    kind, _, room = channel.partition("/")
    if kind == "chat" and room not in ROOMS:
        raise NoSuchRoom(f"there is no room {room!r}")
    # None: no opinion, the rules and the token decide


def can_post(conn: Connection, channel: str) -> None:
    can_join(conn, channel)
    posters = ROOMS.get(channel.removeprefix("chat/"))
    if posters is not None and conn.user not in posters:
        raise ChatError(f"only {', '.join(sorted(posters))} may post in {channel!r}")


auth = JWTAuth(SECRET)
hub = Hub(broker=os.environ.get("TIDINGS_BROKER", "memory://"), auth=auth,
          can_subscribe=can_join, can_presence=can_join, can_publish=can_post,
          rules=[Rule("chat/+", publish=["authenticated"])])  # reading is open to users
hub.channel("chat/+", Message)


@hub.on_error(ChatError)
def chat_error(exc: ChatError, ctx: ErrorContext) -> NoReturn:
    # without this, an exception in a hook is logged and answered "internal"
    raise ProtocolError(exc.code, str(exc))


app = FastAPI(lifespan=hub.lifespan)
app.include_router(hub.router, prefix="/rt")  # /rt/ws, /rt/api, /rt/health, ...


class Login(BaseModel):
    user: str
    password: str


@app.post("/login")
async def login(form: Login) -> dict[str, str]:
    known = USERS.get(form.user)
    if known is None or not secrets.compare_digest(known, form.password):
        raise HTTPException(401, "wrong user or password")
    return {"token": encode_jwt({"sub": form.user, "exp": int(time.time()) + 3600}, SECRET)}


@app.post("/dm/{to}")
async def direct(to: str, message: Message,
                 bearer: Annotated[HTTPAuthorizationCredentials, Depends(HTTPBearer())]) -> None:
    try:
        sender = (await auth.authenticate(bearer.credentials)).user or ""
    except AuthError as exc:
        raise HTTPException(401, exc.reason) from None
    # every connection of `to`, on every worker; "from" is the sender's name
    await hub.send_user(to, message.model_dump(), sender=sender)


@app.websocket("/gateway", dependencies=[Depends(RequireIdentity(auth))])
async def gateway(ws: WebSocket) -> None:
    host, port = ws.scope["server"]  # default: the chat service is this very app
    upstream = os.environ.get("CHAT_UPSTREAM", f"ws://{host}:{port}/rt/ws")
    token = token_from_scope(ws.scope)  # verified by RequireIdentity, passed on
    await WebSocketProxy(ws, upstream, headers={"Authorization": f"Bearer {token}"})()
