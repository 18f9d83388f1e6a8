"""The adapter base class: one protocol for every method.

The base owns the step (forward, sample selection, loss, backward, optimiser step), the counters,
reset and the state dict. A method only says how it selects samples and what its loss is, so adding
a method is adding one file (see ``adapters/methods``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from adapters.configure import (
    adaptable_parameters,
    model_device,
    model_hash,
    require_norm_layers,
    use_batch_statistics,
)
from adapters.correlation import ClassMixMonitor, CorrelationSwitch, SwitchOptions, relative_class_diversity
from adapters.guard import MANUAL, CollapseGuard, CollapseGuardOptions
from adapters.lame import LameOptions, PenultimateFeatures, lame
from adapters.passes import auxiliary_pass
from adapters.prob_cache import InProcessProbabilityCache, ProbabilityCache
from adapters.robust_norm import (
    StatisticsMode,
    commit,
    load_statistics_state,
    normalise_blended,
    normalise_split,
    probing,
    recording,
    statistics_state,
    use_robust_statistics,
)
from adapters.state_check import STATE_FORMAT, IncompatibleState, check_compatible, option_differences

ENTROPY_EMA_MOMENTUM = 0.9
#: ``bn_stats='auto'``: batches smaller than this normalise with the moving average even while traffic looks
#: i.i.d. (too few images to estimate a layer's statistics).
AUTO_MIN_BATCH = 16


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (natural log) of softmax(logits)."""
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


