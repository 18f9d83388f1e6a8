"""Request bodies that carry encoded images: multipart ``files`` or JSON ``{"images": [<base64>...]}``.

Shared by ``/v1/models/{name}/predict``, routed ensembles and ``/v1/detect``: the content type decides,
the image count is checked before anything is decoded, and every problem is a 4xx naming it.
"""

from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from service.errors import InvalidInput
from service.http.errors import ApiError, bad_request_from
from service.predictions import DEFAULT_TOP_K
from service.preprocess import check_count, decode_base64


class PredictJSON(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (PNG, JPEG, ...); data: URLs allowed")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, description="classes listed per image (capped at the class count)")


def image_request_body(top_k: bool = True) -> dict:
    """The OpenAPI request body of a route that reads images this way (FastAPI cannot infer it)."""
    files = {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}
    if top_k:
        files["top_k"] = {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K}
    multipart = {"schema": {"type": "object", "properties": files, "required": ["files"]}}
    json_body = {"schema": {"$ref": "#/components/schemas/PredictJSON"}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": multipart,
                                                          "application/json": json_body}}}


PREDICT_BODY = image_request_body()


async def read_images(request: Request, limit: int) -> tuple[list[bytes], list[str], int]:
    """(encoded images, a name for each to quote in errors, top_k) from either body; 415 for anything else."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, limit)
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            body = PredictJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise bad_request_from(exc) from None
        check_count(len(body.images), limit)
        blobs = [decode_base64(img, f"images[{i}]") for i, img in enumerate(body.images)]
        return blobs, [f"images[{i}]" for i in range(len(blobs))], body.top_k
    raise ApiError(
        415,
        f"unsupported content type {content_type or 'none'!r}: send multipart/form-data with image files in "
        "'files', or application/json with {\"images\": [<base64>, ...]}",
    )


async def _read_multipart(request: Request, limit: int) -> tuple[list[bytes], list[str], int]:
    form = await request.form(max_files=limit, max_fields=8)
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            fields = sorted(set(form.keys()))
            raise InvalidInput(f"no image files in the 'files' field (got fields {fields})")
        check_count(len(files), limit)
        raw_k = form.get("top_k", str(DEFAULT_TOP_K))
        if not isinstance(raw_k, str) or not raw_k.strip().isdigit() or int(raw_k) < 1:
            raise InvalidInput(f"top_k must be a positive integer, got {raw_k!r}")
        blobs = [await f.read() for f in files]
        names = [f"file {f.filename or i}" for i, f in enumerate(files)]
        return blobs, names, int(raw_k)
    finally:
        await form.close()
