"""Export a local CLIP checkpoint (transformers or open_clip) to the directory serving loads.

Offline: nothing is downloaded. The towers go through ``torch.onnx.export(..., dynamo=False)``, the
TorchScript-based exporter, which needs only the ``onnx`` package (the default dynamo exporter of
torch 2.13 also needs ``onnxscript``). Each exported tower is run on onnxruntime and compared with
PyTorch before the manifest is written, so a directory that exists is one that matched.

    transformers: a folder with config.json, the weights, and optionally tokenizer files and
                  preprocessor_config.json (mean, std, sizes); image and text towers are exported.
    open_clip:    a model name and a checkpoint file; the image tower is exported and prompts are
                  embedded at export time (open_clip's tokenizer has no `tokenizers` file).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.clip.manifest import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipManifest,
    ImageSpec,
    PromptSpec,
    TextSpec,
    save_prompt_embeddings,
    sha256_file,
)
from service.clip.towers import l2_normalize, make_session, tokenize_with
from service.onnx_export import exporting

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
TOLERANCE = 1e-3  # max |ONNX - PyTorch| relative to the embedding's scale


class ExportError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------- ONNX
def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_name: str,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Trace ``module`` to ``path`` with a dynamic batch axis (the legacy exporter: no onnxscript needed)."""
    axes = {name: {0: "batch"} for name in [*input_names, output_name]}
    with exporting():
        torch.onnx.export(
            module.eval(), example, str(path), input_names=input_names, output_names=[output_name],
            dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def check_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, what: str) -> float:
    """Run the exported file and PyTorch on ``inputs``; raise if they disagree. Returns the max difference."""
    with torch.no_grad():
        expected = module(*inputs.values()).float().numpy()
    (got,) = make_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})
    diff = float(np.abs(got - expected).max())
    scale = max(float(np.abs(expected).max()), 1e-6)
    if not diff <= TOLERANCE * scale:
        raise ExportError(f"{what}: onnxruntime and PyTorch differ by {diff:.3g} (scale {scale:.3g})")
    return diff


# ---------------------------------------------------------------------------------------- the directory
def write_clip_dir(
    out: Path,
    *,
    image_tower: nn.Module,
    image: ImageSpec,
    embed_dim: int,
    logit_scale: float,
    model_id: str,
    source: str,
    text_tower: nn.Module | None = None,
    tokenizer_json: Path | None = None,
    text: TextSpec | None = None,
    prompts: list[str] | None = None,
    embed_prompts: Callable[[list[str]], np.ndarray] | None = None,
    opset: int = DEFAULT_OPSET,
) -> ClipManifest:
    """Export towers, copy the tokenizer, embed prompts, and write the manifest last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = torch.randn(2, 3, image.crop, image.crop)
    image_path = out / image.file
    export_onnx(image_tower, (pixels,), image_path, [image.input], "image_embeds", opset)
    diff = check_onnx(image_tower, {image.input: torch.randn(3, 3, image.crop, image.crop)}, image_path, "image tower")
    log.info("image tower exported to %s (max |ONNX - PyTorch| = %.2g)", image_path, diff)
    image = image.model_copy(update={"sha256": sha256_file(image_path)})

    text_spec = None
    if text_tower is not None and tokenizer_json is not None and text is not None:
        text_path = out / text.file
        (out / text.tokenizer).write_bytes(Path(tokenizer_json).read_bytes())
        samples = ["a photo", "a photo of a fish in murky water"]
        ids, mask = tokenize_with(_tokenizer(out / text.tokenizer), samples, text)
        example = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        export_onnx(text_tower, tuple(example.values()), text_path, list(example), "text_embeds", opset)
        diff = check_onnx(text_tower, example, text_path, "text tower")
        log.info("text tower exported to %s (max |ONNX - PyTorch| = %.2g)", text_path, diff)
        text_spec = text.model_copy(
            update={"sha256": sha256_file(text_path), "tokenizer_sha256": sha256_file(out / text.tokenizer)}
        )

    prompt_spec = None
    if prompts:
        if embed_prompts is None:
            raise ExportError("prompts given but this checkpoint has no text tower to embed them")
        unique = list(dict.fromkeys(prompts))
        spec = PromptSpec(count=len(unique))
        save_prompt_embeddings(out / spec.file, unique, l2_normalize(embed_prompts(unique)))
        prompt_spec = spec.model_copy(update={"sha256": sha256_file(out / spec.file)})

    manifest = ClipManifest(
        model_id=model_id, source=source, embed_dim=embed_dim, logit_scale=logit_scale,
        image=image, text=text_spec, prompts=prompt_spec,
    )
    manifest.save(out)
    return manifest


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ---------------------------------------------------------------------------------------- transformers
class HFImageTower(nn.Module):
    """pixel_values -> projected image embedding (not normalised)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class HFTextTower(nn.Module):
    """input_ids, attention_mask -> projected text embedding (not normalised)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output)


def hf_image_spec(source: Path, image_size: int) -> ImageSpec:
    """Preprocessing constants from the checkpoint's preprocessor_config.json (OpenAI's when absent)."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        log.warning("%s not found: using OpenAI CLIP's mean/std and the model's image size %d", path, image_size)
        return ImageSpec(resize=image_size, crop=image_size)
    cfg = json.loads(path.read_text())
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        if "shortest_edge" not in size:
            raise ExportError(f"{path}: size {size} is not a shortest-edge resize (only resize + centre crop)")
        size = size["shortest_edge"]
    crop = cfg.get("crop_size", size) if cfg.get("do_center_crop", True) else size
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge"))
    resample = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3))
    if resample is None:
        raise ExportError(f"{path}: resample {cfg.get('resample')} is not bilinear (2) or bicubic (3)")
    if int(crop) != image_size:
        raise ExportError(f"{path}: crop size {crop} differs from the model's image size {image_size}")
    return ImageSpec(
        resize=int(size), crop=int(crop), interpolation=resample,
        mean=tuple(cfg.get("image_mean", OPENAI_MEAN)), std=tuple(cfg.get("image_std", OPENAI_STD)),
    )


