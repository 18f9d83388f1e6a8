"""eata-c: calibrated EATA, tta-serve's design after the ideas of Tan et al. (arXiv 2403.11491).

The paper's exact equations were not available; this is our implementation of its two ideas (which
part follows the paper's abstract and which is ours: docs/eata_c.md):

* Model uncertainty: a sub-network (the same weights with parts switched off at random) predicts the
  same batch. A KL term KL(p_full || p_sub) pulls the sub-network towards the *detached* full network,
  and each answer carries that KL as its divergence, a label-free uncertainty signal. Ours: which parts.
  The default drops each normalisation-layer output channel per sample with probability 0.005 (about
  3 of ResNet-20's 688 channels per image): chosen on the validation corruptions as the construction
  whose divergence best separates right from wrong answers and shifted from clean images, at EATA's
  error. Dropping whole residual blocks (``subnetwork='blocks'``, the first design) leaves a network
  right on only half the clean images, so the divergence mostly measured that weakness and the KL
  term cost error (benchmarks/subnetwork.py, docs/benchmarks.md).
* Data uncertainty: where the full and sub-network predict the same label, minimise the (EATA
  re-weighted) entropy; where they disagree, *maximise* it with weight ``alpha_ent``.

EATA's sample selection, re-weighting and Fisher penalty are kept. The extra cost is one sub-network
forward per batch. Calibrated confidence (ours): a loss term alone barely moves calibration, so the
returned confidence is mapped by ``confidence_map``, a two-parameter Platt map of the top probability
fitted on clean labelled data (``confidence='auto'``/``'fitted'``, adapters.confidence_map); the server
and the bench fit it from clean data they hold. The predicted label never changes.
``confidence='subnetwork'`` (deflate each answer by full/sub agreement) is kept for the record: it
calibrates severity 5 only by deflating every answer, clean ones included.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from adapters.confidence_map import mapped_confidence
from adapters.methods.eata import Eata, EataOptions
from adapters.passes import auxiliary_pass
from adapters.registry import register
from adapters.subnetwork import subnetwork


class EataCOptions(EataOptions):
    drop_prob: float = Field(0.005, ge=0, lt=1, description="probability of dropping each unit (channel or residual "
                             "branch, per sample); 0.005 chosen on the validation corruptions (benchmarks.subnetwork)")
    subnetwork: Literal["blocks", "channels"] = Field(
        "channels", description="what the sub-network drops: residual branches (stochastic depth) or normalisation "
        "output channels, each per sample with probability drop_prob",
    )
    drop_downsampling: bool = Field(
        True, description="also drop down-sampling residual blocks (their shortcut alone carries half the channels)"
    )
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(p_full || p_sub)")
    alpha_ent: float = Field(0.1, ge=0, description="weight of entropy maximisation where labels disagree")
    confidence: Literal["auto", "full", "subnetwork", "fitted"] = Field(
        "auto", description="returned confidence: 'fitted' by confidence_map (fitted on clean labelled data, "
        "adapters.confidence_map); 'full': the full network's own; 'subnetwork': deflated by full/sub agreement; "
        "'auto': 'fitted' where a confidence_map is given, else 'full' (the server and the bench fit one from clean "
        "labelled data they hold)"
    )
    confidence_map: tuple[float, float] | None = Field(
        None, description="(a, b) of conf = sigmoid(a + b * logit(p_top)), for confidence='fitted'"
    )
    confidence_samples: int = Field(
        2, ge=1, le=8, description="sub-network draws averaged for the returned confidence (the first is free: "
        "the loss's own sub-network forward; each further draw costs one no-gradient forward)",
    )
    seed: int = Field(0, ge=0, description="seed of the adapter's own generator for sub-network draws (saved in "
                      "state_dict, so a restored adapter draws what an uninterrupted one would)")

    @model_validator(mode="after")
    def _fitted_needs_a_map(self) -> EataCOptions:
        if self.confidence == "fitted" and self.confidence_map is None:
            raise ValueError("confidence='fitted' needs confidence_map (fit it with adapters.fit_confidence_map)")
        return self


def temperature_to_confidence(logits: torch.Tensor, target: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Per-sample temperature T so that max softmax(logits / T) equals ``target`` (bisection on log T).

    The top probability falls monotonically from 1 to 1/C as T grows, so the argmax never changes.
    """
    num_classes = logits.shape[1]
    target = target.clamp(1.0 / num_classes + 1e-4, 1.0 - 1e-6)
    lo = torch.full_like(target, -6.0)
    hi = torch.full_like(target, 8.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        top = (logits / mid.exp().unsqueeze(1)).softmax(1).max(1).values
        too_confident = top > target
        lo = torch.where(too_confident, mid, lo)
        hi = torch.where(too_confident, hi, mid)
    return logits / ((lo + hi) / 2).exp().unsqueeze(1)


@register
class EataC(Eata):
    name = "eata-c"
    traceable = False  # answers come from its own calibration of full and sub-network passes
    reports_divergence = True
    Options = EataCOptions
    options: EataCOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sub_logits: torch.Tensor | None = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.options.seed)

    def sub_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A random sub-network's logits; an auxiliary pass (it answers no request on its own)."""
        opts = self.options
        drawn = subnetwork(self.model, opts.drop_prob, self.generator, drop_downsampling=opts.drop_downsampling,
                           unit=opts.subnetwork)
        with drawn, auxiliary_pass(self.model):
            return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-network logits; the sub-network's logits on the same batch are kept for the loss, the
        calibration and the per-sample divergence (every prediction carries it, so the sub-network runs
        even without gradient and with ``confidence='full'``)."""
        logits = self.model(x)
        self._sub_logits = self.sub_forward(x)  # the loss, the calibration and the divergence read it
        return logits

    def calibrate(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.options.confidence in ("auto", "fitted") and self.options.confidence_map is not None:
            with torch.no_grad():
                return temperature_to_confidence(logits, mapped_confidence(logits, self.options.confidence_map))
        if self.options.confidence != "subnetwork" or self._sub_logits is None:
            return logits
        with torch.no_grad():
            label = logits.argmax(1, keepdim=True)
            draws = [self._sub_logits.detach()]
            draws += [self.sub_forward(x) for _ in range(self.options.confidence_samples - 1)]
            sub_prob = torch.stack([d.softmax(1).gather(1, label).squeeze(1) for d in draws]).mean(0)
            full_prob = logits.softmax(1).gather(1, label).squeeze(1)
            return temperature_to_confidence(logits, (full_prob + sub_prob) / 2)

    def model_divergence(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Model uncertainty per sample: KL(p_full || p_sub) in nats, the loss's own KL term before its
        batch mean, between the full network's (uncalibrated) prediction and the sub-network drawn for
        this batch. 0 where dropping blocks changes nothing; it grows where the prediction rests on
        fragile features, as under a distribution shift (docs/benchmarks.md)."""
        if self._sub_logits is None or self._sub_logits.shape[0] != logits.shape[0]:
            return None
        log_full = logits.detach().float().log_softmax(1)
        log_sub = self._sub_logits.detach().float().log_softmax(1)
        return (log_full.exp() * (log_full - log_sub)).sum(1).clamp_min(0.0)

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        full = logits[mask]
        sub = self._sub_logits[mask]
        ent, weight = self.weighted_entropy(full)
        agree = (full.argmax(1) == sub.argmax(1)).detach().float()
        min_max_entropy = (weight * ent * agree).mean() - self.options.alpha_ent * (ent * (1 - agree)).mean()
        log_full = full.detach().log_softmax(1)
        kl = (log_full.exp() * (log_full - sub.log_softmax(1))).sum(1).mean()
        return min_max_entropy + self.options.kl_weight * kl + self.fisher_penalty()

    def reset_extra(self) -> None:
        """A reset adapter draws what a fresh one would: the generator starts again from the seed."""
        self._sub_logits = None
        self.generator.manual_seed(self.options.seed)

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())
