"""The Open Inference Protocol v2 over gRPC (KServe / Triton), on the same engines as HTTP.

Optional: set ``grpc_port`` and install the ``grpc`` extra (``pip install 'tta-serve[grpc]'``), which
brings the official generated stubs of the protocol (``tritonclient.grpc.service_pb2*``) and grpcio. The
server runs in the HTTP server's process and event loop, so both transports share every engine, batch
and adaptation step. Supported: server live/ready/metadata, model ready/metadata, and infer with raw
tensor contents (``raw_input_contents``, as the Triton client sends them) or typed contents: FP32 NCHW,
UINT8 NHWC, or BYTES of encoded images; outputs as probabilities or Triton classification strings
(``classification`` parameter). A bad request gets the status a Triton user expects
(INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE) with the same message as over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc

from service.engine import EngineRegistry, ModelEngine
from service.errors import InvalidInput, UnknownModel
from service.predictions import classification_strings, divergence_vector, probability_matrix
from service.preprocess import (
    BYTES,
    FP32,
    UINT8,
    array_from_bytes,
    array_to_tensor,
    bytes_elements,
    bytes_tensor,
    check_tensor_header,
    images_to_tensor,
)
from service.settings import Settings
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

log = logging.getLogger(__name__)



class _Refused(Exception):
    """A request answered with a gRPC status and message (before it reaches the model)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class InferenceService(rpc.GRPCInferenceServiceServicer):
    """The v2 gRPC service over an engine registry."""

    def __init__(self, registry: EngineRegistry, settings: Settings, version: str) -> None:
        self.registry = registry
        self.settings = settings
        self.version = version

    def _engine(self, name: str, ready: bool = True) -> ModelEngine:
        try:
            engine = self.registry.get(name)
        except UnknownModel as exc:
            raise _Refused(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        if ready and not engine.ready:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"model {name!r} is not ready")
        return engine

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.registry.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="tta-serve", version=self.version, extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return await _answer(context, lambda: pb.ModelReadyResponse(ready=self._engine(request.name, False).ready))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        def metadata() -> Any:
            engine = self._engine(request.name, ready=False)
            c, h, w = engine.input_shape
            return pb.ModelMetadataResponse(
                name=engine.name, versions=[VERSION], platform=PLATFORM,
                inputs=[pb.ModelMetadataResponse.TensorMetadata(name=INPUT_NAME, datatype=FP32, shape=[-1, c, h, w])],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(
                    name=OUTPUT_NAME, datatype=FP32, shape=[-1, len(engine.classes)])]
                + ([pb.ModelMetadataResponse.TensorMetadata(name=DIVERGENCE_OUTPUT, datatype=FP32, shape=[-1])]
                   if engine.adapter.reports_divergence else []),
            )

        return await _answer(context, metadata)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            engine = self._engine(request.model_name)
            if request.model_version not in ("", VERSION):
                raise _Refused(grpc.StatusCode.NOT_FOUND, f"model {engine.name!r} has version {VERSION!r} only")
            images = await self._images(engine, request)
            outputs = _requested_outputs(request, engine)
            predictions = await engine.predict(images)
        except _Refused as exc:
            await context.abort(exc.code, str(exc))
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = pb.ModelInferResponse(model_name=engine.name, model_version=VERSION, id=request.id)
        response.parameters["parameter_version"].int64_param = predictions[-1].parameter_version
        response.parameters["request_ids"].string_param = ",".join(p.request_id for p in predictions)
        for name, top in outputs:
            if name == DIVERGENCE_OUTPUT:  # NaN for an answer of the frozen fallback
                divergence = divergence_vector(predictions)
                response.outputs.add(name=name, datatype=FP32, shape=[len(predictions)])
                response.raw_output_contents.append(divergence.tobytes())
            elif top is None:
                probs = probability_matrix(predictions)
                response.outputs.add(name=name, datatype=FP32, shape=list(probs.shape))
                response.raw_output_contents.append(probs.tobytes())
            else:
                top = min(top, len(engine.classes))
                strings = classification_strings(predictions, engine.classes, top)
                response.outputs.add(name=name, datatype=BYTES, shape=[len(predictions), top])
                response.raw_output_contents.append(bytes_tensor([s.encode() for s in strings]))
        return response

    async def _images(self, engine: ModelEngine, request: Any) -> Any:
        """The request's one input as the engine's float NCHW batch (encoded images decoded off the loop)."""
        check_one_input([i.name for i in request.inputs])
        tensor = request.inputs[0]
        shape = list(tensor.shape)
        raw = request.raw_input_contents[0] if request.raw_input_contents else None
        if tensor.datatype == BYTES:
            blobs = bytes_elements(raw) if raw is not None else list(tensor.contents.bytes_contents)
            check_encoded_images(tensor.name, shape, len(blobs), engine.config.max_images_per_request)
            names = [f"{tensor.name}[{i}]" for i in range(len(blobs))]
            return await asyncio.to_thread(images_to_tensor, blobs, engine.config.input_size,
                                           self.settings.max_image_pixels, names)
        count = check_tensor_header(tensor.datatype, shape, engine.input_shape)
        if raw is None:
            typed = tensor.contents.fp32_contents if tensor.datatype == FP32 else tensor.contents.uint_contents
            values = np.asarray(typed, dtype=np.float32 if tensor.datatype == FP32 else np.int64)
            if values.size != count or (tensor.datatype == UINT8 and (values.min() < 0 or values.max() > 255)):
                raise InvalidInput(f"input {tensor.name!r}: {values.size} values for shape {shape}")
            values = values.astype(np.uint8 if tensor.datatype == UINT8 else np.float32).reshape(shape)
        else:
            values = array_from_bytes(raw, tensor.datatype, shape)
        return array_to_tensor(values, tensor.datatype)


def _requested_outputs(request: Any, engine: ModelEngine) -> list[tuple[str, int | None]]:
    """(name, classification count or None) for each output to return."""
    if not request.outputs:
        return [(OUTPUT_NAME, None)]
    result = []
    for out in request.outputs:
        top = out.parameters["classification"].int64_param if "classification" in out.parameters else None
        result.append((out.name, check_output(out.name, top, engine.config.method,
                                              engine.adapter.reports_divergence)))
    return result


async def _answer(context: Any, build: Any) -> Any:
    try:
        return build()
    except _Refused as exc:
        await context.abort(exc.code, str(exc))


async def serve_grpc(registry: EngineRegistry, settings: Settings, version: str) -> grpc.aio.Server:
    """Start the gRPC server on ``settings.host:settings.grpc_port`` in the running event loop."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes)])
    rpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(registry, settings, version), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("serving the v2 gRPC protocol on %s", address)
    return server
