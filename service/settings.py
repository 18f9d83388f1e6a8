"""Server and model configuration: environment variables (``TTA_...``) plus a YAML/TOML model file.

Bad configuration fails at start-up with a message naming the field, never at the first request.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import adapters
from service.clip.config import RoutingConfig
from service.errors import ConfigError

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BUILTIN_ARCHITECTURES = ("digits", "resnet20", "resnet32", "resnet44", "resnet56")


#: What ``correlated_traffic`` serves, per value. ``auto`` (the default): the papers while the traffic looks
#: i.i.d.; while it looks class-correlated (:class:`adapters.correlation.CorrelationSwitch`, per stream) the
#: probe's normalisation (shallow BatchNorm layers the batch's statistics, deep ones the source's), no update,
#: and LAME's output correction on batches whose predicted classes are less diverse than an i.i.d. batch's.
#: ``always``: the correlated mode of ``auto`` throughout. ``never``: the papers. Thresholds chosen on the
#: validation corruptions (docs/benchmarks.md, "Class-correlated streams"), never on the reported stream.
_CORRELATED_MODE = {"bn_stats": "auto", "lame": {"enabled": True, "max_class_diversity": 0.9}}
CORRELATED_TRAFFIC: dict[str, dict[str, dict[str, Any]]] = {
    "always": {"batch_statistics": _CORRELATED_MODE | {"bn_switch": {"always_correlated": True}}, "updates": {}},
    "auto": {"batch_statistics": _CORRELATED_MODE, "updates": {}},
    "never": {"batch_statistics": {}, "updates": {}},
}
CorrelatedTraffic = Literal["auto", "always", "never"]


def correlated_traffic_options(method: str, value: CorrelatedTraffic) -> dict[str, Any]:
    """The options ``correlated_traffic: value`` adds for ``method`` (the server and ``tta-serve bench
    --correlated-traffic`` both use this; options set explicitly win over them)."""
    spec = adapters.METHODS[method]
    preset = CORRELATED_TRAFFIC[value]
    options: dict[str, Any] = {}
    if spec.uses_batch_statistics:
        options |= preset["batch_statistics"]
        if spec.updates_parameters:
            options |= preset["updates"]
    return options


#: ``efficiency``: ``papers`` runs EATA and EATA-C as published; ``efficient`` predicts without gradient, then
#: forwards and back-propagates only the least redundant quarter of each batch's selected samples, with a higher
#: learning rate: about 1.75 forward passes per image instead of 3. Chosen on the validation corruptions as the
#: cheapest variant within 0.5 points of the papers' error (docs/benchmarks.md, "An efficient EATA preset");
#: a tighter redundancy threshold cost 1.2 points or more there.
EFFICIENCY: dict[str, dict[str, Any]] = {
    "papers": {},
    "efficient": {"backward": "selected", "max_selected": 0.25, "lr": 0.0015},
}
Efficiency = Literal["papers", "efficient"]


def efficiency_options(method: str, value: Efficiency) -> dict[str, Any]:
    """The options ``efficiency: value`` adds for ``method``: none for a method without EATA's redundancy
    filter (the server refuses ``efficient`` for such a method; the bench leaves it as it is)."""
    if "redundancy_eps" not in adapters.METHODS[method].Options.model_fields:
        return {}
    return dict(EFFICIENCY[value])


class ModelConfig(BaseModel):
    """One served model: where it comes from, how inputs are prepared, and how it adapts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="URL-safe model name")
    architecture: str | None = Field(None, description=f"built-in architecture: {', '.join(BUILTIN_ARCHITECTURES)}")
    torchscript: Path | None = Field(None, description="a TorchScript file (torch.jit.save)")
    factory: str | None = Field(None, description="'module:function' returning an nn.Module")
    weights: Path | None = Field(None, description="state dict (.pt/.th with weights_only, or .safetensors)")
    classes: list[str] | None = Field(None, description="class names; default from the architecture")
    input_size: tuple[int, int] = Field((32, 32), description="height, width the model expects")
    mean: tuple[float, float, float] | None = Field(None, description="normalisation applied before the model")
    std: tuple[float, float, float] | None = None
    method: str = Field("eata", description="adaptation method: source, norm, tent, eata, eata-c")
    options: dict[str, Any] = Field(default_factory=dict, description="method options (see adapters)")
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: answer from the forward pass that adapts; async: adapt off the request path"
    )
    efficiency: Efficiency = Field(
        "papers", description="'papers': EATA/EATA-C as published; 'efficient': back-propagation through the least "
        "redundant quarter of each batch only, with a higher learning rate: fewer passes per image for a few tenths "
        "of a point of error (EFFICIENCY in service/settings.py, docs/benchmarks.md); options set explicitly win"
    )
    correlated_traffic: CorrelatedTraffic = Field(
        "auto", description="class-correlated traffic (a camera seeing one kind of object at a time): 'auto' "
        "serves the papers' batch statistics while traffic looks i.i.d. and switches to robust BatchNorm "
        "statistics, no update on batches that look correlated and LAME on such batches while it looks "
        "correlated; 'always' serves the latter throughout; 'never' the papers (CORRELATED_TRAFFIC in "
        "service/settings.py; options set explicitly win; true/false mean always/never)"
    )
    @field_validator("correlated_traffic", mode="before")
    @classmethod
    def _correlated_traffic_bool(cls, value: Any) -> Any:
        """``true``/``false`` (the setting's first form) mean ``always``/``never``."""
        return {True: "always", False: "never"}.get(value, value) if isinstance(value, bool) else value

    fisher: Path | None = Field(None, description="a saved Fisher file for eata/eata-c")
    fisher_data: Path | None = Field(None, description="clean images to estimate Fisher: an npz (x uint8 "
                                       "NxHxWx3, y), cifar-10-python.tar.gz or its cifar-10-batches-py/ folder")
    fisher_size: int = Field(500, ge=1, description="clean images used from fisher_data")
    confidence_data: Path | None = Field(
        None, description="eata-c: clean labelled images (npz x uint8 NxHxWx3 and y, or CIFAR-10 python data) to fit "
        "its confidence map at start-up (confidence 'fitted', adapters.fit_confidence_map); calibrated on clean and "
        "shifted traffic alike (docs/benchmarks.md); default: fisher_data (it holds labels), or the digits model's "
        "clean split"
    )
    confidence_size: int = Field(2000, ge=2, description="images used from confidence_data")
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="how long a batch waits to fill (default 0: a batch is whatever queued "
        "while the model was busy, as Triton's default); counted from the oldest request's arrival, or for models "
        "adapting in sync mode from when the model is free"
    )
    min_adapt_batch: int = Field(
        16, ge=1, description="batches smaller than this are answered with recent inputs as BN context"
    )
    context_size: int = Field(64, ge=0, description="recent inputs kept as BatchNorm context for small batches")
    recent_statistics: bool = Field(
        True, description="normalise batches smaller than min_adapt_batch with moving averages of the BatchNorm "
        "statistics of recent large batches (a forward pass at the batch's own size) while such averages were "
        "recorded within the last recent_statistics_images small-batch images; otherwise pad with the context "
        "(which records new averages)"
    )
    recent_statistics_images: int = Field(
        256, ge=1, description="small-batch images the recent statistics may serve before a padded forward pass "
        "refreshes them (adaptation steps and large batches refresh them too)"
    )
    adapt_queue_size: int = Field(8, ge=1, description="async mode: pending adaptation batches before dropping")
    adapt_time_share: float = Field(
        0.2, gt=0, le=1, description="async mode: most of the model thread's time adaptation steps may take, so "
        "requests arriving during a step wait little (1: a step whenever no request waits); the rest is dropped "
        "and counted when the queue is full"
    )
    adapt_min_share: float = Field(
        0.1, ge=0, le=1, description="share of the model thread's time that queued background work (async "
        "adaptation steps, steps on accumulated small batches, probe evaluations) gets even while requests wait, "
        "so a saturated model still adapts and its forgetting probe stays current (0: only on spare capacity); at "
        "most adapt_time_share"
    )
    adapt_traffic_share: float = Field(
        0.0, ge=0, le=1, description="async mode: share of the served images that adaptation steps on even while "
        "requests wait (saturation), whatever the load; a step runs ahead of waiting requests once the images "
        "served since earn it (0: only adapt_min_share's time). The served images it does not cover are adapted "
        "on as spare capacity and adapt_time_share allow"
    )
    max_images_per_request: int = Field(64, ge=1)
    collapse_guard: bool = Field(True, description="reset on collapse signals (library default is off)")
    health_window: int = Field(
        1000, ge=10, description="recent predictions behind the predicted-class entropy, mean confidence and "
        "source-agreement gauges (docs/monitoring.md)"
    )
    agreement_fraction: float = Field(
        0.1, ge=0, le=1, description="share of served batches re-run through the frozen source model "
        "(onnxruntime) to measure agreement; 0 turns it off"
    )
    probe_data: Path | None = Field(
        None, description="npz of labelled clean images (x uint8 NxHxWx3, y) to measure forgetting; "
        "the built-in digits model uses its held-out split"
    )
    probe_size: int = Field(500, ge=1, description="probe images used from probe_data")
    probe_every_s: float = Field(300.0, ge=0, description="seconds between probe evaluations; 0: on demand only")
    reset_when_worse_than_source: float | None = Field(
        0.05, ge=0, le=1, description="reset the adapter when a probe evaluation finds the adapted model's accuracy "
        "this much (a ratio) below the frozen source model's: adaptation must never leave a model worse than not "
        "adapting (reason 'worse_than_source'); null: only report it"
    )
    role: Literal["independent", "leader", "follower"] = Field(
        "independent",
        description="with TTA_REDIS_URL: 'leader' adapts and publishes, 'follower' serves the leader's "
        "parameters (and takes over when the leader's lease lapses), 'independent' adapts alone and "
        "shares only the redundancy moving average",
    )
    resume_snapshot: str | None = Field(None, description="named snapshot to load at start-up (Redis store)")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="'onnx': serve a frozen (method 'source') model with onnxruntime from an ONNX export; "
        "'auto': that for a frozen model on the CPU (measured 1.1-1.3x PyTorch's images/s, docs/benchmarks.md), "
        "falling back to PyTorch with a warning when the export fails; PyTorch for everything else"
    )
    trace_source: bool = Field(
        True, description="answer with the frozen source model (method 'source', and small batches before any "
        "BatchNorm context) from a traced, frozen TorchScript graph: BatchNorm folded into convolutions, no Python "
        "between layers; falls back to eager, with a warning, when the model cannot be traced"
    )
    channels_last: bool = Field(
        True, description="keep convolution weights and inputs channels-last (NHWC): oneDNN runs CIFAR ResNets "
        "1.3-1.7x faster on CPU this way; no effect on results beyond float rounding"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [s for s in (self.architecture, self.torchscript, self.factory) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of 'architecture', 'torchscript' or 'factory'")
        if self.architecture is not None and self.architecture not in BUILTIN_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not built in; choose one of {list(BUILTIN_ARCHITECTURES)}"
            )
        if self.factory is not None and ":" not in self.factory:
            raise ValueError("factory must look like 'package.module:function'")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both 'mean' and 'std', or neither")
        if self.efficiency != "papers" and self.method in adapters.METHODS and not efficiency_options(
                self.method, self.efficiency):
            raise ValueError(f"efficiency {self.efficiency!r} tunes EATA's redundancy filter; method {self.method!r} "
                             "has none (use eata or eata-c)")
        if self.confidence_data is not None and self.method != "eata-c":
            raise ValueError(f"'confidence_data' fits eata-c's confidence map; method {self.method!r} has none")
        try:
            adapters.method_options(self.method, **self.effective_options())
        except adapters.AdapterConfigError as exc:
            raise ValueError(str(exc)) from None
        if (self.fisher or self.fisher_data) and not adapters.METHODS[self.method].uses_fisher:
            with_fisher = sorted(name for name, cls in adapters.METHODS.items() if cls.uses_fisher)
            raise ValueError(f"'fisher'/'fisher_data' only apply to {', '.join(with_fisher)}, not {self.method!r}")
        return self

    @model_validator(mode="after")
    def _onnx_is_frozen(self) -> ModelConfig:
        if self.runtime == "onnx" and self.method != "source":
            raise ValueError(f"runtime 'onnx' serves frozen models only: set method 'source' (not {self.method!r})")
        return self

    @property
    def adapts_in_sync(self) -> bool:
        """Whether answers come from the forward pass of an adaptation step (the batching policy differs)."""
        return self.mode == "sync" and adapters.METHODS[self.method].updates_parameters

    @property
    def fits_confidence_map(self) -> bool:
        """Whether start-up fits EATA-C's confidence map: labelled clean data at hand (``confidence_data``, else
        ``fisher_data``, else the built-in digits model's clean split) and neither another confidence nor a map
        configured."""
        has_data = self.confidence_data is not None or self.fisher_data is not None or self.architecture == "digits"
        return has_data and adapters.wants_fitted_confidence_map(self.method, self.options)

    def effective_options(self, confidence_map: tuple[float, float] | None = None) -> dict[str, Any]:
        """Method options with the service's defaults applied (options set in the config always win):
        the collapse guard, for ``correlated_traffic`` the options of :data:`CORRELATED_TRAFFIC`, for
        ``efficiency`` those of :data:`EFFICIENCY`, and with
        labelled clean data (:attr:`fits_confidence_map`) EATA-C's fitted confidence (``confidence_map``: the
        map fitted at start-up; before it exists, validation uses the identity map)."""
        options = dict(self.options)
        if self.fits_confidence_map:
            options.setdefault("confidence", "fitted")
            options.setdefault("confidence_map", confidence_map or (0.0, 1.0))
        method = adapters.METHODS.get(self.method)  # an unknown one is refused by the validator
        if method is None:
            return options
        if self.collapse_guard and method.updates_parameters:
            options.setdefault("guard", {"enabled": True})
        for key, value in correlated_traffic_options(self.method, self.correlated_traffic).items():
            options.setdefault(key, value)
        for key, value in efficiency_options(self.method, self.efficiency).items():
            options.setdefault(key, value)
        return options


class Settings(BaseSettings):
    """Server settings. Every field can be set as ``TTA_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="TTA_", extra="ignore")

    config: Path | None = Field(None, description="YAML or TOML file listing models (and server settings)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="also serve the v2 gRPC protocol (KServe/Triton) on this port, same "
        "engines (needs the grpc extra: pip install 'tta-serve[grpc]'); null: off"
    )
    admin_token: SecretStr | None = Field(None, description="bearer token required by admin routes")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per log line (time, level, logger, message, request_id)"
    )
    allow_unauthenticated_admin: bool = Field(
        False, description="without admin_token, admin routes are open only while the server listens on a loopback "
        "address; true opens them on every address (logged as a warning at start-up)"
    )
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; default: every core when a model adapts in sync mode "
        "(its steps are compute-bound), else one per core less one, left to the HTTP event loop (docs/serving.md)"
    )
    tune_allocator: bool = Field(
        True, description="raise glibc's mmap and trim thresholds at start-up so tensor-sized allocations stay in "
        "the heap instead of page-faulting on every batch (service/allocator.py; no effect off glibc)"
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_json_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest JSON part of a v2 inference request: JSON numbers cost "
        "about 18x their text in memory while parsed (binary tensors cost nothing extra; send those instead)"
    )
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest decoded image (width x height)")
    feedback_window: int = Field(1000, ge=1, description="labelled predictions in the online accuracy/ECE window")
    prediction_memory: int = Field(100_000, ge=1, description="recent request ids kept for delayed feedback")
    redis_url: SecretStr | None = Field(
        None, description="shared state in Redis (moving average, snapshots, replicas); secret: it may hold a password"
    )
    replica_id: str | None = Field(None, description="this replica's name in the leader lease (default host-pid)")
    lease_ttl_ms: int = Field(3000, ge=200, description="leader lease expiry; a follower takes over after it")
    sync_interval_ms: int = Field(500, ge=10, description="how often followers poll for newer parameters")
    workers: int | None = Field(
        None, ge=0, le=256, description="server processes sharing the port (SO_REUSEPORT, Linux): worker 0 adapts and "
        "publishes its weights through a local run directory, the others serve them (docs/serving.md, 'Several "
        "worker processes'); 0: one per usable core; default: one per usable core when every model is frozen "
        "(method source, no routing: measured 1.4x at 32 clients on 2 cores), else 1 (more workers adapt on a "
        "share of the traffic only)"
    )
    models: list[ModelConfig] = Field(default_factory=list)
    routing: RoutingConfig | None = Field(None, description="CLIP-guided expert selection and detectors (docs/clip.md)")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {duplicates}")
        return models

    def resolved_models(self) -> list[ModelConfig]:
        """The configured models, or the built-in ``digits`` default when none is configured."""
        return self.models or [default_model()]

    def resolved_workers(self) -> int:
        """Server processes to run: ``workers``, with 0 meaning one per usable core; unset, one per usable core
        where every model is frozen (nothing to adapt, so every process serves the same answers) and 1 where a
        model adapts (followers serve worker 0's weights, and worker 0 learns only from its share)."""
        if self.workers is None:
            frozen = self.routing is None and all(m.method == "source" for m in self.resolved_models())
            return usable_cores() if frozen else 1
        return self.workers or usable_cores()

    def admin_access(self) -> Literal["token", "open", "refused"]:
        """How admin routes are guarded: by the token; open (no token, loopback or explicitly allowed);
        or refused (no token on an address others can reach: an exposed server is never open by default)."""
        if self.admin_token is not None and self.admin_token.get_secret_value():
            return "token"
        if self.allow_unauthenticated_admin or is_loopback(self.host):
            return "open"
        return "refused"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``; any name else is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_model() -> ModelConfig:
    """The zero-configuration model: the digits CNN adapting with EATA."""
    return ModelConfig(name="digits", architecture="digits", method="eata")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Model file paths in a config file are relative to that file."""
    for model in data.get("models", []) or []:
        if isinstance(model, dict):
            for key in ("torchscript", "weights", "fisher", "fisher_data", "probe_data", "confidence_data"):
                if isinstance(model.get(key), str) and not Path(model[key]).is_absolute():
                    model[key] = str(base / model[key])
    return data


def load_settings(config: Path | None = None, **flags: Any) -> Settings:
    """Settings from, highest first: ``flags`` (None = not given), ``TTA_*`` variables, the config file, defaults.

    The config file is ``config`` or ``$TTA_CONFIG``. An unknown key anywhere in it fails with the key's
    path and the closest valid name, never as a silently ignored setting.
    """
    try:
        env = Settings()
        path = config or env.config
        data: dict[str, Any] = _relative_paths(_read_file(path), path.parent) if path else {}
        _refuse_unknown_keys(data, path)
        from_file = {k: v for k, v in data.items() if k not in env.model_fields_set}  # the environment wins
        given = {k: v for k, v in flags.items() if v is not None}
        settings = Settings(**from_file, **given) if from_file or given else env
        if path:
            settings.config = path
        return settings
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _refuse_unknown_keys(data: dict[str, Any], path: Path | None) -> None:
    """Top-level keys must be settings (nested models forbid extras themselves)."""
    known = set(Settings.model_fields)
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(
            "invalid configuration:\n  "
            + "\n  ".join(f"{key}: unknown setting in {path}{_did_you_mean(str(key), known)}" for key in unknown)
        )


def _did_you_mean(key: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    """The field names valid at ``loc`` (the location of an unknown key), walking nested models."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return set()
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation)) if _is_model(a)]
        nested += [a for arg in typing.get_args(field.annotation) for a in typing.get_args(arg) if _is_model(a)]
        if not nested:
            return set()
        model = nested[0]
    return set(model.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path (e.g. ``models.0.method``)."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"]
        if err["type"] == "extra_forbidden" and err["loc"]:
            model = exc.title and _MODELS_BY_TITLE.get(exc.title)
            candidates = _fields_at(model, err["loc"]) if model else set()
            message = f"unknown setting{_did_you_mean(str(err['loc'][-1]), candidates)}"
        lines.append(f"{where}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


_MODELS_BY_TITLE: dict[str, type[BaseModel]] = {"Settings": Settings, "ModelConfig": ModelConfig}
