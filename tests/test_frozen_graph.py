"""The frozen-model fast path: same answers as eager, and eager kept when a model cannot be traced."""

from __future__ import annotations

import asyncio
import logging

import torch
from helpers import small_bn_cnn
from torch import nn

from service.engine import ModelEngine
from service.frozen_graph import freeze_for_inference
from service.model_sources import LoadedModel
from service.settings import ModelConfig

CLASSES = [str(i) for i in range(10)]


class BatchDependent(nn.Module):
    """Data-dependent control flow: tracing records one branch, so the graph would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_bn_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if x.shape[0] > 4 else -out


def test_frozen_graph_answers_as_the_eager_model_at_any_batch_size():
    model = small_bn_cnn()
    graph = freeze_for_inference(model, (8, 8), channels_last=True)
    assert isinstance(graph, torch.jit.ScriptModule)
    for n in (1, 5, 33):
        x = torch.rand(n, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x), atol=1e-4, rtol=1e-4)
    assert not model.training  # the eager model is left as it was


def test_a_model_that_traces_wrongly_stays_eager_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert freeze_for_inference(BatchDependent(), (8, 8), channels_last=False, name="odd") is None
    assert "model odd: serving the frozen model eagerly" in caplog.text
    assert "differ" in caplog.text


def serve(config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    engine = ModelEngine(config, LoadedModel(small_bn_cnn(), CLASSES, None), device=torch.device("cpu"))
    assert isinstance(engine.adapter.model, torch.jit.ScriptModule) == config.trace_source

    async def go() -> torch.Tensor:
        await engine.start()
        try:
            return torch.stack([p.probabilities for p in await engine.predict(x)])
        finally:
            await engine.stop()

    return asyncio.run(go())


def test_traced_channels_last_serving_matches_plain_eager_serving():
    x = torch.rand(6, 3, 8, 8)
    base = {"name": "m", "factory": "helpers:small_bn_cnn", "input_size": (8, 8), "method": "source"}
    fast = serve(ModelConfig(**base), x)
    plain = serve(ModelConfig(**base, trace_source=False, channels_last=False), x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    assert fast.shape == (6, 10)
