"""CLIP-guided expert selection: export a tiny random CLIP with the project's own code, load it through the
serving path, check ONNX against PyTorch, the preprocessing against a reference, the routing rules on
crafted embeddings, and the HTTP routes (/v1/detect, a routed ensemble, /v1/routing, metrics).

Nothing is downloaded: the CLIP model is ``CLIPModel(CLIPConfig(...))`` with random weights and a
word-level tokenizer built here.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_detection import CLASSES as DETECTOR_CLASSES
from test_detection import EXPECTED_INPUT_BOXES, build_constant_detector, known_raw
from typer.testing import CliRunner

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from service.clip.config import RouteTableConfig, RoutingConfig
from service.clip.manifest import OPENAI_MEAN, OPENAI_STD, ClipLoadError, ImageSpec, load_manifest
from service.clip.preprocess import clip_pixels
from service.clip.routing import (
    CLIP_ERROR,
    LOW_COSINE,
    LOW_MARGIN,
    LOW_PROBABILITY,
    DriftTracker,
    ExpertSelector,
    Route,
    RouteTable,
    SelectionObserver,
    route_embedding,
)
from service.clip.selection import RoutingLoadError, build_routing
from service.clip.towers import ClipModel

WORDS = ["a", "photo", "of", "fish", "in", "murky", "green", "turbid", "water", "clear", "blue", "at", "night", "dark",
         "sand", "the", "coral", "reef"]
PROMPTS = {
    "murky": ["a photo of fish in murky green water", "turbid water"],
    "clear": ["a photo of fish in clear blue water"],
    "night": ["a photo of fish at night", "dark water"],
}
CONTEXT = 16
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------------------- the tiny CLIP
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """A random transformers CLIP saved as a local checkpoint: (folder, model, HF tokenizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip-src")
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True, "resample": 3, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
    }))
    return folder, model, hf_tok


