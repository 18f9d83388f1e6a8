"""The v2 gRPC protocol with the official ``tritonclient[grpc]``, on the same engines as HTTP."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from servers import free_port, running_server

from adapters.models.digits import digits_split


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC address) of one server process with both protocols on."""
    config = tmp_path_factory.mktemp("grpc") / "models.yaml"
    config.write_text("models:\n  - name: digits-frozen\n    architecture: digits\n    method: source\n"
                      "  - name: digits-c\n    architecture: digits\n    method: eata-c\n")
    grpc_port = free_port()
    with running_server(config, env={"TTA_GRPC_PORT": str(grpc_port)}) as (base, _):
        yield base, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    _, (x, y) = digits_split()
    return x[:16], y[:16]


def test_health_and_metadata(endpoints):
    client = triton.InferenceServerClient(endpoints[1])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-frozen")
    assert "classification" in client.get_server_metadata().extensions
    meta = client.get_model_metadata("digits-frozen")
    assert list(meta.inputs[0].shape) == [-1, 3, 32, 32] and meta.outputs[0].name == "probabilities"
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'") as unknown:
        client.get_model_metadata("nope")
    assert "NOT_FOUND" in str(unknown.value.status())


def test_infer_matches_http_for_every_input_encoding(endpoints, digits):
    base, address = endpoints
    x, y = digits
    client = triton.InferenceServerClient(address)
    body = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
    over_http = np.array(httpx.post(f"{base}/v2/models/digits-frozen/infer", json=body, timeout=60)
                         .json()["outputs"][0]["data"]).reshape(len(x), 10)

    uint8 = triton.InferInput("images", list(x.shape), "UINT8")
    uint8.set_data_from_numpy(x)
    fp32 = triton.InferInput("images", [len(x), 3, 32, 32], "FP32")
    fp32.set_data_from_numpy((x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32))
    pngs = []
    for image in x:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    encoded = triton.InferInput("images", [len(x)], "BYTES")
    encoded.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    for inp in (uint8, fp32, encoded):
        result = client.infer("digits-frozen", [inp], request_id="r1")
        np.testing.assert_allclose(result.as_numpy("probabilities"), over_http, atol=1e-5)
        assert result.get_response().id == "r1"
    assert (over_http.argmax(1) == y).mean() >= 0.9

    out = triton.InferRequestedOutput("probabilities", class_count=2)
    top = client.infer("digits-frozen", [uint8], outputs=[out]).as_numpy("probabilities")
    assert top.shape == (len(x), 2)
    score, index, label = top[0][0].decode().split(":")
    assert int(index) == over_http[0].argmax() and label == index
    assert float(score) == pytest.approx(over_http[0].max(), abs=1e-5)


def test_bad_input_gets_invalid_argument_with_the_http_message(endpoints):
    base, address = endpoints
    client = triton.InferenceServerClient(address)
    bad = triton.InferInput("images", [1, 3, 16, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer("digits-frozen", [bad])
    assert "INVALID_ARGUMENT" in str(refused.value.status())
    body = {"inputs": [{"name": "images", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768}]}
    http_message = httpx.post(f"{base}/v2/models/digits-frozen/infer", json=body, timeout=60).json()["error"]
    assert refused.value.message() == http_message
    broken = triton.InferInput("images", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(triton.InferenceServerException, match="cannot be decoded"):
        client.infer("digits-frozen", [broken])
    assert client.is_server_live()  # and it keeps serving


def test_eata_c_answers_a_divergence_output_and_other_methods_refuse_it_naming_theirs(endpoints, digits):
    _, address = endpoints
    x, _ = digits
    client = triton.InferenceServerClient(address)
    meta = client.get_model_metadata("digits-c", as_json=True)
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "divergence"]
    images = triton.InferInput("images", list(x.shape), "UINT8")
    images.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("divergence")]
    result = client.infer("digits-c", [images], outputs=wanted)
    divergence = result.as_numpy("divergence")
    assert divergence.shape == (len(x),) and divergence.dtype == np.float32
    assert np.isfinite(divergence).all() and (divergence >= 0).all() and divergence.max() > 0
    assert result.as_numpy("probabilities").shape == (len(x), 10)
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer("digits-frozen", [images], outputs=[triton.InferRequestedOutput("divergence")])
    assert "INVALID_ARGUMENT" in str(refused.value.status())
    assert "'eata-c' only; this model adapts with 'source'" in refused.value.message()
