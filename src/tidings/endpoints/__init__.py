"""ASGI endpoints: one file per protocol over the shared session core.

``session`` (admission, registration, the receive loop), ``native`` (``/ws``),
``streams`` (``/ws/pub|sub|push|pull``), ``centrifuge``
(``/connection/websocket``), ``http_api`` (``/api``, ``/health``), ``metrics``,
``gate`` (origin, token, limits), ``proxy`` (the websocket gateway) and
``router`` (all of them as one router).
"""
