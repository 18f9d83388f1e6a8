"""A minimal client for the Open Inference Protocol with Triton's binary tensor extension.

The demo and the load generators need a client cheaper than the server it measures: one request is
a JSON header plus raw little-endian tensor bytes, and the answer is parsed the same way. (Users can
equally use the official ``tritonclient[http]``.)
"""

from __future__ import annotations

import json

import httpx
import numpy as np

DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}


def binary_request(
    images: np.ndarray, output_binary: bool = True, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a binary v2 infer request for one input tensor (``id`` set when given)."""
    raw = np.ascontiguousarray(images).tobytes()
    fields: dict = {
        "inputs": [{"name": "images", "shape": list(images.shape), "datatype": DATATYPES[images.dtype],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": output_binary}}],
    }
    if request_id is not None:
        fields["id"] = request_id
    header = json.dumps(fields, separators=(",", ":")).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return header + raw, headers


def parse_response(response: httpx.Response) -> tuple[np.ndarray, dict]:
    """The probability matrix and the JSON header of a v2 infer response (binary or JSON)."""
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    content = response.content
    json_len = int(response.headers.get("Inference-Header-Content-Length", len(content)))
    meta = json.loads(content[:json_len])
    output = meta["outputs"][0]
    if json_len < len(content):
        probs = np.frombuffer(content[json_len:], dtype=np.float32)
    else:
        probs = np.asarray(output["data"], dtype=np.float32)
    return probs.reshape(output["shape"]), meta


def infer(client: httpx.Client, model: str, images: np.ndarray) -> np.ndarray:
    """Probabilities for ``images`` (uint8 NHWC or float32 NCHW) from ``model``."""
    body, headers = binary_request(images)
    return parse_response(client.post(f"/v2/models/{model}/infer", content=body, headers=headers))[0]


async def infer_async(client: httpx.AsyncClient, model: str, images: np.ndarray) -> np.ndarray:
    body, headers = binary_request(images)
    response = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    return parse_response(response)[0]