def export_transformers(
    source: Path, out: Path, *, prompts: list[str] | None = None, text: bool = True, opset: int = DEFAULT_OPSET
) -> ClipManifest:
    """A local transformers CLIP folder -> the serving directory (image tower, text tower + tokenizer if present)."""
    from transformers import AutoTokenizer, CLIPModel

    source = Path(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CLIPModel.from_pretrained(source, local_files_only=True).eval()
    cfg = model.config
    image = hf_image_spec(source, cfg.vision_config.image_size)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer in %s (%s): exporting without the text tower", source, exc)
    text_tower = tokenizer_json = text_spec = embed = None
    tmp = tempfile.TemporaryDirectory(prefix="tta-clip-tok-")  # the tokenizer file until it is copied
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        text_spec = TextSpec(
            context_length=cfg.text_config.max_position_embeddings,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            eos_id=tokenizer.eos_token_id,
        )
        tokenizer_json = Path(tmp.name) / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(tokenizer_json))
        hf_text = HFTextTower(model).eval()
        backend = _tokenizer(tokenizer_json)

        def embed(texts: list[str]) -> np.ndarray:
            ids, mask = tokenize_with(backend, texts, text_spec)
            with torch.no_grad():
                return hf_text(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()

        if text:
            text_tower = hf_text
    elif tokenizer is not None:
        log.warning("the tokenizer in %s is not a fast (tokenizers) one: exporting without the text tower", source)
    with tmp:
        return write_clip_dir(
            out, image_tower=HFImageTower(model).eval(), image=image, embed_dim=cfg.projection_dim,
            logit_scale=float(model.logit_scale.detach()), model_id=str(source), source="transformers",
            text_tower=text_tower, tokenizer_json=tokenizer_json, text=text_spec, prompts=prompts,
            embed_prompts=embed, opset=opset,
        )


# ---------------------------------------------------------------------------------------- open_clip
class OpenClipImageTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


def export_open_clip(
    model_name: str, checkpoint: Path, out: Path, *, prompts: list[str] | None = None, opset: int = DEFAULT_OPSET
) -> ClipManifest:
    """An open_clip model name + local checkpoint -> image tower and precomputed prompt embeddings."""
    try:
        import open_clip
    except ImportError:
        raise ExportError("exporting an open_clip checkpoint needs the open_clip_torch package") from None
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    model = model.eval()
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = size[0] if isinstance(size, list | tuple) else size
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ExportError(f"{model_name} uses resize_mode {cfg['resize_mode']!r}; only 'shortest' + centre crop")
    image = ImageSpec(
        resize=int(size), crop=int(size), interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_MEAN)),
        std=tuple(cfg.get("std", getattr(visual, "image_std", None) or OPENAI_STD)),
    )
    tokenizer = open_clip.get_tokenizer(model_name)

    def embed(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return model.encode_text(tokenizer(texts)).float().numpy()

    with torch.no_grad():
        embed_dim = int(model.encode_image(torch.zeros(1, 3, int(size), int(size))).shape[-1])
    return write_clip_dir(
        out, image_tower=OpenClipImageTower(model).eval(), image=image, embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.detach()), model_id=f"{model_name}:{checkpoint}", source="open_clip",
        prompts=prompts, embed_prompts=embed, opset=opset,
    )


# ---------------------------------------------------------------------------------------- prompts files
def read_prompts(path: Path) -> list[str]:
    """Prompts from a YAML/TOML file: a tta-serve config (its routing tables), a route -> prompts
    mapping, or a plain list."""
    import tomllib

    import yaml

    text = Path(path).read_text()
    data = tomllib.loads(text) if Path(path).suffix == ".toml" else yaml.safe_load(text)
    if isinstance(data, dict) and "routing" in data:
        from service.clip.config import RoutingConfig

        routing = RoutingConfig.model_validate(data["routing"])
        return [p for table in routing.tables().values() for r in table.routes for p in r.prompts]
    if isinstance(data, dict):
        return [p for value in data.values() for p in ([value] if isinstance(value, str) else value)]
    if isinstance(data, list):
        return [str(p) for p in data]
    raise ExportError(f"{path}: expected a tta-serve config, a mapping of route -> prompts, or a list of prompts")
