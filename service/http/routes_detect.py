"""Routes of CLIP-guided expert selection: ``POST /v1/detect``, routed ensembles' predict, ``GET /v1/routing``.

``/v1/detect`` takes image files (multipart ``files``) or base64 images (JSON ``{"images": [...]}``),
routes each image to a detector and returns its boxes in the image's own pixels with the routing
decision. A routed ensemble (``routing.ensembles`` in the configuration) is served on the usual
``/v1/models/{name}/predict`` with the same request body; each prediction also names the expert that
answered (quote it, with the request id, in that model's ``/feedback``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import Scope

from service.clip.preprocess import open_image
from service.clip.routing import Choice
from service.http.dependencies import AppRouting, AppSettings, Registry
from service.http.errors import ApiError
from service.http.image_requests import PREDICT_BODY, image_request_body, read_images
from service.http.routes_v1 import PredictionOut
from service.predictions import prediction_fields

router = APIRouter(prefix="/v1", tags=["v1: expert routing and detection"])


# ------------------------------------------------------------------------------------ wiring
# ------------------------------------------------------------------------------------ schemas
class RoutingOut(BaseModel):
    table: str = Field(description="the route table: 'detect' or the ensemble's name")
    route: str | None = Field(description="CLIP's best route (null when CLIP failed)")
    probability: float | None = Field(description="softmax probability of that route")
    margin: float | None = Field(description="its probability minus the second route's")
    cosine: float | None = Field(description="cosine similarity of the image and route embeddings")
    fallback: str | None = Field(
        description="why the default expert ran instead (low_probability, low_margin, low_cosine, clip_error); "
        "null when the route's expert ran"
    )
    probabilities: dict[str, float] = Field(description="every route's probability")


class Box(BaseModel):
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in the image's pixels")
    class_id: int
    class_name: str
    score: float


class DetectionResult(BaseModel):
    width: int
    height: int
    expert: str = Field(description="the detector that ran")
    routing: RoutingOut
    boxes: list[Box] = Field(description="best score first")


class DetectResponse(BaseModel):
    results: list[DetectionResult] = Field(description="one per image, in request order")


class RoutedPredictionOut(PredictionOut):
    expert: str = Field(description="the served model that answered (send feedback to it)")
    routing: RoutingOut


class RoutedPredictResponse(BaseModel):
    model: str
    predictions: list[RoutedPredictionOut]


class RouteInfo(BaseModel):
    name: str
    expert: str
    prompts: list[str]


class TableInfo(BaseModel):
    name: str
    routes: list[RouteInfo]
    default_expert: str
    min_probability: float
    min_margin: float
    min_cosine: float | None
    logit_scale: float = Field(description="the multiplier's log; cosines are scaled by its exp")
    drift: float | None = Field(description="cosine distance of the moving embedding centroid from the reference one")


class RoutingInfo(BaseModel):
    clip: str = Field(description="the CLIP model's id from its manifest")
    embed_dim: int
    detectors: list[str]
    tables: list[TableInfo]


def _routing_out(table: str, c: Choice) -> RoutingOut:
    return RoutingOut(
        table=table, route=c.route, probability=c.probability, margin=c.margin, cosine=c.cosine,
        fallback=c.fallback, probabilities=c.probabilities,
    )


async def _open_images(blobs: list[bytes], names: list[str], max_pixels: int) -> list:
    return await run_in_threadpool(
        lambda: [open_image(b, max_pixels, n) for b, n in zip(blobs, names, strict=True)]
    )


# ------------------------------------------------------------------------------------ detect
_DETECT_BODY = image_request_body(top_k=False)


@router.post(
    "/detect",
    response_model=DetectResponse,
    summary="Detect objects: CLIP picks the detector for each image",
    openapi_extra=_DETECT_BODY,
)
async def detect(request: Request, routing: AppRouting, settings: AppSettings) -> DetectResponse:
    if "detect" not in routing.selectors:
        raise ApiError(404, "no detection route table configured (add 'routing.detect')")
    assert settings.routing is not None
    blobs, names, _ = await read_images(request, settings.routing.max_images_per_request)
    images = await _open_images(blobs, names, settings.max_image_pixels)
    answers = await routing.detect(images)
    return DetectResponse(
        results=[
            DetectionResult(
                width=img.width, height=img.height, expert=choice.expert, routing=_routing_out("detect", choice),
                boxes=[Box(box=d.box, class_id=d.class_id, class_name=d.class_name, score=d.score) for d in found],
            )
            for img, (choice, found) in zip(images, answers, strict=True)
        ]
    )


# ------------------------------------------------------------------------------------ routed ensembles
class EnsembleRoute(APIRoute):
    """Matches ``/v1/models/{name}/predict`` only for configured ensembles, so other names reach the
    ordinary predict route (this router is included before it)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match == Match.NONE:
            return match, child
        routing = scope["app"].state.settings.routing
        name = child.get("path_params", {}).get("name")
        if routing is None or name not in routing.ensembles:
            return Match.NONE, {}
        return match, child


ensembles = APIRouter(route_class=EnsembleRoute)  # under this router's /v1 prefix


@ensembles.post(
    "/models/{name}/predict",
    response_model=RoutedPredictResponse,
    summary="Predict with a routed ensemble: CLIP picks the expert model for each image",
    openapi_extra=PREDICT_BODY,
    include_in_schema=False,  # same path as the ordinary predict route; documented in docs/clip.md
)
async def predict_routed(
    name: str, request: Request, routing: AppRouting, registry: Registry, settings: AppSettings
) -> RoutedPredictResponse:
    limit = routing.image_limit(name, registry)
    for expert in routing.selectors[name].table.experts:
        if not registry.get(expert).ready:
            raise ApiError(503, f"model {expert!r} (an expert of {name!r}) is not ready")
    blobs, names, top_k = await read_images(request, limit)
    images = await _open_images(blobs, names, settings.max_image_pixels)
    answers = await routing.predict(name, registry, images)
    out = []
    for a in answers:
        base = prediction_fields(a.prediction, a.engine.classes, top_k)
        out.append(RoutedPredictionOut(**base, expert=a.engine.name, routing=_routing_out(name, a.choice)))
    return RoutedPredictResponse(model=name, predictions=out)


router.include_router(ensembles)


# ------------------------------------------------------------------------------------ info
@router.get("/routing", response_model=RoutingInfo, summary="Route tables, thresholds and embedding drift")
async def routing_info(routing: AppRouting) -> RoutingInfo:
    tables = []
    for name, selector in routing.selectors.items():
        t = selector.table
        tables.append(
            TableInfo(
                name=name,
                routes=[RouteInfo(name=r.name, expert=r.expert, prompts=list(r.prompts)) for r in t.routes],
                default_expert=t.default_expert, min_probability=t.min_probability, min_margin=t.min_margin,
                min_cosine=t.min_cosine, logit_scale=t.logit_scale,
                drift=selector.drift.score() if selector.drift is not None else None,
            )
        )
    m = routing.clip.manifest
    return RoutingInfo(clip=m.model_id, embed_dim=m.embed_dim, detectors=sorted(routing.detectors), tables=tables)
