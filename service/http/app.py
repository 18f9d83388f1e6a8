"""The FastAPI application: ``create_app(settings)`` wires settings, engines and metrics together.

Nothing is global: the settings, the engine registry and the metrics live on ``app.state`` and reach
routes through dependencies, so tests build as many independent apps as they like. Models load in
the lifespan unless a ready registry is passed in (the CLI loads first, so a bad model fails with a
message and exit status 2 instead of a traceback from inside uvicorn).

Run with ``tta-serve serve`` or ``uvicorn --factory service.http.app:app_from_env``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.composition import build_registry, configure_torch, routing_for_app
from service.engine import EngineRegistry
from service.http import routes_detect, routes_repository, routes_v1, routes_v2, routes_ws
from service.http.errors import BodyTooLarge, error_response, install_error_handlers
from service.http.image_requests import PredictJSON
from service.http.infer_fast_path import InferFastPath
from service.http.request_id import RequestIdMiddleware
from service.http.request_metrics import RequestMetricsMiddleware
from service.metrics import ServiceMetrics
from service.repository import ModelRepository
from service.settings import Settings, load_settings
from service.worker_metrics import WORKER_SCOPE, WorkerMetrics

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("tta-serve")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: a declared Content-Length is refused before anything is read,
    and chunked uploads are counted as they arrive, so no oversized body is ever buffered.

    The error is raised from ``receive`` as an HTTP exception, so the route's error handler formats it
    (and metrics see the route); a response is sent here only if nothing else did.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            if too_large:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(413, str(exc.detail))(scope, receive, send)


def create_app(
    settings: Settings, registry: EngineRegistry | None = None, metrics: ServiceMetrics | None = None
) -> FastAPI:
    """The app serving ``registry`` (or the models in ``settings``, loaded at start-up).

    A registry passed in should have been built with ``metrics`` as its observer for batch metrics.
    """
    metrics = metrics or ServiceMetrics()
    access = settings.admin_access()
    if access == "refused":
        log.warning("admin routes refused (403): listening on %s without TTA_ADMIN_TOKEN; set one to enable them",
                    settings.host)
    elif access == "open" and settings.allow_unauthenticated_admin:
        log.warning("admin routes (reset, snapshots, feedback) are open to anyone who reaches %s:%s "
                    "(allow_unauthenticated_admin); set TTA_ADMIN_TOKEN instead", settings.host, settings.port)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.registry is None:
            app.state.registry = await asyncio.to_thread(build_registry, settings, metrics)
        else:
            configure_torch(settings)
        active: EngineRegistry = app.state.registry
        if app.state.routing is None:  # CLIP, detectors and route tables (None when not configured)
            app.state.routing = await asyncio.to_thread(routing_for_app, settings, active, metrics)
        await active.start()
        if active.factory is not None:
            app.state.repository = ModelRepository(active, settings.resolved_models())
        log.info("serving models %s", active.names())
        grpc_server = None
        if settings.grpc_port is not None:
            try:
                from service.grpc_server import serve_grpc
            except ImportError as exc:
                raise RuntimeError(f"grpc_port is set but the gRPC server cannot load ({exc}): "
                                   "pip install 'tta-serve[grpc]'") from None
            grpc_server = await serve_grpc(active, settings, _version())
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2)
            await active.stop()

    app = FastAPI(
        title="tta-serve",
        version=_version(),
        description="Vision models that adapt online, without labels (EATA, EATA-C, Tent). "
        "Open Inference Protocol v2 under /v2, convenience and admin routes under /v1, Prometheus at /metrics.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.routing = None
    app.state.repository = None
    app.state.worker_metrics = None  # set in worker processes (service/workers.py)
    install_error_handlers(app)
    app.include_router(routes_v2.router)
    app.include_router(routes_detect.router)  # before v1: routed ensembles share its predict path
    app.include_router(routes_v1.router)
    app.include_router(routes_ws.router)
    app.include_router(routes_repository.router)

    @app.get("/metrics", summary="Prometheus metrics", tags=["operations"], response_class=PlainTextResponse)
    async def prometheus_metrics(request: Request, scope: Literal["all", "worker"] = "all") -> Response:
        """With several worker processes (``--workers``), every worker's series with a ``worker`` label;
        ``scope=worker``: only the answering worker's (service/worker_metrics.py)."""
        m: ServiceMetrics = request.app.state.metrics
        own = m.render()
        workers: WorkerMetrics | None = request.app.state.worker_metrics
        if workers is not None and scope != WORKER_SCOPE:
            own = await workers.render(own)
        return Response(own, media_type=m.content_type)

    # Added last = outermost: metrics also count the 413s the body limit produces, and the infer fast path
    # hands every request it does not answer itself to the full stack below it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(InferFastPath, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: the fast path's requests get their id too
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what is wrong"}},
    "required": ["error"],
}
_ERROR_RESPONSES = {
    "4XX": "the request is refused; the message names the problem (docs/api.md lists the statuses)",
    "5XX": "models still loading or not ready (503), shared state store down (503), or an internal error (500)",
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the request bodies the v1/v2 routes parse themselves, and the error
    answers every operation can give: all ``{"error": ...}`` (FastAPI documents only its own 422 shape)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(routes_v2.openapi_schemas())
        components["PredictJSON"] = PredictJSON.model_json_schema()
        components["Error"] = _ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {"description": "a field of the request is invalid", "content": error}
                for status, description in _ERROR_RESPONSES.items():
                    responses.setdefault(status, {"description": description, "content": error})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.http.app:app_from_env``: settings from ``TTA_*`` and the config file."""
    return create_app(load_settings())
