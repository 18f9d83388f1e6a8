"""Every HTTP request gets an id: the client's ``X-Request-Id`` when it sends a usable one, else a new
one. It is returned in the response's ``X-Request-Id`` header and set in :data:`service.logs.REQUEST_ID`
for the logs of that request."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import REQUEST_ID

HEADER = b"x-request-id"
_USABLE = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


class RequestIdMiddleware:
    """Pure ASGI middleware (outermost): reads or makes the id, sets it for logs, returns it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        request_id = given.decode() if _USABLE.fullmatch(given) else os.urandom(16).hex()
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
