"""A lean path for ``POST /v2/models/{name}[/versions/1]/infer``: the request a busy server mostly serves.

Why: on 2 cores, FastAPI's routing, request object and dependency resolution took about half of the
event loop's time per one-image request, and that time is not only lost throughput: the event loop
shares the GIL with the model's thread, and an eager adaptation step slowed by a quarter or more next to
a busy loop (docs/benchmarks.md). This middleware parses and answers such a request itself, with the
same functions the route uses (:func:`service.routes_v2.run_inference`).

It only *succeeds* on its own. Everything else is handed to the full application, which answers exactly
as it would without this path: no or oversized Content-Length, a Content-Encoding, an unknown, unready
or still-loading model, a wrong version, and every bad request (the body is replayed to the app; bad
requests are refused before they reach the model, so nothing runs twice).
"""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import EngineRegistry
from service.errors import InvalidInput, UnknownModel
from service.http.errors import ApiError, internal_error_response
from service.http.routes_v2 import HEADER_LENGTH, run_inference
from service.metrics import ServiceMetrics
from service.v2_protocol import VERSION

_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")  # the routes' templates
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


class InferFastPath:
    """ASGI middleware serving well-formed v2 infer requests without the framework's per-request layers."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope["app"].state
        registry: EngineRegistry | None = state.registry
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        name, version = match.groups()
        if (registry is None or b"content-encoding" in headers or not declared.isdigit()
                or int(declared) > state.settings.max_body_bytes or version not in (None, VERSION)):
            await self.app(scope, receive, send)
            return
        try:
            engine = registry.get(name)
        except UnknownModel:
            engine = None
        if engine is None or not engine.ready:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        raw_length = headers.get(_HEADER_LENGTH)
        header_length = None if raw_length is None else raw_length.decode("latin-1")  # HTTP's header charset
        try:
            response = await run_inference(engine, body, header_length, state.settings)
        except (ApiError, InvalidInput):  # a bad request, refused before the model saw it
            await self.app(scope, _replay(body), send)
            return
        except Exception as exc:
            if not engine.ready:  # stopped meanwhile (nothing ran): the app answers 503
                await self.app(scope, _replay(body), send)
                return
            response = internal_error_response("POST", scope["path"], exc)  # the model's batch failed
        await response(scope, receive, send)
        self.metrics.observe_request(_ROUTES[version is not None], "POST", response.status_code,
                                     time.perf_counter() - started)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the app the already-read body, then reports a disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
