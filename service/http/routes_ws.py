"""The WebSocket predict route: a client pushes frames and reads predictions on one connection.

``/v1/models/{name}/stream`` takes binary frames (one encoded image each) or JSON text frames
(``{"image": "<base64>", "id": ..., "top_k": 3}``) and sends one JSON message per frame, in the order
the frames arrived, with the fields of a ``/v1/.../predict`` prediction plus ``seq`` (the frame's
position, from 0), ``id`` (the client's id, null for binary frames) and ``model``. A bad frame gets
``{"seq", "id", "error"}`` in its place and the connection stays open.

Back-pressure: at most ``MAX_IN_FLIGHT`` frames per connection are read but not yet answered. At the
bound the route stops reading the socket, so the server's receive buffer fills and TCP pushes back on
the client. Frames in flight are predicted concurrently, so the engine batches them together.

Like the other predict routes it needs no admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from service.engine import EngineRegistry, ModelEngine
from service.errors import InvalidInput, UnknownModel
from service.http.errors import describe_validation_errors
from service.predictions import DEFAULT_TOP_K, prediction_fields
from service.preprocess import decode_base64, decode_image, uint8_nhwc_to_tensor
from service.settings import Settings

router = APIRouter(tags=["v1: convenience and admin"])

MAX_IN_FLIGHT = 32  # frames read but not yet answered, per connection
CLOSE_POLICY_VIOLATION = 1008  # unknown model
CLOSE_TRY_AGAIN_LATER = 1013  # models loading, or the model not running
_MAX_REASON_BYTES = 123  # the WebSocket protocol's limit on a close reason


class FrameJSON(BaseModel):
    """A JSON text frame."""

    image: str = Field(description="base64-encoded image file (PNG, JPEG, ...); a data: URL is allowed")
    id: str | int | None = Field(None, description="echoed back in the answer")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, description="classes listed (capped at the class count)")


@dataclass
class WebSocketStats:
    """Counts over the app's WebSocket connections; ``peak_in_flight`` shows the bound holds."""

    connections: int = 0
    frames: int = 0
    errors: int = 0
    peak_in_flight: int = 0


def stats_for(state: State) -> WebSocketStats:
    """The app's WebSocket counters, created on first use."""
    if not hasattr(state, "websocket_stats"):
        state.websocket_stats = WebSocketStats()
    return state.websocket_stats


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.close(code, reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore"))


@router.websocket("/v1/models/{name}/stream", name="predict stream (WebSocket)")
async def predict_stream(websocket: WebSocket, name: str) -> None:
    """Predict frames pushed over a WebSocket, answering each in order (see the module docstring)."""
    await websocket.accept()  # accept first, so a refusal can carry a close code and reason
    registry: EngineRegistry | None = websocket.app.state.registry
    if registry is None:
        await _close(websocket, CLOSE_TRY_AGAIN_LATER, "models are still loading")
        return
    try:
        engine = registry.get(name)
    except UnknownModel as exc:
        await _close(websocket, CLOSE_POLICY_VIOLATION, str(exc))
        return
    if not engine.ready:
        await _close(websocket, CLOSE_TRY_AGAIN_LATER, f"model {name!r} is not ready")
        return
    stats = stats_for(websocket.app.state)
    stats.connections += 1
    await _Connection(websocket, engine, websocket.app.state.settings, MAX_IN_FLIGHT, stats).run()


class _Connection:
    """One client: a reader that stops at the in-flight bound and a writer that answers in order."""

    def __init__(
        self, websocket: WebSocket, engine: ModelEngine, settings: Settings, limit: int, stats: WebSocketStats
    ) -> None:
        self.websocket = websocket
        self.engine = engine
        self.settings = settings
        self.stats = stats
        self.slots = asyncio.Semaphore(limit)
        self.answers: asyncio.Queue[asyncio.Task[dict[str, Any]]] = asyncio.Queue()
        self.in_flight = 0
        self.closed = False

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            seq = 0
            while True:
                await self.slots.acquire()  # at the bound, the socket is not read: TCP back-pressure
                if self.closed:
                    break
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                self.in_flight += 1
                self.stats.frames += 1
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.in_flight)
                self.answers.put_nowait(asyncio.create_task(self._answer(seq, message)))
                seq += 1
        finally:  # the client is gone: nobody to answer
            self.closed = True
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            while not self.answers.empty():
                self.answers.get_nowait().cancel()

    async def _write(self) -> None:
        try:
            while True:
                task = await self.answers.get()
                reply = await task
                await self.websocket.send_text(json.dumps(reply))
                self.in_flight -= 1
                self.slots.release()
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client left while we were answering
            self.closed = True
            self.slots.release()  # wake the reader if it waits at the bound

    async def _answer(self, seq: int, message: dict[str, Any]) -> dict[str, Any]:
        """The answer to one frame: a prediction, or an error in the same position."""
        client_id: str | int | None = None
        try:
            payload, client_id, top_k = self._parse(message)
            blob = payload if isinstance(payload, bytes) else decode_base64(payload, "image")
            size = self.engine.config.input_size
            pixels = await run_in_threadpool(decode_image, blob, size, self.settings.max_image_pixels, "frame")
            (prediction,) = await self.engine.predict(uint8_nhwc_to_tensor(pixels[None]))
        except InvalidInput as exc:
            return self._error(seq, client_id, str(exc))
        except Exception as exc:  # an engine fault fails this frame, never the connection
            return self._error(seq, client_id, f"prediction failed ({type(exc).__name__}: {exc})")
        classes = self.engine.classes
        out = prediction_fields(prediction, classes, top_k)
        return {"seq": seq, "id": client_id, "model": self.engine.name, **out}

    def _parse(self, message: dict[str, Any]) -> tuple[bytes | str, str | int | None, int]:
        """(image bytes, or base64 text from JSON; client id; top_k) of a frame."""
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len(text.encode()) if text is not None else 0
        if size > self.settings.max_body_bytes:
            raise InvalidInput(f"frame is {size} bytes; the limit is {self.settings.max_body_bytes}")
        if data is not None:
            return data, None, DEFAULT_TOP_K
        if text is None:
            raise InvalidInput("empty frame")
        try:
            frame = FrameJSON.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidInput(describe_validation_errors(exc.errors())) from None
        return frame.image, frame.id, frame.top_k

    def _error(self, seq: int, client_id: str | int | None, message: str) -> dict[str, Any]:
        self.stats.errors += 1
        return {"seq": seq, "id": client_id, "error": message}