@pytest.fixture(scope="module")
def clip_dir(tiny_clip, tmp_path_factory) -> Path:
    """The tiny CLIP exported by ``tta-serve export-clip`` with the route prompts precomputed."""
    from service.cli import app

    folder, _, _ = tiny_clip
    work = tmp_path_factory.mktemp("clip-out")
    prompts = work / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(PROMPTS))
    out = work / "clip"
    result = CliRunner().invoke(app, ["export-clip", str(folder), str(out), "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    assert "image tower, text tower + tokenizer, 5 prompt embeddings" in result.output
    return out


def _torch_features(out) -> np.ndarray:
    out = out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output
    out = out.detach().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_exported_towers_match_pytorch(tiny_clip, clip_dir):
    _, model, hf_tok = tiny_clip
    clip = ClipModel(clip_dir, threads=1)
    manifest = clip.manifest
    assert (manifest.embed_dim, manifest.image.crop, manifest.text.context_length) == (16, IMAGE_SIZE, CONTEXT)
    assert manifest.logit_scale == pytest.approx(float(model.logit_scale.detach()))

    pixels = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = _torch_features(model.get_image_features(pixel_values=pixels))
    np.testing.assert_allclose(clip.embed_images(pixels.numpy()), expected, atol=1e-5)

    texts = ["a photo of fish at night", "coral reef", "a photo of the sand in clear blue water"]
    enc = hf_tok(texts, padding="max_length", max_length=CONTEXT, return_tensors="pt")
    ids, mask = clip.tokenize(texts)
    np.testing.assert_array_equal(ids, enc["input_ids"].numpy())
    np.testing.assert_array_equal(mask, enc["attention_mask"].numpy())
    with torch.no_grad():
        expected = _torch_features(model.get_text_features(**enc))
    np.testing.assert_allclose(clip.embed_prompts(texts), expected, atol=1e-5)


def test_precomputed_prompts_serve_without_a_text_tower(clip_dir, tmp_path):
    with_text = ClipModel(clip_dir)
    image_only = tmp_path / "clip"
    shutil.copytree(clip_dir, image_only)
    manifest = load_manifest(image_only)
    manifest.model_copy(update={"text": None}).save(image_only)
    (image_only / "text.onnx").unlink()
    clip = ClipModel(image_only)
    assert clip.text_session is None
    prompts = PROMPTS["murky"] + PROMPTS["night"]
    np.testing.assert_allclose(clip.embed_prompts(prompts), with_text._embed_texts(prompts), atol=1e-5)
    with pytest.raises(ClipLoadError, match="no precomputed embedding for prompts \\['coral reef'\\]"):
        clip.embed_prompts(["coral reef"])


def test_loading_refuses_missing_or_altered_files(clip_dir, tmp_path):
    with pytest.raises(ClipLoadError, match="export-clip"):
        ClipModel(tmp_path)
    altered = tmp_path / "clip"
    shutil.copytree(clip_dir, altered)
    with open(altered / "image.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ClipLoadError, match="SHA-256"):
        ClipModel(altered)


# ---------------------------------------------------------------------------------------- preprocessing
def reference_clip_transform(img: Image.Image, size: int) -> np.ndarray:
    """OpenAI CLIP's torchvision transform, step by step: Resize(size, BICUBIC) on the PIL image,
    CenterCrop(size), convert RGB, ToTensor, Normalize (torchvision's own arithmetic)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # Python's round, as torchvision
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return ((t - mean) / std).numpy()


def test_preprocessing_matches_the_reference_on_real_images(shared, cifar10):
    spec = ImageSpec()  # OpenAI CLIP: 224, bicubic, OpenAI mean/std
    frost = Image.open(shared / "data" / "frost" / "frost1.png").convert("RGB")  # 900 x 600: downscaled
    cifar = Image.fromarray(cifar10[0][7])  # 32 x 32: upscaled 7x
    for img in (frost, frost.transpose(Image.Transpose.ROTATE_90), frost.crop((0, 0, 611, 300)), cifar):
        ours = clip_pixels(img, spec)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference_clip_transform(img, 224), atol=1e-5, rtol=0)
    # the usual mistakes move inputs by whole units, far beyond the tolerance above
    squashed = np.asarray(frost.resize((224, 224), Image.BICUBIC), np.float32) / 255
    squashed = ((squashed - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)).transpose(2, 0, 1)
    assert np.abs(squashed - clip_pixels(frost, spec)).max() > 1.0


# ---------------------------------------------------------------------------------------- routing rules
E = np.eye(6, dtype=np.float32)


def crafted_table(**thresholds) -> RouteTable:
    routes = [Route(name, f"det-{name}", (name,)) for name in ("murky", "clear", "night")]
    return RouteTable("detect", routes, E[:3], "det-general", logit_scale=np.log(100.0), **thresholds)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_routing_picks_the_closest_route_with_its_probability_and_margin():
    (choice,) = crafted_table(min_probability=0.5, min_margin=0.2).decide(E[1:2])
    assert (choice.route, choice.expert, choice.fallback) == ("clear", "det-clear", None)
    p = np.exp(100.0) / (np.exp(100.0) + 2)  # cosines (0, 1, 0) x 100, soft-maxed
    assert choice.probability == pytest.approx(p)
    assert choice.margin == pytest.approx(p - 1 / (np.exp(100.0) + 2))
    assert choice.cosine == pytest.approx(1.0)
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("embedding", "reason"),
    [
        (E[4], LOW_PROBABILITY),                       # orthogonal to every route: 1/3 each
        (unit(E[0] + E[2]), LOW_MARGIN),               # halfway between murky and night
        (unit(0.05 * E[2] + E[5]), LOW_COSINE),        # nearest is night (p ~ 0.99), but barely similar
    ],
)
def test_routing_falls_back_to_the_default_expert(embedding, reason):
    table = crafted_table(min_probability=0.5, min_margin=0.2, min_cosine=0.2)
    (choice,) = table.decide(embedding[None])
    assert (choice.expert, choice.fallback) == ("det-general", reason)
    assert choice.route is not None and choice.probabilities  # what CLIP thought is still reported


def test_route_embedding_averages_normalised_prompts():
    table = RouteTable.from_config(
        "t",
        RouteTableConfig(routes=[{"name": "a", "expert": "x", "prompts": ["p1", "p2"]}], default_expert="x"),
        lambda prompts: np.stack([{"p1": E[0], "p2": E[1]}[p] for p in prompts]),
        logit_scale=0.0,
    )
    np.testing.assert_allclose(table.embeddings[0], unit(E[0] + E[1]), atol=1e-6)
    np.testing.assert_allclose(route_embedding(np.stack([3 * E[0], E[0]])), E[0])


class Recorder(SelectionObserver):
    def __init__(self) -> None:
        self.calls = []

    def on_choices(self, table, choices, seconds):
        self.calls.append((table, [c.fallback for c in choices]))


def test_a_clip_failure_routes_to_the_default_and_never_raises():
    def broken(images):
        raise RuntimeError("onnxruntime: bad allocation")

    recorder = Recorder()
    selector = ExpertSelector(broken, crafted_table(), observer=recorder)
    choices = selector.choose(["img", "img"])
    assert [(c.expert, c.fallback, c.route) for c in choices] == [("det-general", CLIP_ERROR, None)] * 2
    assert recorder.calls == [("detect", [CLIP_ERROR, CLIP_ERROR])]

    nan_row = np.stack([E[0], np.full(6, np.nan, np.float32)])
    choices = ExpertSelector(lambda images: nan_row, crafted_table()).choose(["a", "b"])
    assert [(c.expert, c.fallback) for c in choices] == [("det-murky", None), ("det-general", CLIP_ERROR)]


def test_drift_is_zero_on_the_reference_stream_and_grows_when_it_moves():
    rng = np.random.default_rng(0)
    same = unit(E[0] + 0.3 * E[1]) + rng.normal(0, 0.05, (300, 6))
    tracker = DriftTracker(reference_size=100, momentum=0.9)
    assert tracker.update(same[:50]) is None  # the reference is not complete yet
    assert tracker.update(same[50:]) < 0.01
    moved = unit(E[2] + 0.3 * E[1]) + rng.normal(0, 0.05, (100, 6))
    assert tracker.update(moved) > 0.5
    fixed = DriftTracker(reference=E[0])
    assert fixed.update(E[0:1]) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------- the app
def _png(size=(48, 40), color=(10, 120, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def routed_app(clip_dir, tmp_path_factory) -> Iterator[TestClient]:
    from service.http.app import create_app
    from service.settings import ModelConfig, Settings

    work = tmp_path_factory.mktemp("routing")
    build_constant_detector(work / "det.onnx", known_raw())
    routing = RoutingConfig(
        clip=clip_dir,
        threads=1,
        detectors=[
            {"name": "det-murky", "onnx": work / "det.onnx", "classes": DETECTOR_CLASSES},
            {"name": "det-general", "onnx": work / "det.onnx", "classes": DETECTOR_CLASSES, "score_threshold": 0.65},
        ],
        detect={
            "routes": [{"name": "murky", "expert": "det-murky", "prompts": PROMPTS["murky"]}],
            "default_expert": "det-general",
        },
        ensembles={
            "routed": {
                "routes": [
                    {"name": "clear", "expert": "cnn-a", "prompts": PROMPTS["clear"]},
                    {"name": "night", "expert": "cnn-b", "prompts": PROMPTS["night"]},
                ],
                "default_expert": "cnn-a",
                "min_probability": 1.0,  # a random CLIP is never that sure: every image falls back to cnn-a
            },
        },
        drift={"reference_size": 1},
    )
    settings = Settings(
        models=[
            ModelConfig(name="cnn-a", factory="helpers:small_bn_cnn", method="source", input_size=(8, 8)),
            ModelConfig(name="cnn-b", factory="helpers:small_bn_cnn", method="source", input_size=(8, 8),
                        runtime="onnx"),
        ],
        routing=routing,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_detect_route_returns_boxes_expert_and_routing(routed_app):
    files = [("files", ("wide.png", _png((32, 16)), "image/png")), ("files", ("b.png", _png((64, 64)), "image/png"))]
    r = routed_app.post("/v1/detect", files=files)
    assert r.status_code == 200, r.text
    wide, square = r.json()["results"]
    assert (wide["width"], wide["height"], wide["expert"]) == (32, 16, "det-murky")
    assert wide["routing"] | {"probabilities": None} == {
        "table": "detect", "route": "murky", "probability": 1.0, "margin": 1.0,
        "cosine": wide["routing"]["cosine"], "fallback": None, "probabilities": None,
    }
    assert [(b["class_name"], round(b["score"], 2)) for b in square["boxes"]] == [
        (DETECTOR_CLASSES[c], s) for _, c, s in EXPECTED_INPUT_BOXES
    ]
    np.testing.assert_allclose(square["boxes"][0]["box"], EXPECTED_INPUT_BOXES[0][0], atol=1e-4)  # 64 px: scale 1
    np.testing.assert_allclose(wide["boxes"][0]["box"], (7.5, 4.5, 12.5, 9.5), atol=1e-4)


def test_detect_serves_from_the_default_expert_when_clip_fails(routed_app, monkeypatch):
    routing = routed_app.app.state.routing

    def broken(*args, **kwargs):
        raise RuntimeError("CLIP is down")

    monkeypatch.setattr(routing.clip.image_session, "run", broken, raising=False)
    r = routed_app.post("/v1/detect", files=[("files", ("a.png", _png((64, 64)), "image/png"))])
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert (result["expert"], result["routing"]["fallback"], result["routing"]["route"]) == (
        "det-general", "clip_error", None
    )
    assert [round(b["score"], 2) for b in result["boxes"]] == [0.9, 0.7]  # det-general's threshold is 0.65
    metrics = routed_app.get("/metrics").text
    assert 'tta_routing_fallbacks_total{reason="clip_error",table="detect"} 1.0' in metrics


def test_routed_ensemble_answers_on_the_predict_route(routed_app):
    files = [("files", (f"{i}.png", _png(color=(i * 40, 0, 0)), "image/png")) for i in range(3)]
    r = routed_app.post("/v1/models/routed/predict", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "routed" and len(body["predictions"]) == 3
    for p in body["predictions"]:
        assert p["expert"] == "cnn-a" and p["routing"]["fallback"] == "low_probability"
        assert set(p["routing"]["probabilities"]) == {"clear", "night"} and len(p["top_k"]) == 2
    plain = routed_app.post("/v1/models/cnn-b/predict", files=files[:1])  # other names reach the usual route
    assert plain.status_code == 200 and "expert" not in plain.json()["predictions"][0]


def test_routing_info_and_metrics(routed_app):
    routed_app.post("/v1/detect", files=[("files", ("a.png", _png(), "image/png"))])
    info = routed_app.get("/v1/routing").json()
    assert info["embed_dim"] == 16 and info["detectors"] == ["det-general", "det-murky"]
    tables = {t["name"]: t for t in info["tables"]}
    assert tables["detect"]["drift"] is not None and tables["routed"]["default_expert"] == "cnn-a"
    metrics = routed_app.get("/metrics").text
    for line in (
        'tta_routed_images_total{route="murky",table="detect"}',
        'tta_routing_fallbacks_total{reason="low_probability",table="routed"}',
        'tta_clip_duration_seconds_count{table="detect"}',
        'tta_embedding_drift{table="detect"}',
        'tta_detections_total{detector="det-murky"}',
    ):
        assert line in metrics


def test_routing_configuration_errors_name_the_problem(clip_dir):
    bad = RoutingConfig(
        clip=clip_dir,
        ensembles={"mix": {"routes": [{"name": "a", "expert": "nope", "prompts": ["x"]}], "default_expert": "cnn"}},
    )
    with pytest.raises(RoutingLoadError, match=r"routing.ensembles.mix: experts \['nope'\] are not served models"):
        build_routing(bad, ["cnn"])
    with pytest.raises(ValueError, match="are not configured detectors"):
        RoutingConfig(clip=clip_dir, detect={"routes": [{"name": "a", "expert": "d", "prompts": ["x"]}],
                                             "default_expert": "d"})


def test_config_file_paths_are_relative_to_the_file(clip_dir, tmp_path):
    from service.composition import build_registry, routing_for_app
    from service.metrics import ServiceMetrics
    from service.settings import load_settings

    shutil.copytree(clip_dir, tmp_path / "clip")
    build_constant_detector(tmp_path / "det.onnx", known_raw())
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "cnn", "factory": "helpers:small_bn_cnn", "method": "source", "input_size": [8, 8]}],
        "routing": {
            "clip": "clip",
            "detectors": [{"name": "d", "onnx": "det.onnx", "classes": DETECTOR_CLASSES}],
            "detect": {"routes": [{"name": "a", "expert": "d", "prompts": PROMPTS["clear"]}], "default_expert": "d"},
        },
    }))
    settings = load_settings(config)
    routing = routing_for_app(settings, build_registry(settings), ServiceMetrics())
    assert routing.clip.directory == tmp_path / "clip" and set(routing.detectors) == {"d"}


def test_export_command_fails_cleanly_on_a_bad_source(tmp_path):
    from service.cli import app

    result = CliRunner().invoke(app, ["export-clip", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "is not a transformers CLIP folder" in result.output


# ---------------------------------------------------------------------------------------- the frozen fast path
def test_onnx_runtime_serves_a_frozen_classifier_like_pytorch(resnet20_weights):
    from adapters.models import build_cifar_resnet
    from service.model_sources import LoadedModel
    from service.onnx_classifier import OnnxModule, to_onnx_runtime
    from service.settings import ModelConfig

    config = ModelConfig(name="r20", architecture="resnet20", method="source", runtime="onnx")
    module = build_cifar_resnet("resnet20", resnet20_weights).eval()
    loaded = to_onnx_runtime(config, LoadedModel(module, [str(i) for i in range(10)], None), threads=1)
    assert isinstance(loaded.module, OnnxModule)
    x = torch.rand(7, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), module(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="runtime 'onnx' serves frozen models only"):
        ModelConfig(name="r20", architecture="resnet20", method="eata", runtime="onnx")


def test_a_frozen_model_on_the_cpu_is_served_by_onnxruntime_by_default_and_falls_back_to_pytorch(caplog):
    from service.composition import EngineFactory
    from service.onnx_classifier import OnnxModule
    from service.settings import ModelConfig, Settings

    def served_module(config: ModelConfig) -> torch.nn.Module:
        return EngineFactory(Settings(models=[config], device="cpu"))(config).source.model

    frozen = ModelConfig(name="d", architecture="digits", method="source")
    assert frozen.runtime == "auto" and isinstance(served_module(frozen), OnnxModule)
    assert not isinstance(served_module(frozen.model_copy(update={"runtime": "torch"})), OnnxModule)
    assert not isinstance(served_module(ModelConfig(name="d", architecture="digits", method="eata")), OnnxModule)
    # A model onnxruntime cannot run: 'auto' serves it with PyTorch and says why; 'onnx' refuses it.
    unexportable = ModelConfig(name="u", factory="helpers:unexportable_cnn", input_size=(8, 8), method="source",
                               classes=[str(i) for i in range(10)])
    assert not isinstance(served_module(unexportable), OnnxModule)
    assert "cannot serve with onnxruntime" in caplog.text and "serving it with PyTorch" in caplog.text