class AdapterOptions(BaseModel):
    """Options common to every method. Unknown options are refused by name.

    ``lame`` corrects each batch's returned probabilities with LAME (:mod:`adapters.lame`), on top of
    whatever the method predicts; with its ``max_class_diversity`` gate only batches that look
    class-correlated are corrected. A batch's class diversity is relative to the recent traffic
    (:class:`adapters.correlation.ClassMixMonitor`, moving average with ``diversity_momentum``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lame: LameOptions = Field(default_factory=LameOptions)
    diversity_momentum: float = Field(
        0.9, ge=0, lt=1, description="weight of the old average of predicted-class histograms"
    )


class BatchStatisticsOptions(AdapterOptions):
    """Options of methods that normalise with batch statistics (every method but source).

    ``bn_stats`` chooses what BatchNorm layers normalise with (see :mod:`adapters.robust_norm`):
    ``batch`` (the papers: the current batch alone), ``ema`` (RoTTA's robust BN: a moving average from
    the source statistics, ``bn_momentum`` per batch) or ``mix`` (alpha-BN: ``bn_alpha`` of the batch,
    the rest source). The robust modes keep class-correlated batches from corrupting normalisation.
    ``bn_min_class_diversity`` (``ema`` only) leaves the moving average alone on a batch that looks
    class-correlated (relative class diversity below it), so the average follows the domain, not the
    classes, and may move faster (a larger ``bn_momentum``).

    ``auto`` keeps ``ema``'s moving average and switches per stream (:class:`CorrelationSwitch`,
    ``bn_switch``): batch statistics while the traffic looks i.i.d., the moving average while it looks
    class-correlated. The gates (``min_class_diversity``, ``lame``) act only while it looks correlated.
    """

    bn_stats: StatisticsMode = Field(
        "batch", description="BatchNorm statistics: 'batch', 'ema' (RBN), 'mix' (alpha-BN) or 'auto'"
    )
    bn_momentum: float = Field(0.05, gt=0, le=1, description="'ema': weight of each batch in the moving average")
    bn_alpha: float = Field(0.1, gt=0, le=1, description="'mix': weight of the batch against the source")
    bn_min_class_diversity: float | None = Field(
        None, ge=0, description="'ema': do not record batches whose relative class diversity is below this"
    )
    bn_switch: SwitchOptions = Field(default_factory=SwitchOptions, description="'auto': when traffic is correlated")

    @model_validator(mode="after")
    def _gate_needs_ema(self) -> BatchStatisticsOptions:
        if self.bn_min_class_diversity is not None and self.bn_stats not in ("ema", "auto"):
            raise ValueError("bn_min_class_diversity gates the moving average of bn_stats='ema' or 'auto' only")
        return self


class OptimizedOptions(BatchStatisticsOptions):
    """Options of methods that update parameters (Tent, EATA, EATA-C).

    ``min_class_diversity`` skips the update on a batch whose predicted classes look correlated (its
    class diversity relative to the recent traffic below it, see :class:`adapters.correlation.ClassMixMonitor`):
    entropy minimisation on a batch of one class teaches the model that every input is that class. The
    prediction is returned either way.
    """

    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam as in the CIFAR reference settings")
    lr: float = Field(1e-3, gt=0, description="learning rate (CIFAR: Adam 1e-3; ImageNet: SGD 0.00025)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    weight_decay: float = Field(0.0, ge=0)
    backward: Literal["full", "selected"] = Field(
        "full",
        description="'full' back-propagates the loss through the whole batch graph (paper); 'selected' "
        "predicts without gradient and re-forwards only the selected samples with gradient",
    )
    guard: CollapseGuardOptions = Field(default_factory=CollapseGuardOptions)
    min_class_diversity: float | None = Field(
        None, ge=0, description="skip the update when the batch's relative class diversity is below this (None: never)"
    )


#: ``on_prediction(logits, entropy, reliable, selected, divergence)`` of :meth:`Adapter.step`
#: (``divergence``: :attr:`StepResult.divergence`).
PredictionCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass
class StepResult:
    """What one step returns: the pre-update prediction and per-sample flags.

    ``divergence``: the per-sample model uncertainty of methods that have one (EATA-C: KL from the full
    network's prediction to a sub-network's, nats, see :meth:`Adapter.model_divergence`); None otherwise.
    """

    logits: torch.Tensor
    entropy: torch.Tensor
    reliable: torch.Tensor
    selected: torch.Tensor
    updated: bool = False
    loss: float | None = None
    reset_reason: str | None = None
    parameter_version: int = 0
    divergence: torch.Tensor | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(1)


@dataclass
class AdapterStats:
    """Running statistics; ``samples_selected`` is the number of samples back-propagated."""

    steps: int = 0
    updates: int = 0
    samples_seen: int = 0
    samples_reliable: int = 0
    samples_selected: int = 0
    entropy_ema: float | None = None
    parameter_version: int = 0
    resets: dict[str, int] = field(default_factory=dict)

    @property
    def total_resets(self) -> int:
        return sum(self.resets.values())


class Adapter:
    """Base adapter. Subclasses set ``name``/``Options`` and override the hooks below."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    #: False for the frozen source model (eval mode, running statistics, no norm layer needed).
    uses_batch_statistics: ClassVar[bool] = True
    #: False for methods that never update parameters (source, norm).
    updates_parameters: ClassVar[bool] = False
    #: True for methods with EATA's Fisher penalty: they take ``fisher``/``fisher_data``.
    uses_fisher: ClassVar[bool] = False
    #: Whether answers are the model's plain output (no own forward or calibration, unlike EATA-C), so a
    #: server may answer from a traced graph of the model.
    traceable: ClassVar[bool] = True
    #: Whether every prediction carries a model divergence (:meth:`model_divergence`; EATA-C).
    reports_divergence: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        options: AdapterOptions,
        *,
        num_classes: int | None = None,
        prob_cache: ProbabilityCache | None = None,
    ) -> None:
        self.options = options
        self.source_hash = model_hash(model)
        self.model = copy.deepcopy(model)
        if self.uses_batch_statistics:
            require_norm_layers(self.model, self.name)
            use_batch_statistics(self.model)
            self.robust_layers = use_robust_statistics(
                self.model,
                options.bn_stats,  # type: ignore[attr-defined]
                options.bn_alpha if options.bn_stats == "mix" else options.bn_momentum,  # type: ignore[attr-defined]
            )
            self.params = adaptable_parameters(self.model)
        else:
            self.model.eval().requires_grad_(False)
            self.params = {}
            self.robust_layers = []
        self.device = model_device(self.model)
        self.features = PenultimateFeatures(self.model) if options.lame.enabled else None
        self.class_mix = ClassMixMonitor(options.diversity_momentum)
        auto = getattr(options, "bn_stats", "batch") == "auto"
        self.switch = CorrelationSwitch(options.bn_switch) if auto else None  # type: ignore[attr-defined]
        # Only a configured gate reads the class mix (the switch judges batches without it): without one, no
        # histogram (and no host sync) per step.
        gates = (options.lame.max_class_diversity, getattr(options, "min_class_diversity", None),
                 getattr(options, "bn_min_class_diversity", None))
        self.watches_class_mix = self.switch is None and any(g is not None for g in gates)
        self.num_classes = num_classes
        self.prob_cache: ProbabilityCache = prob_cache or InProcessProbabilityCache()
        self.source_params = {name: p.detach().clone() for name, p in self.params.items()}
        self.optimizer = self._build_optimizer()
        guard_options = getattr(options, "guard", CollapseGuardOptions())
        self.guard = CollapseGuard(guard_options)
        self.stats = AdapterStats()

    # ----------------------------------------------------------------- hooks for methods
    def select(self, logits: torch.Tensor, ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (reliable, selected) for the batch; default: every sample is reliable, and selected (drives
        the update) exactly when the method updates parameters."""
        every = torch.ones_like(ent, dtype=torch.bool)
        return every, every if self.updates_parameters else torch.zeros_like(every)

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The method's loss over the samples in ``mask`` (``x``/``logits`` carry the graph)."""
        raise NotImplementedError

    def after_update(self, probs: torch.Tensor) -> None:
        """Called with the selected samples' (detached) probabilities after a step."""

    def calibrate(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The logits to return for ``x``, computed before the update; default: unchanged."""
        return logits

    def model_divergence(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Per-sample model uncertainty of the batch just forwarded (``logits``: the full network's, before
        calibration); None for methods without one. Computed from passes the method ran anyway."""
        return None

    def reset_extra(self) -> None:
        """Reset method-specific state."""

    # ----------------------------------------------------------------- the step
    @property
    def e0(self) -> float | None:
        """Entropy margin (EATA); None for methods without one."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with the current weights, no update and no counters (async serving, evaluation)."""
        return self.predict_with_divergence(x)[0]

    def predict_with_divergence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`'s logits and each sample's :meth:`model_divergence` (None without one)."""
        x = x.to(self.device)
        gated = self._choose_statistics(x.shape[0])
        with torch.no_grad(), self._capturing_features(), self._source_weights(self._correlated_mode(gated, x)):
            logits = self.forward(x)
            diversity = self._gate_diversity(logits, gated, record=False)
            returned = self.calibrate(x, self.correct_output(logits, diversity, gated))
            return returned, self.model_divergence(logits)

    def plain_pass_blend(self, n: int) -> float | None:
        """The weight of the batch in the statistics every BatchNorm layer normalises with when :meth:`predict`
        on ``n`` images now is the model's own output; None where it is more (LAME and the source weights
        while ``bn_stats='auto'`` judges the traffic correlated, a method's own forward or calibration) or
        without the switch. Such a pass may run as a traced graph that reads the live weights and averages
        (the server's async answers): 1.0 (the batch alone) for a batch large enough to estimate statistics,
        else ``bn_momentum`` (:meth:`_choose_statistics`)."""
        if self.switch is None or self.switch.correlated or not self.traceable:
            return None
        return 1.0 if n >= AUTO_MIN_BATCH else self.options.bn_momentum  # type: ignore[attr-defined]

    def normalise_blended(self, blend: float) -> None:
        """Until the next pass sets its own statistics (:meth:`_choose_statistics`), every layer normalises
        with ``blend`` of the batch: how a pass above is traced."""
        normalise_blended(self.robust_layers, blend)

    def _correlated_mode(self, gated: bool, x: torch.Tensor) -> bool:
        """Whether this pass serves ``bn_stats='auto'``'s correlated mode (the probe's normalisation)."""
        return self.switch is not None and gated and x.shape[0] >= AUTO_MIN_BATCH

    @contextmanager
    def _source_weights(self, active: bool) -> Iterator[None]:
        """Inside (when ``active``), the adapted parameters hold their source values; restored on exit.

        Why: the probe, and the correlated mode that answers with its normalisation, pair the deep layers'
        source statistics with affine parameters; adapted ones were learned under batch statistics and do
        not fit them (on shuffled impulse noise EATA-C's adapted weights made an i.i.d. probe read
        correlated). With the source's, the probe judges the traffic alone, whatever adaptation did, which
        is what its thresholds were chosen on (``benchmarks/correlation_probe.py`` probes the source model).
        """
        if not active or not self.params:
            yield
            return
        adapted = [p.detach().clone() for p in self.params.values()]
        with torch.no_grad():
            torch._foreach_copy_(list(self.params.values()), [self.source_params[n] for n in self.params])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(list(self.params.values()), adapted)

    @property
    def _probe_layers(self) -> int:
        """How many (shallow) BatchNorm layers the probe, and correlated-mode serving, normalise with the batch."""
        return max(1, round(self.options.bn_switch.batch_layers * len(self.robust_layers)))  # type: ignore[attr-defined]

    def _choose_statistics(self, n: int) -> bool:
        """``bn_stats='auto'``: set what this pass normalises with; returns whether the traffic is judged
        correlated, i.e. whether the gates act (always True without the switch, where each gate judges the
        batch alone). While correlated a batch is normalised as the probe normalises it (shallow layers the
        batch, deep ones the source); a batch too small to estimate statistics uses the moving average."""
        if self.switch is None:
            return True
        if n < AUTO_MIN_BATCH:
            normalise_blended(self.robust_layers, self.options.bn_momentum)  # type: ignore[attr-defined]
        elif self.switch.correlated:
            normalise_split(self.robust_layers, self._probe_layers)
        else:
            normalise_blended(self.robust_layers, 1.0)
        return self.switch.correlated

    def _gate_diversity(self, served: torch.Tensor, gated: bool, record: bool) -> float:
        """The batch's class diversity the gates (``lame``, ``min_class_diversity``, ``bn_min_class_diversity``)
        compare with their thresholds; 1.0 when they do not act.

        With the switch (``bn_stats='auto'``) the diversity is relative to an i.i.d. batch of the same size:
        the switch has already judged the traffic correlated, and the served predictions keep their class
        signal (the probe's normalisation). Without it, relative to the recent traffic
        (:class:`ClassMixMonitor`), whose memory is shorter than a long class run."""
        if self.switch is not None:
            return relative_class_diversity(served) if gated else 1.0
        if not self.watches_class_mix:
            return 1.0
        return self.class_mix.observe(served) if record else self.class_mix.score(served)

    def _judge_traffic(self, x: torch.Tensor, served: torch.Tensor, gated: bool) -> float:
        """Feed the correlation switch (``bn_stats='auto'``) a probe of this batch, and return the batch's
        class diversity for the gates (:meth:`_gate_diversity`). While the traffic is judged correlated the
        served pass was normalised as the probe is: it is the probe, and no extra pass runs."""
        switch = self.switch
        if switch is not None and x.shape[0] >= AUTO_MIN_BATCH and switch.probe_due():
            if gated:
                probe = served
            else:
                # The source weights by reparametrisation, not in place: the step's graph holds the adapted ones.
                with torch.no_grad(), probing(self.robust_layers, self._probe_layers), auxiliary_pass(self.model):
                    head = x[: switch.options.probe_images]
                    probe = torch.func.functional_call(self.model, self.source_params, (head,))
            switch.observe(relative_class_diversity(probe), probe.shape[0])
        return self._gate_diversity(served, gated, record=True)

    def step(self, x: torch.Tensor, on_prediction: PredictionCallback | None = None) -> StepResult:
        """Predict ``x`` and, for adapting methods, take one update step on it.

        The logits returned are those of the forward pass *before* this batch's update. ``on_prediction``,
        if given, receives them (with the entropy and the reliable/selected masks) as soon as they are
        known, before the backward pass: a server answers its clients while the update runs.
        """
        x = x.to(self.device)
        gated = self._choose_statistics(x.shape[0])
        # 'auto' never updates while the traffic is judged correlated: entropy minimisation on a run of one class
        # teaches the model that class, whatever gate looks at the batch (docs/benchmarks.md, "Long class runs").
        learn = self.switch is None or not gated
        grad_forward = self.updates_parameters and learn and self.options.backward == "full"  # type: ignore[attr-defined]
        with self._source_weights(self._correlated_mode(gated, x)):
            with torch.set_grad_enabled(grad_forward), recording(self.robust_layers), self._capturing_features():
                logits = self.forward(x)
            if self.num_classes is None:
                self.num_classes = logits.shape[1]
            detached = logits.detach()
            ent = entropy(detached)
            diversity = self._judge_traffic(x, detached, gated)
            bn_gate = getattr(self.options, "bn_min_class_diversity", None)
            # 'auto': the moving average follows i.i.d. traffic only (correlated mode does not normalise with it).
            commit(self.robust_layers, keep=(bn_gate is None or diversity >= bn_gate) and not (self.switch and gated))
            reliable, selected = self.select(detached, ent)
            returned = self.calibrate(x, self.correct_output(detached, diversity, gated))
            divergence = self.model_divergence(detached)
        if on_prediction is not None:
            on_prediction(returned, ent, reliable, selected, divergence)
        loss_value: float | None = None
        updated = False
        if self.updates_parameters and learn and bool(selected.any()) and self.update_allowed(diversity):
            if grad_forward:
                loss = self.loss(x, logits, selected)
            else:
                with torch.enable_grad(), auxiliary_pass(self.model):  # not an answer: no recorded statistics
                    x_sel = x[selected]
                    loss = self.loss(x_sel, self.forward(x_sel), torch.ones_like(selected[selected]))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_value = float(loss.detach())
            updated = True
            self.after_update(detached[selected].softmax(1))
        reset_reason = self._account(ent, reliable, selected, updated, detached.argmax(1))
        return StepResult(
            logits=returned,
            entropy=ent,
            reliable=reliable,
            selected=selected,
            updated=updated,
            loss=loss_value,
            reset_reason=reset_reason,
            parameter_version=self.stats.parameter_version,
            divergence=divergence,
        )

    def _capturing_features(self) -> Any:
        return self.features.capture() if self.features is not None else nullcontext()

    def correct_output(self, logits: torch.Tensor, diversity: float, gated: bool = True) -> torch.Tensor:
        """LAME on the batch's logits, if enabled, ``gated`` (``bn_stats='auto'``: the traffic looks
        correlated) and the gate lets this batch through. It runs before :meth:`calibrate`, which then sets
        the confidence of LAME's label: LAME needs the model's own probabilities (EATA-C's deflated ones
        weaken its unary term against the pairwise one: validation Dirichlet 0.1, error +6 points).

        LAME yields probabilities; their log is returned as logits (softmax gives them back), so
        confidence and entropy computed downstream are those of the corrected probabilities.
        """
        opts = self.options.lame
        features = self.features.take() if self.features is not None else None
        if features is None or logits.shape[0] < 2 or not gated:
            return logits
        if opts.max_class_diversity is not None and diversity > opts.max_class_diversity:
            return logits
        probs = lame(logits.softmax(1), features, opts.affinity, opts.knn, opts.strength, opts.max_steps,
                     opts.symmetric)
        return probs.clamp_min(1e-20).log().to(logits.dtype)

    def update_allowed(self, diversity: float) -> bool:
        """False for a batch that looks class-correlated (``min_class_diversity``): skip its update."""
        threshold = getattr(self.options, "min_class_diversity", None)
        return threshold is None or diversity >= threshold

    def _account(
        self,
        ent: torch.Tensor,
        reliable: torch.Tensor,
        selected: torch.Tensor,
        updated: bool,
        predictions: torch.Tensor,
    ) -> str | None:
        stats = self.stats
        stats.steps += 1
        stats.samples_seen += int(ent.numel())
        stats.samples_reliable += int(reliable.sum())
        stats.samples_selected += int(selected.sum()) if updated else 0
        if updated:
            stats.updates += 1
            stats.parameter_version += 1
        batch_entropy = float(ent.mean())
        if stats.entropy_ema is None:
            stats.entropy_ema = batch_entropy
        else:
            stats.entropy_ema = ENTROPY_EMA_MOMENTUM * stats.entropy_ema + (1 - ENTROPY_EMA_MOMENTUM) * batch_entropy
        if not self.updates_parameters:
            return None
        self.guard.observe(predictions)
        reason = self.guard.check(stats.entropy_ema, self.e0, self.parameter_drift())
        if reason is not None:
            self.reset(reason)
        return reason

    # ----------------------------------------------------------------- reset and state
    def _build_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.updates_parameters or not self.params:
            return None
        opts = self.options
        params = list(self.params.values())
        if opts.optimizer == "sgd":  # type: ignore[attr-defined]
            return torch.optim.SGD(
                params,
                foreach=True,  # one op per update for all tensors (the default only on GPUs)
                lr=opts.lr,  # type: ignore[attr-defined]
                momentum=opts.momentum,  # type: ignore[attr-defined]
                weight_decay=opts.weight_decay,  # type: ignore[attr-defined]
            )
        return torch.optim.Adam(
            params,
            foreach=True,
            lr=opts.lr,  # type: ignore[attr-defined]
            betas=opts.betas,  # type: ignore[attr-defined]
            weight_decay=opts.weight_decay,  # type: ignore[attr-defined]
        )

    def reset(self, reason: str = MANUAL) -> None:
        """Restore source weights, a fresh optimiser and every moving average, and count why."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.source_params[name])
        self.optimizer = self._build_optimizer()
        self.prob_cache.clear()
        self.guard.reset()
        self.stats.entropy_ema = None
        self.class_mix.reset()
        if self.switch is not None:
            self.switch.reset()
        for layer in self.robust_layers:
            layer.reset()
        self.stats.parameter_version += 1
        self.stats.resets[reason] = self.stats.resets.get(reason, 0) + 1
        self.reset_extra()

    def parameter_drift(self) -> float:
        """Relative L2 distance of the adapted parameters from the source ones."""
        if not self.params:
            return 0.0
        with torch.no_grad():  # foreach ops and one read-back: the server computes this after every update
            num = float(torch.stack(torch._foreach_norm(self.differences_from_source())).square().sum())
            den = float(torch.stack(torch._foreach_norm(list(self.source_params.values()))).square().sum())
        return math.sqrt(num / max(den, 1e-12))

    def differences_from_source(self) -> list[torch.Tensor]:
        """``theta - theta0`` for each adapted parameter, in ``params`` order (foreach: one op for all;
        differentiable when called with gradients on)."""
        return torch._foreach_sub(list(self.params.values()), [self.source_params[n] for n in self.params])

    def adapted_parameters(self) -> dict[str, torch.Tensor]:
        """Detached copies of the parameters adaptation changes (small: norm affine only)."""
        return {name: p.detach().clone() for name, p in self.params.items()}

    def load_adapted_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Overwrite the adapted parameters (e.g. a follower taking a leader's snapshot)."""
        if set(params) != set(self.params):
            missing, extra = set(self.params) - set(params), set(params) - set(self.params)
            raise ValueError(f"parameter set does not match this model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        with torch.no_grad():
            for name, value in params.items():
                if value.shape != self.params[name].shape:
                    raise ValueError(f"parameter {name}: shape {tuple(value.shape)} != "
                                     f"{tuple(self.params[name].shape)}")
                self.params[name].copy_(value.to(self.params[name].device, self.params[name].dtype))

    def load_optimizer_state(self, state: dict[str, Any] | None) -> None:
        """Replace the optimiser state (a fresh optimiser when ``state`` is None)."""
        self.optimizer = self._build_optimizer()
        if self.optimizer is not None and state is not None:
            # torch restores the saved hyper-parameters too; the configured ones (learning rate...) win.
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(copy.deepcopy(state))
            for group, hyper in zip(self.optimizer.param_groups, configured, strict=True):
                group.update(hyper)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: adapted parameters, optimiser, moving averages, counters,
        random generator, and the method and options they belong to (checked on load)."""
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "options": self.options.model_dump(mode="json"),
            "model_hash": self.source_hash,
            "num_classes": self.num_classes,
            "params": self.adapted_parameters(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
            "prob_cache": self.prob_cache.state_dict(),
            "guard": self.guard.state_dict(),
            "stats": asdict(self.stats),
            "extra": self.extra_state(),
            "rng": self.rng_state(),
            **self.traffic_state(),
        }

    def replication_state(self) -> dict[str, Any]:
        """What a follower needs to answer as this adapter does (no counters, guard or cache): the adapted
        parameters, the optimiser (a follower may lead next), the traffic state, and the method, model and
        options they belong to."""
        return {
            "method": self.name,
            "model_hash": self.source_hash,
            "options": self.options.model_dump(mode="json"),
            "params": self.adapted_parameters(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            **self.traffic_state(),
        }

    def load_replication_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`replication_state`; raises :class:`IncompatibleState` naming what differs (e.g. Adam
        moments for an SGD adapter, which would crash at its next step)."""
        if state.get("method") != self.name:
            raise IncompatibleState(f"method {state.get('method')!r} != {self.name!r}")
        if state.get("model_hash") != self.source_hash:
            raise IncompatibleState(f"model {state.get('model_hash')} != {self.source_hash}")
        differences = option_differences(state.get("options") or {}, self.options.model_dump(mode="json"))
        if "options" in state and differences:
            raise IncompatibleState("the state was made with other options: " + "; ".join(differences))
        try:
            self.load_adapted_parameters(state["params"])
            self.load_optimizer_state(state.get("optimizer"))
            self.load_traffic_state(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise IncompatibleState(f"cannot load: {exc}") from exc

    def traffic_state(self) -> dict[str, Any]:
        """What the adapter learnt about the traffic rather than the weights: the robust BatchNorm moving
        averages, the class-mix average and the correlation switch. A follower serving a leader's
        weights needs it too, or it would normalise and gate differently from its leader."""
        return {
            "norm_statistics": statistics_state(self.robust_layers),
            "class_mix": self.class_mix.state_dict(),
            "switch": self.switch.state_dict() if self.switch is not None else None,
        }

    def load_traffic_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`traffic_state` (missing parts leave the current state; robust statistics must match)."""
        if self.robust_layers and state.get("norm_statistics") is not None:
            load_statistics_state(self.robust_layers, state["norm_statistics"])
        self.class_mix.load_state_dict(state.get("class_mix") or {})
        if self.switch is not None:
            self.switch.load_state_dict(state.get("switch") or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Raises :class:`~adapters.state_check.IncompatibleState`, naming
        the difference and changing nothing, for a state of another method, model, optimiser kind or
        options (see :mod:`adapters.state_check`; states saved without options still load)."""
        check_compatible(state, self.name, self.source_hash, self.options.model_dump(mode="json"),
                         getattr(self.options, "optimizer", None) if self.optimizer is not None else None)
        self.load_adapted_parameters(state["params"])
        self.load_optimizer_state(state.get("optimizer"))
        self.prob_cache.load_state_dict(state.get("prob_cache", {}))
        self.guard.load_state_dict(state.get("guard", {}))
        self.num_classes = state.get("num_classes", self.num_classes)
        stats = dict(state.get("stats", {}))
        stats["resets"] = dict(stats.get("resets", {}))
        self.stats = AdapterStats(**stats)
        self.load_extra_state(state.get("extra", {}))
        if state.get("rng") is not None:
            self.load_rng_state(state["rng"])
        self.load_traffic_state(state)

    def rng_state(self) -> torch.Tensor | None:
        """The state of the method's own random generator (EATA-C's sub-network draws); None without one."""
        return None

    def load_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Method, effective options and derived values, for logs, APIs and benchmark JSON."""
        return {
            "method": self.name,
            "options": self.options.model_dump(),
            "num_classes": self.num_classes,
            "e0": self.e0,
            "adapted_parameters": sum(p.numel() for p in self.params.values()),
            "model_hash": self.source_hash,
        }

