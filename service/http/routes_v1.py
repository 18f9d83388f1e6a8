"""Convenience and admin routes under ``/v1``: predict from image files or base64, delayed-label
feedback, reset, adaptation state and snapshots.

Predict takes ``multipart/form-data`` (one or more files in the ``files`` field) or
``application/json`` (``{"images": [<base64>...]}``) on the same URL; the content type decides.
Admin routes (feedback, reset, snapshot save and restore) need the bearer token when one is set.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.engine import ModelEngine
from service.errors import InvalidInput
from service.http.auth import require_admin
from service.http.dependencies import AppSettings, Engine, ReadyEngine, Registry
from service.http.image_requests import PREDICT_BODY, read_images
from service.predictions import prediction_fields
from service.preprocess import images_to_tensor
from service.settings import MODEL_NAME_PATTERN
from service.snapshots import SnapshotInfo
from service.tracing import span

router = APIRouter(prefix="/v1", tags=["v1: convenience and admin"])
admin = [Depends(require_admin)]


# ------------------------------------------------------------------------------------ schemas
class ModelInfo(BaseModel):
    name: str
    method: str
    mode: str
    adapts: bool
    ready: bool
    classes: list[str]
    input_size: tuple[int, int]
    max_images_per_request: int


class ModelList(BaseModel):
    models: list[ModelInfo]


class TopK(BaseModel):
    label: int
    class_name: str
    probability: float


class PredictionOut(BaseModel):
    request_id: str = Field(description="quote it in /feedback to report the true label later")
    label: int
    class_name: str
    confidence: float
    entropy: float
    top_k: list[TopK]
    reliable: bool | None = Field(description="entropy below the method's threshold E0 (null: no threshold)")
    selected: bool | None = Field(description="used for the update (null: decided later, off the request path)")
    parameter_version: int = Field(description="version of the adapted weights that answered")
    divergence: float | None = Field(
        None, description="model uncertainty (EATA-C): KL from the full network's prediction to a sub-network's, "
        "nats; rises under distribution shift (null: the method has none, or the frozen model answered)",
    )


class PredictResponse(BaseModel):
    model: str
    predictions: list[PredictionOut]


class FeedbackRequest(BaseModel):
    labels: dict[str, int | str] = Field(
        min_length=1, description="request id -> true label (class index or class name)"
    )


class FeedbackResponse(BaseModel):
    model: str
    accepted: int
    feedback_window_samples: int = Field(description="labelled predictions in the rolling window")
    feedback_accuracy_ratio: float | None = Field(description="accuracy over the window, 0-1 (null: no label yet)")
    feedback_ece_ratio: float | None = Field(description="expected calibration error over the window, 0-1")


class ResetResponse(BaseModel):
    model: str
    reset: bool


class SnapshotRequest(BaseModel):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="letters, digits, '_', '.', '-'; at most 64")


class SnapshotOut(BaseModel):
    name: str
    created: float
    parameter_version: int
    steps: int


class SnapshotList(BaseModel):
    model: str
    snapshots: list[SnapshotOut]


class RestoreResponse(BaseModel):
    model: str
    restored: SnapshotOut


# ------------------------------------------------------------------------------------ models
def model_info(engine: ModelEngine) -> ModelInfo:
    cfg = engine.config
    return ModelInfo(
        name=engine.name, method=cfg.method, mode=cfg.mode, adapts=engine.adapts, ready=engine.ready,
        classes=engine.classes, input_size=cfg.input_size, max_images_per_request=cfg.max_images_per_request,
    )


@router.get("/models", response_model=ModelList, summary="The served models")
async def list_models(registry: Registry) -> ModelList:
    return ModelList(models=[model_info(e) for e in registry])


@router.get("/models/{name}", response_model=ModelInfo, summary="One served model")
async def get_model(engine: Engine) -> ModelInfo:
    return model_info(engine)


# ------------------------------------------------------------------------------------ predict
@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    summary="Predict image files (multipart 'files') or base64 images (JSON)",
    openapi_extra=PREDICT_BODY,
)
async def predict(
    request: Request, engine: ReadyEngine, settings: AppSettings
) -> PredictResponse:
    with span("predict", {"model": engine.name, "protocol": "v1"}):
        with span("decode"):
            blobs, names, top_k = await read_images(request, engine.config.max_images_per_request)
            images = await run_in_threadpool(
                images_to_tensor, blobs, engine.config.input_size, settings.max_image_pixels, names
            )
        predictions = await engine.predict(images)
        with span("encode"):
            out = [PredictionOut(**prediction_fields(p, engine.classes, top_k)) for p in predictions]
            return PredictResponse(model=engine.name, predictions=out)


# ------------------------------------------------------------------------------------ feedback and state
@router.post(
    "/models/{name}/feedback",
    response_model=FeedbackResponse,
    dependencies=admin,
    summary="True labels for earlier request ids (online accuracy and ECE)",
)
async def feedback(body: FeedbackRequest, engine: Engine) -> FeedbackResponse:
    labels = {rid: _label_index(value, engine.classes) for rid, value in body.labels.items()}
    result = engine.feedback(labels)
    return FeedbackResponse(model=engine.name, **result)


def _label_index(value: int | str, classes: list[str]) -> int:
    """A class index, or a class name mapped to its index."""
    if isinstance(value, int):
        return value
    if value in classes:
        return classes.index(value)
    raise InvalidInput(f"unknown class name {value!r}; classes: {classes}")


@router.post("/models/{name}/reset", response_model=ResetResponse, dependencies=admin, summary="Reset to source")
async def reset(engine: ReadyEngine) -> ResetResponse:
    await engine.reset()
    return ResetResponse(model=engine.name, reset=True)


@router.get("/models/{name}/adaptation", summary="Adaptation state: method, counters, drift, resets, online metrics")
async def adaptation(engine: ReadyEngine) -> dict[str, Any]:
    return _json_safe(await engine.adaptation_info())


def _json_safe(value: Any) -> Any:
    """NaN/inf (e.g. an empty moving average) become null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _snapshot(info: SnapshotInfo) -> SnapshotOut:
    return SnapshotOut(name=info.name, created=info.created, parameter_version=info.parameter_version, steps=info.steps)


@router.post(
    "/models/{name}/snapshots",
    response_model=SnapshotOut,
    status_code=201,
    dependencies=admin,
    summary="Save the adapter state under a name",
)
async def save_snapshot(body: SnapshotRequest, engine: ReadyEngine) -> SnapshotOut:
    return _snapshot(await engine.save_snapshot(body.name))


@router.get("/models/{name}/snapshots", response_model=SnapshotList, summary="Saved snapshots")
async def list_snapshots(engine: Engine) -> SnapshotList:
    return SnapshotList(model=engine.name, snapshots=[_snapshot(s) for s in engine.list_snapshots()])


@router.post(
    "/models/{name}/snapshots/{snapshot}/restore",
    response_model=RestoreResponse,
    dependencies=admin,
    summary="Restore a saved adapter state",
)
async def restore_snapshot(snapshot: str, engine: ReadyEngine) -> RestoreResponse:
    return RestoreResponse(model=engine.name, restored=_snapshot(await engine.restore_snapshot(snapshot)))
