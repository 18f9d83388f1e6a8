"""CLIP's towers on onnxruntime: image embeddings per request, prompt embeddings once at start-up.

Embeddings leave this module L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.clip.manifest import ClipLoadError, ClipManifest, TextSpec, load_manifest, load_prompt_embeddings
from service.clip.preprocess import clip_batch


def make_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session; ``threads`` caps intra-op parallelism (None: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ClipLoadError(f"onnxruntime cannot load {path}: {exc}") from None


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ClipModel:
    """An exported CLIP directory (``service.clip.manifest``) ready to embed images and prompts."""

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.manifest: ClipManifest = load_manifest(self.directory)
        m = self.manifest
        self.image_session = make_session(self.directory / m.image.file, threads)
        inputs = [i.name for i in self.image_session.get_inputs()]
        if m.image.input not in inputs:
            raise ClipLoadError(f"{m.image.file} has inputs {inputs}, not {m.image.input!r}")
        self.text_session = None
        self._tokenizer = None
        if m.text is not None:
            self.text_session = make_session(self.directory / m.text.file, threads)
            self._tokenizer = _load_tokenizer(self.directory / m.text.tokenizer)
        self._prompt_cache: dict[str, np.ndarray] = {}
        if m.prompts is not None:
            self._prompt_cache = load_prompt_embeddings(self.directory / m.prompts.file)
        probe = self.embed_images(np.zeros((1, 3, m.image.crop, m.image.crop), np.float32))
        if probe.shape != (1, m.embed_dim):
            raise ClipLoadError(f"{m.image.file} returns shape {probe.shape[1:]}, the manifest says {m.embed_dim}")

    @property
    def logit_scale(self) -> float:
        return self.manifest.logit_scale

    # ------------------------------------------------------------------ images
    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, 3, S, S] -> normalised embeddings [N, D]."""
        (out,) = self.image_session.run(None, {self.manifest.image.input: np.ascontiguousarray(pixels, np.float32)})
        return l2_normalize(out.astype(np.float32))

    def embed_pil(self, images: list[Image.Image]) -> np.ndarray:
        """RGB images of any size -> normalised embeddings [N, D] (CLIP's exact preprocessing)."""
        return self.embed_images(clip_batch(images, self.manifest.image))

    # ------------------------------------------------------------------ prompts
    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        """Normalised embeddings [P, D]: precomputed ones from ``prompts.npz``, the rest by the text tower (cached)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            if self.text_session is None:
                raise ClipLoadError(
                    f"{self.directory} has no text tower and no precomputed embedding for prompts {missing}; "
                    "re-export with --prompts listing them (or with the text tower)"
                )
            for prompt, embedding in zip(missing, self._embed_texts(missing), strict=True):
                self._prompt_cache[prompt] = embedding
        return np.stack([self._prompt_cache[p] for p in prompts])

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 [N, context_length] (see :func:`tokenize_with`)."""
        if self.manifest.text is None or self._tokenizer is None:
            raise ClipLoadError(f"{self.directory} has no text tower")
        return tokenize_with(self._tokenizer, texts, self.manifest.text)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        assert self.text_session is not None
        ids, mask = self.tokenize(texts)
        names = [i.name for i in self.text_session.get_inputs()]
        feeds = {"input_ids": ids}
        if "attention_mask" in names:
            feeds["attention_mask"] = mask
        (out,) = self.text_session.run(None, feeds)
        return l2_normalize(out.astype(np.float32))


def tokenize_with(tokenizer, texts: list[str], spec: TextSpec) -> tuple[np.ndarray, np.ndarray]:
    """Ids and mask int64 [N, context_length]: padded with ``pad_id``, or cut keeping ``eos_id`` last.

    ``tokenizer`` is a `tokenizers.Tokenizer` whose post-processor adds the start and end tokens.
    """
    length = spec.context_length
    ids = np.full((len(texts), length), spec.pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(texts)):
        tokens = list(encoding.ids)
        if len(tokens) > length:
            tokens = tokens[:length]
            if spec.eos_id is not None:
                tokens[-1] = spec.eos_id
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ClipLoadError(
            f"{path.parent} has a text tower, which needs the 'tokenizers' package (pip install tokenizers); "
            "or export with precomputed prompt embeddings and no text tower"
        ) from None
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
