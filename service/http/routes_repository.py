"""Triton's model repository API: index, load (from the configuration or a posted config), unload.

Load and unload change what every client gets, so they are admin routes (the bearer token). A load
runs off the event loop: the other models keep answering while one loads or reloads.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError

from service.errors import ModelLoadError
from service.http.auth import require_admin
from service.http.errors import ApiError
from service.repository import ModelRepository
from service.settings import ModelConfig, format_validation_error
from service.v2_protocol import VERSION

router = APIRouter(prefix="/v2/repository", tags=["v2: model repository"])


async def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository | None = getattr(request.app.state, "repository", None)
    if repository is None:
        raise ApiError(503, "models are still loading")
    return repository


Repository = Annotated[ModelRepository, Depends(get_repository)]


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="list only the models that are ready")


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str = Field(description="why a model is unavailable (not loaded, unloaded, load failed: ...)")


class LoadRequest(BaseModel):
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="config: a model config (an object, or its JSON text as Triton sends it) to load instead "
        "of the configured one; snapshot: restore this snapshot after loading",
    )


class UnloadRequest(BaseModel):
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="snapshot: keep the adapted state under this name before unloading"
    )


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw) if raw.strip() else model()
    except ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc.errors()[0]['msg']}") from None


def _snapshot_name(parameters: dict[str, Any]) -> str | None:
    name = parameters.get("snapshot")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"parameters.snapshot must be a snapshot name, got {name!r}")
    return name


@router.post("/index", response_model=list[IndexEntry], summary="Models of the repository and their state")
async def index(request: Request, repository: Repository) -> list[IndexEntry]:
    body: IndexRequest = await _body(request, IndexRequest)
    return [IndexEntry(name=s.name, version=VERSION, state=s.state, reason=s.reason)
            for s in repository.index(ready_only=body.ready)]


@router.post("/models/{name}/load", dependencies=[Depends(require_admin)],
             summary="Load or reload a model (the configured one, or a posted config)")
async def load(name: str, request: Request, repository: Repository) -> dict[str, Any]:
    body: LoadRequest = await _body(request, LoadRequest)
    config = None
    if "config" in body.parameters:
        raw = body.parameters["config"]
        try:
            config = ModelConfig.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"parameters.config is not JSON: {exc}") from None
        except ValidationError as exc:
            message = format_validation_error(exc).replace("invalid configuration", "invalid model config")
            raise ApiError(400, message) from None
    try:
        await repository.load(name, config, _snapshot_name(body.parameters))
    except ModelLoadError as exc:
        raise ApiError(400, str(exc)) from None
    return {"model": name, "state": "READY"}


@router.post("/models/{name}/unload", dependencies=[Depends(require_admin)],
             summary="Unload a model, optionally keeping its adapted state as a snapshot")
async def unload(name: str, request: Request, repository: Repository) -> dict[str, Any]:
    body: UnloadRequest = await _body(request, UnloadRequest)
    saved = await repository.unload(name, _snapshot_name(body.parameters))
    return {"model": name, "state": "UNAVAILABLE", "snapshot": None if saved is None else saved.name}
