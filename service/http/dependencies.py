"""What routes receive: the app's settings, engines and routing, each failing with the right status.

Async on purpose: FastAPI runs plain ``def`` dependencies in a thread pool, a hop per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.clip.selection import Routing
from service.engine import EngineRegistry, ModelEngine
from service.http.errors import ApiError
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> EngineRegistry:
    """The app's engines; 503 while models are still loading."""
    registry: EngineRegistry | None = request.app.state.registry
    if registry is None:
        raise ApiError(503, "models are still loading")
    return registry


Registry = Annotated[EngineRegistry, Depends(get_registry)]
AppSettings = Annotated[Settings, Depends(get_settings)]


async def get_engine(name: str, registry: Registry) -> ModelEngine:
    """The engine serving ``name`` (looked up in the registry only; 404 naming the served models)."""
    return registry.get(name)


Engine = Annotated[ModelEngine, Depends(get_engine)]


async def ready_engine(engine: Engine) -> ModelEngine:
    """The engine, or 503 when it is not running (starting up or shutting down)."""
    if not engine.ready:
        raise ApiError(503, f"model {engine.name!r} is not ready")
    return engine


ReadyEngine = Annotated[ModelEngine, Depends(ready_engine)]


async def get_routing(request: Request) -> Routing:
    """The app's routing: 404 when none is configured, 503 while it loads."""
    if request.app.state.settings.routing is None:
        raise ApiError(404, "expert routing is not configured (add a 'routing' block to the configuration)")
    routing: Routing | None = getattr(request.app.state, "routing", None)
    if routing is None:
        raise ApiError(503, "expert routing is still loading")
    return routing


AppRouting = Annotated[Routing, Depends(get_routing)]
