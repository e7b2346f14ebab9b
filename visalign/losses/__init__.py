"""Preference objectives as pure tensor functions on log-ratios, one function per loss, one registry.

Every modality speaks the same convention (docs/design.md, "One log-ratio convention"): a pairwise loss takes the
chosen and rejected **log-ratios** ``r_c, r_r`` (policy minus reference log-likelihood, one value per sample) and
a strength ``beta``:

- text LLM: ``r = sum_tokens log pi(y|x) - sum_tokens log pi_ref(y|x)`` over the completion tokens;
- diffusion / flow: ``r = -1/2 (e_theta - e_ref)`` (:func:`diffusion_logratios`), with ``e`` the per-sample
  *mean* squared denoising error, winner and loser sharing noise and timestep.

So ``sigmoid`` is DPO (Rafailov et al. 2023, Eq. 7) for text and exactly Diffusion-DPO (Wallace et al. 2024,
Eq. 14, with the mean-over-elements error and the 1/2 inside) for images. Reference-free losses (SimPO, CPO,
ORPO, PRO) take policy log-likelihoods; MaPO takes the per-sample errors directly.

Each loss returns ``(losses, metrics)``: ``losses`` holds one value per pair (or per example, or per list) with
gradients, so the batch loss is ``losses.mean()``; ``metrics`` maps TRL's metric names (``rewards/chosen = beta
* r_c``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``) and loss-specific extras to detached
0-dim tensors. Losses compute in float32, or in the input's precision when that is higher (float64 in tests).

Names match TRL's ``loss_type`` where the two overlap (``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``,
``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
``discopop``, ``sigmoid_norm``, ``sft``; KTOTrainer's ``kto``, ``apo_zero_unpaired``), and hyper-parameter names
follow TRL's config fields (``beta``, ``label_smoothing``, ``discopop_tau``, ``simpo_gamma``, ``cpo_alpha``,
``desirable_weight``, ``undesirable_weight``, ``f_divergence_type``, ``f_alpha_divergence_coef``).

Modules, by kind: ``registry`` (``LossSpec``, ``register/get/available``, hyper-parameter checks), ``tensors``
(input checks and metric helpers the losses share), ``pairwise`` (DPO family and ``sft``), ``reference_free``
(SimPO, CPO, ORPO), ``unpaired`` (KTO, NPO), ``listwise`` (LiPO-lambda, RankDPO, PRO), ``diffusion``
(``diffusion_logratios``, MaPO), ``combine`` (weighted sums: ``build``).

Usage::

    spec = losses.get("sigmoid")                       # one loss: a LossSpec, callable
    per_pair, metrics = spec(chosen_logratios=r_c, rejected_logratios=r_r, beta=0.1)
    objective = losses.build("sigmoid:1.0,bco_pair:0.5,sft:1.0", beta=0.1)   # weighted sum, validated now
    per_pair, metrics = objective(chosen_logratios=..., rejected_logratios=..., chosen_logps=...,
                                  chosen_lengths=...)
"""

# Importing the kind modules registers their losses. The loss functions and constants stay importable from
# `visalign.losses` as before the split; `get(name)` is the public way to reach a loss.
from .combine import PreferenceLoss, build, parse_loss_spec
from .diffusion import diffusion_logratios, mapo  # noqa: F401
from .listwise import lambda_weights, lipo_lambda, pro, rankdpo  # noqa: F401
from .pairwise import (  # noqa: F401
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    cdpo,
    discopop,
    exo_pair,
    f_divergence_score,
    hinge,
    ipo,
    nca_pair,
    poly,
    robust,
    sft,
    sigmoid,
    sigmoid_norm,
    soft,
    sppo_hard,
)
from .reference_free import cpo, orpo, simpo  # noqa: F401
from .registry import F_DIVERGENCES, KINDS, TENSOR_INPUTS, LossOutput, LossSpec, available, get, register  # noqa: F401
from .unpaired import apo_zero_unpaired, kto, npo  # noqa: F401

__all__ = [
    "LossSpec",
    "PreferenceLoss",
    "available",
    "build",
    "diffusion_logratios",
    "f_divergence_score",
    "get",
    "lambda_weights",
    "parse_loss_spec",
    "register",
]
