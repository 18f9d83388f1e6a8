"""The exported CLIP directory: ``manifest.json`` plus the ONNX towers, tokenizer and prompt embeddings.

    clip-dir/
      manifest.json      # this module's ClipManifest
      image.onnx         # pixel_values float32 [N, 3, S, S] -> image_embeds [N, D] (not normalised)
      text.onnx          # optional: input_ids int64 [N, L] (+ attention_mask) -> text_embeds [N, D]
      tokenizer.json     # optional, with text.onnx: a Hugging Face `tokenizers` file
      prompts.npz        # optional: prompts (str [P]) and their L2-normalised embeddings (float32 [P, D])

The manifest carries everything serving must reproduce exactly (preprocessing constants, logit
scale) and a SHA-256 per file, so a directory whose files were swapped fails to load instead of
routing with mismatched embeddings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "tta-serve-clip/1"
MANIFEST_FILE = "manifest.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLoadError(RuntimeError):
    """A CLIP directory that cannot be served; the message names the file and the problem."""


class ImageSpec(BaseModel):
    """The image tower and the exact preprocessing its training used."""

    model_config = ConfigDict(extra="forbid")

    file: str = "image.onnx"
    sha256: str | None = None
    input: str = "pixel_values"
    resize: int = Field(224, ge=1, description="the shortest side is resized to this")
    crop: int = Field(224, ge=1, description="then a centred square crop of this size")
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


class TextSpec(BaseModel):
    """The text tower and its tokenizer (only needed to embed prompts that are not precomputed)."""

    model_config = ConfigDict(extra="forbid")

    file: str = "text.onnx"
    sha256: str | None = None
    tokenizer: str = "tokenizer.json"
    tokenizer_sha256: str | None = None
    context_length: int = Field(77, ge=2)
    pad_id: int = Field(0, ge=0)
    eos_id: int | None = Field(None, description="forced into the last position of over-long prompts")


class PromptSpec(BaseModel):
    file: str = "prompts.npz"
    sha256: str | None = None
    count: int = Field(ge=0)


class ClipManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["tta-serve-clip/1"] = FORMAT
    model_id: str = Field(description="where the weights came from (checkpoint name or path)")
    source: str = Field(description="'transformers' or 'open_clip'")
    embed_dim: int = Field(ge=1)
    logit_scale: float = Field(description="log of the softmax multiplier; exp(4.6052) = 100 for trained CLIP")
    image: ImageSpec
    text: TextSpec | None = None
    prompts: PromptSpec | None = None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: Path) -> ClipManifest:
    """Read and check ``directory/manifest.json``: every named file exists and matches its hash."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ClipLoadError(f"{path} not found: export a CLIP model with 'tta-serve export-clip'")
    try:
        manifest = ClipManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ClipLoadError(f"{path}: {problems}") from None
    checks = [(manifest.image.file, manifest.image.sha256)]
    if manifest.text is not None:
        text = manifest.text
        checks += [(text.file, text.sha256), (text.tokenizer, text.tokenizer_sha256)]
    if manifest.prompts is not None:
        checks.append((manifest.prompts.file, manifest.prompts.sha256))
    for name, expected in checks:
        file = directory / name
        if not file.is_file():
            raise ClipLoadError(f"{path} names {name}, which is missing from {directory}")
        if expected is not None and sha256_file(file) != expected:
            raise ClipLoadError(f"{file} does not match the SHA-256 in {path} (file replaced or corrupted)")
    return manifest


def save_prompt_embeddings(path: Path, prompts: list[str], embeddings: np.ndarray) -> None:
    """Write prompts and their (already L2-normalised) embeddings for serving without a text tower."""
    if len(prompts) != embeddings.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {embeddings.shape[0]} embeddings")
    with open(path, "wb") as f:  # an open file: np.savez would append '.npz' to a bare name
        np.savez(f, prompts=np.array(prompts, dtype=np.str_), embeddings=embeddings.astype(np.float32))


def load_prompt_embeddings(path: Path) -> dict[str, np.ndarray]:
    """prompt text -> its normalised embedding, from a file written by :func:`save_prompt_embeddings`."""
    with np.load(path, allow_pickle=False) as data:
        prompts, embeddings = data["prompts"].tolist(), data["embeddings"].astype(np.float32)
    return dict(zip(prompts, embeddings, strict=True))
