"""The ``routing`` block of the server configuration: the CLIP model, ONNX detectors and route tables.

A route table maps route names to an expert and the prompts that describe the imaging conditions the
expert is good at. The table behind ``POST /v1/detect`` routes to ONNX detectors; each entry of
``ensembles`` routes to classifiers from ``models`` (engines that may adapt) and is served as a
model of its own at ``/v1/models/{name}/predict``. Names of experts in ensembles are checked against
the served models when the app starts (they live in another part of the configuration).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # the same rule as model names (URL-safe)


class DetectorConfig(BaseModel):
    """One ONNX object detector with the single-output YOLOv8 layout (boxes + class scores per anchor)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    onnx: Path = Field(description="the .onnx file (relative paths: to the config file)")
    classes: list[str] = Field(min_length=1, description="class names, in the model's output order")
    input_size: tuple[int, int] | None = Field(
        None, description="height, width of the letterboxed input; default: the model's static input shape"
    )
    score_threshold: float = Field(0.25, ge=0, le=1, description="boxes below this class score are dropped")
    iou_threshold: float = Field(0.45, gt=0, le=1, description="NMS: overlap above which the weaker box goes")
    max_detections: int = Field(300, ge=1, description="boxes kept per image after NMS")
    class_agnostic: bool = Field(False, description="NMS across classes instead of per class")


class RouteConfig(BaseModel):
    """A route: the expert to run and prompts describing the images it should get."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    expert: str = Field(description="a detector name (detect table) or a served model name (ensembles)")
    prompts: list[str] = Field(min_length=1, description="imaging conditions, e.g. 'a photo in murky green water'")

    @field_validator("prompts")
    @classmethod
    def _non_blank(cls, prompts: list[str]) -> list[str]:
        if any(not p.strip() for p in prompts):
            raise ValueError("prompts must not be blank")
        return prompts


class RouteTableConfig(BaseModel):
    """Routes plus the rules for falling back to the default expert."""

    model_config = ConfigDict(extra="forbid")

    routes: list[RouteConfig] = Field(min_length=1)
    default_expert: str = Field(description="runs when CLIP is unsure or fails")
    min_probability: float = Field(0.0, ge=0, le=1, description="fall back below this routing probability")
    min_margin: float = Field(0.0, ge=0, le=1, description="fall back when best minus second probability is below")
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="fall back when the best route's cosine similarity is below"
    )
    logit_scale: float | None = Field(
        None, description="log of the softmax multiplier (cosines x exp(logit_scale)); default: the model's"
    )

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, routes: list[RouteConfig]) -> list[RouteConfig]:
        names = [r.name for r in routes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate route names: {duplicates}")
        return routes

    def experts(self) -> list[str]:
        """Every expert the table can run (routes' and the default), without repeats, in order."""
        return list(dict.fromkeys([*(r.expert for r in self.routes), self.default_expert]))


class DriftConfig(BaseModel):
    """The label-free shift signal: a moving centroid of image embeddings against a reference one."""

    model_config = ConfigDict(extra="forbid")

    reference_size: int = Field(256, ge=1, description="first images averaged into the reference centroid")
    momentum: float = Field(0.99, ge=0, lt=1, description="moving centroid: c <- m*c + (1-m)*embedding")
    reference: Path | None = Field(None, description="a .npy reference centroid instead of the first images")


class RoutingConfig(BaseModel):
    """CLIP-guided expert selection (``docs/clip.md``)."""

    model_config = ConfigDict(extra="forbid")

    clip: Path = Field(description="directory written by 'tta-serve export-clip' (manifest.json + ONNX towers)")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads for CLIP and detectors")
    detectors: list[DetectorConfig] = Field(default_factory=list)
    detect: RouteTableConfig | None = Field(None, description="the route table behind POST /v1/detect")
    ensembles: dict[str, RouteTableConfig] = Field(
        default_factory=dict, description="routed classifiers, each served at /v1/models/{name}/predict"
    )
    drift: DriftConfig = Field(default_factory=DriftConfig)
    max_images_per_request: int = Field(16, ge=1, description="images in one POST /v1/detect")

    @model_validator(mode="after")
    def _consistent(self) -> RoutingConfig:
        names = [d.name for d in self.detectors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate detector names: {duplicates}")
        if self.detect is not None:
            unknown = [e for e in self.detect.experts() if e not in names]
            if unknown:
                raise ValueError(f"detect: experts {unknown} are not configured detectors (known: {names})")
        for name in self.ensembles:
            if not _valid_name(name):
                raise ValueError(f"ensemble name {name!r} must be URL-safe: letters, digits, '_', '.', '-'")
        if "detect" in self.ensembles:
            raise ValueError("'detect' names the detection table; choose another ensemble name")
        return self

    def resolve_paths(self, base: Path) -> RoutingConfig:
        """A copy with relative file paths taken relative to ``base`` (the config file's folder)."""

        def rel(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else base / path

        return self.model_copy(
            update={
                "clip": rel(self.clip),
                "detectors": [d.model_copy(update={"onnx": rel(d.onnx)}) for d in self.detectors],
                "drift": self.drift.model_copy(update={"reference": rel(self.drift.reference)}),
            }
        )

    def tables(self) -> dict[str, RouteTableConfig]:
        """Every route table by name: ``detect`` (if configured) and the ensembles."""
        tables = dict(self.ensembles)
        if self.detect is not None:
            tables = {"detect": self.detect, **tables}
        return tables


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None
