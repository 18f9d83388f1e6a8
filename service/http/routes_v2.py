"""Open Inference Protocol v2 (KServe / Triton HTTP), including Triton's binary tensor extension.

The official ``tritonclient.http`` client works unchanged against these routes. The binary path is
the fast one: the ``Inference-Header-Content-Length`` header says how many leading bytes are the JSON
header; the remaining bytes are the raw little-endian tensors, read with ``numpy.frombuffer``.

Inputs: exactly one tensor, FP32 NCHW in [0, 1] or UINT8 NHWC (3 channels) at the model's input
size. Output: ``probabilities`` FP32 [N, C].
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from service.engine import EngineRegistry, ModelEngine, Prediction
from service.http.dependencies import AppSettings, Engine, ReadyEngine
from service.http.errors import ApiError, BodyTooLarge, bad_request_from
from service.predictions import classification_strings, divergence_vector, probability_matrix
from service.preprocess import (
    BYTES,
    FP32,
    array_from_bytes,
    array_from_json,
    array_to_tensor,
    bytes_elements,
    bytes_tensor,
    check_tensor_header,
    decode_base64,
    images_to_tensor,
)
from service.settings import Settings
from service.tracing import span
from service.v2_protocol import (
    DIVERGENCE_OUTPUT,
    EXTENSIONS,
    INPUT_NAME,
    OUTPUT_NAME,
    PLATFORM,
    VERSION,
    check_encoded_images,
    check_one_input,
    check_output,
)

if TYPE_CHECKING:  # the route hands tensors over; it never computes on them
    import torch

HEADER_LENGTH = "Inference-Header-Content-Length"

router = APIRouter(tags=["v2: Open Inference Protocol"])


def check_version(version: str | None, engine: ModelEngine) -> None:
    if version is not None and version != VERSION:
        raise ApiError(404, f"model {engine.name!r} has no version {version!r}; versions: [{VERSION!r}]")


# ------------------------------------------------------------------------------------ schemas
class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class InferInput(BaseModel):
    """One input tensor; ``data`` (JSON, row-major, flat or nested) or ``parameters.binary_data_size``."""

    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """The JSON header of an inference request (the whole body unless binary tensors follow)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | list[str] | None = Field(
        None, description="absent when the output is sent as binary data; 'score:index:label' strings for a "
        "classification output"
    )


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="parameter_version (the adapter's weights version) and request_ids (comma-separated)"
    )
    outputs: list[InferOutput]


def openapi_schemas() -> dict[str, Any]:
    """JSON schemas of the infer request, for the OpenAPI document (the route reads its body itself)."""
    schema = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"InferRequest": schema, **defs}


# ------------------------------------------------------------------------------------ health and metadata
@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="tta-serve", version=request.app.version, extensions=EXTENSIONS)


@router.get("/v2/health/live", summary="Liveness: 200 while the process serves")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Readiness: 200 when every model is ready (status 'degraded' with the reason when the shared "
    "state store is down but requests are still answered from local state), else 503",
)
async def ready(request: Request) -> dict[str, Any]:
    registry: EngineRegistry | None = request.app.state.registry
    if registry is None:
        raise ApiError(503, "models are still loading")
    waiting = [e.name for e in registry if not e.ready]
    if waiting:
        raise ApiError(503, f"models not ready: {waiting}")
    down = {e.name: status["store_error"] for e in registry if (status := e.store_status()) and not status["store_up"]}
    if down:
        return {"ready": True, "status": "degraded", "reason": f"state store down for {down}"}
    return {"ready": True, "status": "ok"}


def model_metadata(engine: ModelEngine) -> ModelMetadata:
    c, h, w = engine.input_shape
    return ModelMetadata(
        name=engine.name,
        versions=[VERSION],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype=FP32, shape=[-1, c, h, w])],
        outputs=[TensorMetadata(name=OUTPUT_NAME, datatype=FP32, shape=[-1, len(engine.classes)])]
        + ([TensorMetadata(name=DIVERGENCE_OUTPUT, datatype=FP32, shape=[-1])]
           if engine.adapter.reports_divergence else []),
    )


@router.get("/v2/models/{name}", response_model=ModelMetadata, summary="Model metadata")
async def get_model_metadata(engine: Engine) -> ModelMetadata:
    return model_metadata(engine)


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, include_in_schema=False)
async def get_model_version_metadata(version: str, engine: Engine) -> ModelMetadata:
    check_version(version, engine)
    return model_metadata(engine)


@router.get("/v2/models/{name}/ready", summary="Model readiness: 200 when ready, else 503")
async def model_ready(engine: Engine) -> dict[str, Any]:
    if not engine.ready:
        raise ApiError(503, f"model {engine.name!r} is not ready")
    return {"name": engine.name, "ready": True}


@router.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_version_ready(version: str, engine: Engine) -> dict[str, Any]:
    check_version(version, engine)
    return await model_ready(engine)


# ------------------------------------------------------------------------------------ inference
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"Triton binary tensor extension: the {HEADER_LENGTH} header gives the length of "
                "the leading JSON header; the raw little-endian tensors follow.",
            },
        },
    }
}


@router.post(
    "/v2/models/{name}/infer",
    summary="Inference (JSON or Triton binary tensors)",
    responses={200: {"model": InferResponse}},
    openapi_extra=_INFER_BODY,
)
async def infer(request: Request, engine: ReadyEngine, settings: AppSettings) -> Response:
    body = decode_content(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
    return await run_inference(engine, body, request.headers.get(HEADER_LENGTH), settings)


async def run_inference(engine: ModelEngine, body: bytes, header_length: str | None, settings: Settings) -> Response:
    """Parse an infer body (JSON, or JSON header + binary tensors), predict and format the answer.

    Raises :class:`ApiError` or :class:`InvalidInput` for a bad request, always before the request reaches
    the model (the fast path in ``service.infer_fast_path`` relies on that); other exceptions come from the
    model's batch.
    """
    header, binary = split_binary_body(body, header_length)
    max_json = settings.max_json_body_bytes
    if len(header) > max_json:  # refused before parsing: JSON numbers cost ~18x their text in memory
        raise ApiError(413, f"the JSON part of the request has {len(header)} bytes; the limit is {max_json} "
                       f"(max_json_body_bytes). Send the tensors as binary data ({HEADER_LENGTH}), as the Triton "
                       "client does by default")
    with span("infer", {"model": engine.name, "protocol": "v2"}):
        with span("decode"):
            try:
                req = InferRequest.model_validate_json(header)
            except ValidationError as exc:
                raise bad_request_from(exc) from None
            if len(req.inputs) == 1 and req.inputs[0].datatype == BYTES:  # encoded images: as /v1 uploads
                blobs, names = encoded_images(req.inputs[0], binary, engine.config.max_images_per_request)
                images = await run_in_threadpool(
                    images_to_tensor, blobs, engine.config.input_size, settings.max_image_pixels, names
                )
            else:
                images = input_tensor(req, binary, engine.input_shape)
            outputs = requested_outputs(req, engine)
        predictions = await engine.predict(images)
        with span("encode"):
            return infer_response(engine, req, predictions, outputs)


@router.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer_version(request: Request, version: str, engine: ReadyEngine, settings: AppSettings) -> Response:
    check_version(version, engine)
    return await infer(request, engine, settings)


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate (as the Triton client can send), bounded by the body limit."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, f"cannot decompress the {encoding} body: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(limit)
    return out


def split_binary_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensors) per the ``Inference-Header-Content-Length`` header.

    Only the small JSON header is copied; the tensors stay a view of the body.
    """
    view = memoryview(body)
    if header_length is None:
        return body, view[len(body) :]
    try:
        length = int(header_length)
    except ValueError:
        raise ApiError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ApiError(400, f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    return bytes(view[:length]), view[length:]


def input_tensor(req: InferRequest, binary: memoryview, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """The request's one input tensor as the engine's float NCHW batch; 400 naming any problem."""
    check_one_input([i.name for i in req.inputs])
    tensor = req.inputs[0]
    check_tensor_header(tensor.datatype, tensor.shape, input_shape)
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(binary):
            raise ApiError(
                400,
                f"input {tensor.name!r}: parameters.binary_data_size is {binary_size!r} but {len(binary)} bytes of "
                f"binary data follow the header ({HEADER_LENGTH} {'missing' if not len(binary) else 'given'})",
            )
        values = array_from_bytes(binary, tensor.datatype, tensor.shape)
    else:
        if len(binary):
            raise ApiError(400, f"{len(binary)} bytes of binary data but no input sets parameters.binary_data_size")
        if tensor.data is None:
            raise ApiError(400, f"input {tensor.name!r} has neither 'data' nor parameters.binary_data_size")
        values = array_from_json(tensor.data, tensor.datatype, tensor.shape)
    return array_to_tensor(values, tensor.datatype)


def encoded_images(tensor: InferInput, binary: memoryview, limit: int) -> tuple[list[bytes], list[str]]:
    """The encoded image files of a BYTES input (binary, or base64 strings in JSON) and a name for each."""
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if binary_size != len(binary):
            raise ApiError(400, f"input {tensor.name!r}: parameters.binary_data_size is {binary_size!r} but "
                           f"{len(binary)} bytes of binary data follow the header")
        blobs = bytes_elements(binary)
    elif tensor.data is not None:
        flat = [item for row in tensor.data for item in (row if isinstance(row, list) else [row])]
        if not all(isinstance(item, str) for item in flat):
            raise ApiError(400, f"BYTES input {tensor.name!r}: JSON data must be base64 strings of image files")
        blobs = [decode_base64(item, f"{tensor.name}[{i}]") for i, item in enumerate(flat)]
    else:
        raise ApiError(400, f"input {tensor.name!r} has neither 'data' nor parameters.binary_data_size")
    check_encoded_images(tensor.name, tensor.shape, len(blobs), limit)
    return blobs, [f"{tensor.name}[{i}]" for i in range(len(blobs))]


@dataclass(frozen=True)
class Output:
    """An output to return: as binary data or JSON, and as probabilities or Triton classification strings."""

    name: str
    binary: bool
    classification: int | None = None


def requested_outputs(req: InferRequest, engine: ModelEngine) -> list[Output]:
    """The outputs to return; 400 for an output the model lacks (``divergence`` of a method without one) or
    a bad ``classification`` count."""
    default_binary = bool((req.parameters or {}).get("binary_data_output", False))
    if not req.outputs:
        return [Output(OUTPUT_NAME, default_binary)]
    result = []
    for out in req.outputs:
        parameters = out.parameters or {}
        top = check_output(out.name, parameters.get("classification"), engine.config.method,
                           engine.adapter.reports_divergence)
        result.append(Output(out.name, bool(parameters.get("binary_data", default_binary)), top))
    return result


def infer_response(
    engine: ModelEngine, req: InferRequest, predictions: list[Prediction], outputs: list[Output]
) -> Response:
    """Format probabilities (or Triton classification strings) as JSON, or as Triton binary outputs when an
    output asks for binary data."""
    probs = probability_matrix(predictions)
    shape = list(probs.shape)
    header: dict[str, Any] = {"model_name": engine.name, "model_version": VERSION}
    if req.id is not None:
        header["id"] = req.id
    header["parameters"] = {
        "parameter_version": predictions[-1].parameter_version,
        "request_ids": ",".join(p.request_id for p in predictions),
    }
    blobs: list[bytes] = []
    header["outputs"] = []
    entry: dict[str, Any]
    for out in outputs:
        if out.name == DIVERGENCE_OUTPUT:  # NaN (JSON null) for an answer of the frozen fallback
            divergence = divergence_vector(predictions)
            entry = {"name": out.name, "datatype": FP32, "shape": [len(predictions)]}
            raw, values = (divergence.tobytes(), None) if out.binary else (
                b"", [None if math.isnan(v) else v for v in divergence.tolist()])
        elif out.classification is None:
            entry = {"name": out.name, "datatype": FP32, "shape": shape}
            raw, values = (probs.tobytes(), None) if out.binary else (b"", probs.ravel().tolist())
        else:
            top = min(out.classification, len(engine.classes))
            strings = classification_strings(predictions, engine.classes, top)
            entry = {"name": out.name, "datatype": BYTES, "shape": [len(predictions), top]}
            raw, values = (bytes_tensor([s.encode() for s in strings]), None) if out.binary else (b"", strings)
        if out.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = values
        header["outputs"].append(entry)
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )
