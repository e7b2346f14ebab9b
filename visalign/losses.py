"""Preference objectives as pure tensor functions on log-ratios, one function per loss, one registry.

Every modality speaks the same convention (DESIGN.md, "One log-ratio convention"): a pairwise loss takes the
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

Usage::

    spec = losses.get("sigmoid")                       # one loss: a LossSpec, callable
    per_pair, metrics = spec(chosen_logratios=r_c, rejected_logratios=r_r, beta=0.1)
    objective = losses.build("sigmoid:1.0,bco_pair:0.5,sft:1.0", beta=0.1)   # weighted sum, validated now
    per_pair, metrics = objective(chosen_logratios=..., rejected_logratios=..., chosen_logps=...,
                                  chosen_lengths=...)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from visalign.errors import ConfigError, VisalignError

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

Tensor = torch.Tensor
LossOutput = tuple[Tensor, dict[str, Tensor]]

# Every tensor argument a loss may take. Anything else in a loss signature is a hyper-parameter.
TENSOR_INPUTS = frozenset(
    {
        "chosen_logratios", "rejected_logratios",  # r = log pi - log pi_ref, [B]
        "chosen_logps", "rejected_logps",  # summed policy log-likelihoods, [B]
        "ref_chosen_logps", "ref_rejected_logps",  # summed reference log-likelihoods, [B]
        "chosen_lengths", "rejected_lengths",  # completion token counts, [B]
        "preference_probs",  # soft labels P(chosen > rejected), [B]
        "chosen_errors", "rejected_errors",  # per-sample mean denoising errors, [B]
        "logratios", "desirable", "kl_logratios",  # unpaired (KTO, NPO): [N], [N] bool, [M]
        "logps", "lengths", "scores",  # listwise: [B, K] each
    }
)  # fmt: skip

KINDS = ("pairwise", "reference_free", "unpaired", "listwise", "errors", "sft")
# Losses whose per-sample values line up (one per pair) and so can be summed with weights.
_PAIR_LAYOUT = {"pairwise", "reference_free", "errors", "sft"}

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the pure function plus what it needs, read from its signature.

    Attributes:
        name: registry name (TRL's ``loss_type`` where the two overlap).
        fn: the pure function ``fn(**tensors, **params) -> (losses, metrics)``.
        kind: one of ``pairwise``, ``reference_free``, ``unpaired``, ``listwise``, ``errors``, ``sft``.
        summary: one line for ``visalign`` help and error messages.
        inputs: required tensor arguments.
        optional_inputs: tensor arguments that may be omitted (``None``).
        params: hyper-parameters and their defaults.
        check: validates hyper-parameters (raises :class:`ConfigError`); also called by ``fn`` itself.
    """

    name: str
    fn: Callable[..., LossOutput]
    kind: str
    summary: str
    inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    params: Mapping[str, Any]
    check: Callable[..., None]

    def __call__(self, **kwargs: Any) -> LossOutput:
        return self.fn(**kwargs)

    def validate(self, **params: Any) -> None:
        """Check hyper-parameters (defaults filled in) without tensors: fail at config time, not step 1000."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ConfigError(f"loss {self.name!r} has no parameter {unknown}; its parameters: {sorted(self.params)}")
        self.check(**{**self.params, **params})


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, kind: str, check: Callable[..., None] | None = None) -> Callable:
    """Register a loss function under ``name``. Its arguments must be keyword-only.

    Tensor arguments are recognised by name (``TENSOR_INPUTS``); the others are hyper-parameters and must
    have defaults. The function's first docstring line becomes its summary.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def decorator(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        inputs, optional, params = [], [], {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"loss {name!r}: argument {p.name!r} must be keyword-only")
            if p.name in TENSOR_INPUTS:
                (inputs if p.default is inspect.Parameter.empty else optional).append(p.name)
            elif p.default is inspect.Parameter.empty:
                raise TypeError(f"loss {name!r}: hyper-parameter {p.name!r} needs a default")
            else:
                params[p.name] = p.default
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = LossSpec(
            name, fn, kind, summary, tuple(inputs), tuple(optional), dict(params), check or _checker(name)
        )
        return fn

    return decorator


def available(kind: str | None = None) -> list[str]:
    """Sorted names of the registered losses (of one ``kind`` if given)."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get(name: str) -> LossSpec:
    """The registered loss ``name``; an unknown name raises :class:`ConfigError` listing the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available())}") from None


# --------------------------------------------------------------------------------------------------------------
# Checks and shared helpers
# --------------------------------------------------------------------------------------------------------------


def _positive(loss: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"loss {loss!r}: {name} must be a positive number, got {value!r}")


def _check_f(loss: str, f_divergence_type: str, f_alpha_divergence_coef: float) -> None:
    if f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(
            f"loss {loss!r}: f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}"
        )
    if not math.isfinite(f_alpha_divergence_coef):
        raise ConfigError(f"loss {loss!r}: f_alpha_divergence_coef must be finite, got {f_alpha_divergence_coef!r}")


def _checker(loss: str, **extra: Callable[[Any], str | None]) -> Callable[..., None]:
    """A check for ``loss``: beta > 0, a valid f-divergence if the loss takes one, plus per-parameter rules.

    Each rule maps a value to an error message (or ``None`` when the value is fine).
    """

    def check(**params: Any) -> None:
        if "beta" in params:
            _positive(loss, "beta", params["beta"])
        if "f_divergence_type" in params:
            _check_f(loss, params["f_divergence_type"], params["f_alpha_divergence_coef"])
        for key, rule in extra.items():
            message = rule(params[key])
            if message:
                raise ConfigError(f"loss {loss!r}: {key} {message}, got {params[key]!r}")

    return check


def _float(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (log-sigmoids of large margins lose everything in half precision); fp32/fp64 kept."""
    if not isinstance(t, Tensor):
        raise VisalignError(f"expected a torch.Tensor, got {type(t).__name__}")
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point() else t


def _batch(loss: str, **tensors: Tensor) -> tuple[Tensor, ...]:
    """Check that per-sample tensors are 1-D, non-empty and of one batch size; return them as floats."""
    sizes = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise VisalignError(f"loss {loss!r}: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 1:
            raise VisalignError(
                f"loss {loss!r}: {name} must have shape [B] (one value per sample), got {list(t.shape)}"
            )
        sizes[name] = t.shape[0]
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k} has {v}" for k, v in sizes.items())
        raise VisalignError(f"loss {loss!r}: batch sizes differ ({detail}); pass one value per pair for each")
    if sizes and next(iter(sizes.values())) == 0:
        raise VisalignError(f"loss {loss!r}: empty batch")
    return tuple(_float(t) for t in tensors.values())


def _lengths(loss: str, name: str, n: Tensor) -> Tensor:
    if bool((n <= 0).any()):
        index = int(torch.nonzero(n <= 0)[0, 0])
        raise VisalignError(
            f"loss {loss!r}: {name}[{index}] is {n[index].item()}: an empty completion has no log-likelihood to "
            "normalise; drop the row or give it at least one token"
        )
    return n


def _detach(**metrics: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


def _reward_metrics(beta: float, r_c: Tensor, r_r: Tensor) -> dict[str, Tensor]:
    """TRL's implicit-reward metrics: ``rewards/chosen = beta * r_c`` etc., batch means, detached."""
    chosen, rejected = beta * r_c.detach(), beta * r_r.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }


def diffusion_logratios(errors: Tensor, ref_errors: Tensor) -> Tensor:
    """The log-ratio of a diffusion or flow sample: ``r = -1/2 (e_theta - e_ref)`` (DESIGN.md).

    ``-e/2`` is, up to a constant and a timestep weight absorbed into ``beta``, the ELBO surrogate of
    ``log p(x0)`` (Wallace et al. 2024, Eq. 9-14), so pairwise losses apply to diffusion unchanged.

    Args:
        errors: ``[B]`` per-sample mean squared denoising error of the policy (``visalign.diffusion.per_sample_mse``).
        ref_errors: ``[B]`` the same for the reference (LoRA disabled), same noise and timestep, no grad.

    Returns:
        ``[B]`` log-ratios.
    """
    errors, ref_errors = _batch("diffusion_logratios", errors=errors, ref_errors=ref_errors)
    return -0.5 * (errors - ref_errors)


def f_divergence_score(logratios: Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """Replace a log-ratio ``r = log u`` by ``f'(u)`` of f-DPO (Wang et al. 2024, "Beyond Reverse KL", f-DPO).

    reverse KL ``r`` (DPO); forward KL ``1 - e^{-r}``; Jensen-Shannon ``log 2 + log sigma(r)``;
    alpha-divergence ``(e^{(alpha - 1) r} - 1) / (alpha - 1)`` (``alpha = 1`` is the reverse-KL limit).

    Args:
        logratios: any shape, float.
        f_divergence_type: one of ``F_DIVERGENCES`` (TRL's ``f_divergence_type`` values).
        alpha: the alpha-divergence coefficient (TRL's ``f_alpha_divergence_coef``).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        # Clamp so exp() stays finite in this dtype; TRL clamps at 80 for fp32, which is the same where it matters.
        limit = math.log(torch.finfo(logratios.dtype).max) - 1
        t = ((alpha - 1.0) * logratios).clamp(max=limit)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ConfigError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def _delta(r_c: Tensor, r_r: Tensor, kind: str, alpha: float) -> Tensor:
    return f_divergence_score(r_c, kind, alpha) - f_divergence_score(r_r, kind, alpha)


def _smoothed_sigmoid(x: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigma(x) - eps log sigma(-x)``: the label-smoothed (conservative) logistic loss."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-x)


def _token_mean_nll(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-sample ``-logps_i * B / sum(lengths)``: its batch mean is the token-level mean NLL.

    SFT, CPO and ORPO average the NLL over all completion tokens of the batch (a cross-entropy over tokens, as
    TRL computes it), not over samples; spreading it this way keeps one value per pair.
    """
    return -logps * (logps.shape[0] / lengths.sum())


# --------------------------------------------------------------------------------------------------------------
# Pairwise losses on log-ratios (DPO family)
# --------------------------------------------------------------------------------------------------------------


@register("sigmoid", kind="pairwise", check=_checker("sigmoid"))
def sigmoid(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """DPO: ``-log sigma(beta Delta)`` with ``Delta = r_c - r_r`` (Rafailov et al. 2023, Eq. 7).

    For diffusion this is Diffusion-DPO (Wallace et al. 2024, Eq. 14). With an f-divergence, ``r`` is replaced
    by ``f'(u)`` (:func:`f_divergence_score`).

    Args:
        chosen_logratios, rejected_logratios: ``[B]`` log-ratios ``r_c, r_r``.
        beta: strength (0.1 text; 5000 for SD1.5/SDXL Diffusion-DPO with visalign's mean-error convention).
        f_divergence_type, f_alpha_divergence_coef: the f-DPO regulariser (default: reverse KL = DPO).

    Returns:
        ``[B]`` losses, metrics. At ``Delta = 0`` the loss is ``log 2``.
    """
    _REGISTRY["sigmoid"].check(beta=beta, f_divergence_type=f_divergence_type,
                               f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("sigmoid", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    losses = -F.logsigmoid(beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef))
    return losses, _reward_metrics(beta, r_c, r_r)


@register("hinge", kind="pairwise", check=_checker("hinge"))
def hinge(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """SLiC hinge: ``relu(1 - beta Delta)`` (Zhao et al. 2023, SLiC-HF calibration loss with margin ``1/beta``).

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        beta: ``1/beta`` is the margin in log-ratio units.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["hinge"].check(beta=beta, f_divergence_type=f_divergence_type,
                             f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("hinge", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    losses = torch.relu(1 - beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef))
    return losses, _reward_metrics(beta, r_c, r_r)


@register("ipo", kind="pairwise", check=_checker("ipo"))
def ipo(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """IPO: ``(Delta' - 1/(2 beta))^2`` (Azar et al. 2024, Eq. 17; ``beta`` is their ``tau``).

    For text ``Delta'`` uses length-normalised log-ratios ``r/n`` (as TRL, confirmed with the IPO authors);
    without lengths (diffusion, whose ``r`` is already a per-element mean) ``Delta' = Delta``.

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (>= 1), or both ``None``.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["ipo"].check(beta=beta, f_divergence_type=f_divergence_type,
                           f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("ipo", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    s_c = f_divergence_score(r_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = f_divergence_score(r_r, f_divergence_type, f_alpha_divergence_coef)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise VisalignError("loss 'ipo': pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        _, _, n_c, n_r = _batch("ipo", chosen_logratios=r_c, rejected_logratios=r_r,
                                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)  # fmt: skip
        s_c = s_c / _lengths("ipo", "chosen_lengths", n_c)
        s_r = s_r / _lengths("ipo", "rejected_lengths", n_r)
    losses = (s_c - s_r - 1 / (2 * beta)) ** 2
    return losses, _reward_metrics(beta, r_c, r_r)


def _robust_eps(v: float) -> str | None:
    return None if 0.0 <= v < 0.5 else "must lie in [0, 0.5) (the assumed label-flip rate)"


@register("robust", kind="pairwise", check=_checker("robust", label_smoothing=_robust_eps))
def robust(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Robust DPO: ``[-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps)``.

    An unbiased loss under label flips with rate ``eps`` (Chowdhury et al. 2024, "Provably Robust DPO").
    ``eps = 0`` is DPO.

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        label_smoothing: the flip rate ``eps`` in ``[0, 0.5)``.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["robust"].check(beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                              f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("robust", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    x = beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    return losses, _reward_metrics(beta, r_c, r_r)


def _cdpo_eps(v: float) -> str | None:
    return None if 0.0 <= v <= 0.5 else "must lie in [0, 0.5]"


@register("cdpo", kind="pairwise", check=_checker("cdpo", label_smoothing=_cdpo_eps))
def cdpo(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Conservative DPO: ``-(1-eps) log sigma(beta Delta) - eps log sigma(-beta Delta)`` (E. Mitchell 2023,
    "A note on DPO with noisy preferences"; TRL's ``label_smoothing`` of the sigmoid loss before 1.0).

    DPO with smoothed labels: the target probability that chosen wins is ``1 - eps``, so the loss is minimal at
    ``beta Delta = log((1 - eps) / eps)`` instead of pushing the margin to infinity.

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        label_smoothing: ``eps`` in ``[0, 0.5]``.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["cdpo"].check(beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("cdpo", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    x = beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef)
    return _smoothed_sigmoid(x, label_smoothing), _reward_metrics(beta, r_c, r_r)


def _exo_eps(v: float) -> str | None:
    return None if 0.0 < v < 1.0 else "must lie in (0, 1); the EXO paper recommends 1e-3"


@register("exo_pair", kind="pairwise", check=_checker("exo_pair", label_smoothing=_exo_eps))
def exo_pair(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """EXO-pref: ``KL(p_theta || p_label)`` over {chosen, rejected} (Ji et al. 2024, Eq. 16 with K = 2).

    ``sigma(x)(log sigma(x) - log(1-eps)) + sigma(-x)(log sigma(-x) - log eps)``, ``x = beta Delta``.

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        label_smoothing: ``eps`` in ``(0, 1)`` (must be > 0: ``log eps``).

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["exo_pair"].check(beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                                f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("exo_pair", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    x = beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )
    return losses, _reward_metrics(beta, r_c, r_r)


@register("nca_pair", kind="pairwise", check=_checker("nca_pair"))
def nca_pair(*, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float = 0.1) -> LossOutput:
    """NCA (pairwise): ``-log sigma(beta r_c) - 1/2 log sigma(-beta r_c) - 1/2 log sigma(-beta r_r)``.

    Noise-contrastive alignment (Chen et al. 2024, "Noise Contrastive Alignment", with K = 2): pushes chosen
    up in absolute terms.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["nca_pair"].check(beta=beta)
    r_c, r_r = _batch("nca_pair", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    x_c, x_r = beta * r_c, beta * r_r
    losses = -F.logsigmoid(x_c) - 0.5 * F.logsigmoid(-x_c) - 0.5 * F.logsigmoid(-x_r)
    return losses, _reward_metrics(beta, r_c, r_r)


@register("bco_pair", kind="pairwise", check=_checker("bco_pair"))
def bco_pair(*, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float = 0.1) -> LossOutput:
    """BCO (pairwise): ``-log sigma(beta r_c) - log sigma(-beta r_r)`` (Jung et al. 2024, "Binary Classifier
    Optimization", with reward shift 0).

    Binary classification of chosen vs rejected by the implicit reward; as TRL's ``bco_pair`` this has no
    running reward shift ``delta``.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["bco_pair"].check(beta=beta)
    r_c, r_r = _batch("bco_pair", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    losses = -F.logsigmoid(beta * r_c) - F.logsigmoid(-beta * r_r)
    return losses, _reward_metrics(beta, r_c, r_r)


@register("sppo_hard", kind="pairwise", check=_checker("sppo_hard"))
def sppo_hard(*, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float = 0.1) -> LossOutput:
    """SPPO (hard labels): ``(r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2`` (Wu et al. 2024, Eq. 4.7, P = 1/0).

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["sppo_hard"].check(beta=beta)
    r_c, r_r = _batch("sppo_hard", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    losses = (r_c - 0.5 / beta) ** 2 + (r_r + 0.5 / beta) ** 2
    return losses, _reward_metrics(beta, r_c, r_r)


def _aot_eps(v: float) -> str | None:
    return None if 0.0 <= v <= 0.5 else "must lie in [0, 0.5]"


@register("aot", kind="pairwise", check=_checker("aot", label_smoothing=_aot_eps))
def aot(
    *,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT (paired): distributional alignment via optimal transport (Melnyk et al. 2024, "Distributional
    Preference Alignment of LLMs via Optimal Transport").

    Sorts the policy margins ``pi_c - pi_r`` and the reference margins ``rho_c - rho_r`` over the batch
    (the 1-D optimal-transport plan), ``d`` = sorted difference, then the smoothed logistic loss on ``beta d``.
    The loss at position ``i`` is not about pair ``i``: only the batch mean is meaningful. For diffusion pass
    ``logps = -e/2`` (policy and reference errors).

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
        label_smoothing: ``eps`` in ``[0, 0.5]``.

    Returns:
        ``[B]`` losses (in sorted order), metrics on the unsorted log-ratios.
    """
    _REGISTRY["aot"].check(beta=beta, label_smoothing=label_smoothing)
    pc, pr, rc, rr = _batch("aot", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)  # fmt: skip
    d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
    return _smoothed_sigmoid(beta * d, label_smoothing), _reward_metrics(beta, pc - rc, pr - rr)


@register("aot_unpaired", kind="pairwise", check=_checker("aot_unpaired", label_smoothing=_aot_eps))
def aot_unpaired(
    *, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float = 0.1, label_smoothing: float = 0.0
) -> LossOutput:
    """AOT (unpaired): sort ``r_c`` and ``r_r`` separately, ``d`` = sorted difference (Melnyk et al. 2024).

    Only the batch mean is meaningful (position ``i`` is a quantile, not a pair).

    Returns:
        ``[B]`` losses (in sorted order), metrics.
    """
    _REGISTRY["aot_unpaired"].check(beta=beta, label_smoothing=label_smoothing)
    r_c, r_r = _batch("aot_unpaired", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    d = torch.sort(r_c).values - torch.sort(r_r).values
    return _smoothed_sigmoid(beta * d, label_smoothing), _reward_metrics(beta, r_c, r_r)


@register("apo_zero", kind="pairwise", check=_checker("apo_zero"))
def apo_zero(*, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float = 0.1) -> LossOutput:
    """APO-zero: ``1 - sigma(beta r_c) + sigma(beta r_r)`` (D'Oosterlinck et al. 2024, Eq. 7).

    For chosen outputs better than the model's own: raise chosen, lower rejected, each against zero.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["apo_zero"].check(beta=beta)
    r_c, r_r = _batch("apo_zero", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    losses = 1 - torch.sigmoid(beta * r_c) + torch.sigmoid(beta * r_r)
    return losses, _reward_metrics(beta, r_c, r_r)


@register("apo_down", kind="pairwise", check=_checker("apo_down"))
def apo_down(*, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float = 0.1) -> LossOutput:
    """APO-down: ``sigma(beta r_c) + 1 - sigma(beta (r_c - r_r))`` (D'Oosterlinck et al. 2024, Eq. 8).

    For chosen outputs worse than the model's own: lower both, rejected more.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["apo_down"].check(beta=beta)
    r_c, r_r = _batch("apo_down", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    losses = torch.sigmoid(beta * r_c) + 1 - torch.sigmoid(beta * (r_c - r_r))
    return losses, _reward_metrics(beta, r_c, r_r)


def _positive_rule(v: float) -> str | None:
    return None if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else "must be > 0"


@register("discopop", kind="pairwise", check=_checker("discopop", discopop_tau=_positive_rule))
def discopop(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): ``(1 - w)(-log sigma(x)) + w e^{-x}``, ``x = beta Delta``,
    ``w = sigma(x / tau)`` (Chris Lu et al. 2024, Eq. 5; ``tau = 0.05``).

    ``w e^{-x}`` is computed as ``exp(log sigma(x/tau) - x)`` so that it stays finite for very negative ``x``.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["discopop"].check(beta=beta, discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
                                f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("discopop", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    x = beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef)
    w = torch.sigmoid(x / discopop_tau)
    losses = (1 - w) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / discopop_tau) - x)
    return losses, _reward_metrics(beta, r_c, r_r)


@register("sigmoid_norm", kind="pairwise", check=_checker("sigmoid_norm"))
def sigmoid_norm(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Length-normalised DPO: ``-log sigma(beta (r_c/n_c - r_r/n_r))`` (as TRL's ``sigmoid_norm``; cf. R-DPO).

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (>= 1).

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["sigmoid_norm"].check(beta=beta, f_divergence_type=f_divergence_type,
                                    f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r, n_c, n_r = _batch("sigmoid_norm", chosen_logratios=chosen_logratios,
                                rejected_logratios=rejected_logratios, chosen_lengths=chosen_lengths,
                                rejected_lengths=rejected_lengths)  # fmt: skip
    s_c = f_divergence_score(r_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = f_divergence_score(r_r, f_divergence_type, f_alpha_divergence_coef)
    delta = s_c / _lengths("sigmoid_norm", "chosen_lengths", n_c) - s_r / _lengths(
        "sigmoid_norm", "rejected_lengths", n_r
    )
    return -F.logsigmoid(beta * delta), _reward_metrics(beta, r_c, r_r)


def _finite_rule(v: float) -> str | None:
    return None if isinstance(v, (int, float)) and math.isfinite(v) else "must be a finite number"


@register("poly", kind="pairwise", check=_checker("poly", poly_alpha=_finite_rule))
def poly(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float = 0.1,
    poly_alpha: float = 1.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Poly-DPO: ``-log p + alpha (1 - p)``, ``p = sigma(beta Delta)`` (Li et al. 2026, ViPO, Poly-DPO objective).

    The Poly-1 expansion (Leng et al. 2022) of the DPO cross-entropy: ``alpha > 0`` keeps pushing on pairs the
    model is already confident about (noisy, conflicting data), ``alpha < 0`` damps them (trivially easy data),
    ``alpha = 0`` is DPO. The default 1.0 is Poly-1's; tune it per dataset as ViPO does.

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["poly"].check(beta=beta, poly_alpha=poly_alpha, f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r = _batch("poly", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    x = beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef)
    losses = -F.logsigmoid(x) + poly_alpha * torch.sigmoid(-x)  # 1 - sigma(x) == sigma(-x), exact in floats
    return losses, _reward_metrics(beta, r_c, r_r)


@register("soft", kind="pairwise", check=_checker("soft"))
def soft(
    *,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    preference_probs: Tensor,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Soft-label DPO: ``-[p log sigma(beta Delta) + (1 - p) log sigma(-beta Delta)]`` (SmPO-Diffusion, Lu et al.
    2025, smoothed preference objective).

    ``p`` is the probability that "chosen" wins, e.g. ``sigma((R_c - R_r)/T)`` from a reward model. ``p = 1``
    is DPO; swapping chosen and rejected with ``p -> 1 - p`` leaves the loss unchanged.

    Args:
        chosen_logratios, rejected_logratios: ``[B]``.
        preference_probs: ``[B]`` in ``[0, 1]``.

    Returns:
        ``[B]`` losses, metrics (``rewards/accuracies`` counts ``r_c > r_r`` as for every pairwise loss).
    """
    _REGISTRY["soft"].check(beta=beta, f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef)  # fmt: skip
    r_c, r_r, p = _batch("soft", chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
                         preference_probs=preference_probs)  # fmt: skip
    if bool(((p < 0) | (p > 1)).any()):
        raise VisalignError("loss 'soft': preference_probs must lie in [0, 1]")
    x = beta * _delta(r_c, r_r, f_divergence_type, f_alpha_divergence_coef)
    losses = -(p * F.logsigmoid(x) + (1 - p) * F.logsigmoid(-x))
    return losses, _reward_metrics(beta, r_c, r_r)


@register("sft", kind="sft", check=lambda **_: None)
def sft(*, chosen_logps: Tensor, chosen_lengths: Tensor) -> LossOutput:
    """SFT on the chosen completions: the token-level mean negative log-likelihood (TRL's ``sft`` term).

    Args:
        chosen_logps: ``[B]`` summed policy log-likelihoods of the chosen completions.
        chosen_lengths: ``[B]`` their token counts (>= 1).

    Returns:
        ``[B]`` values ``-chosen_logps_i * B / sum(chosen_lengths)`` (mean = token-level NLL), metrics.
    """
    logps, n = _batch("sft", chosen_logps=chosen_logps, chosen_lengths=chosen_lengths)
    losses = _token_mean_nll(logps, _lengths("sft", "chosen_lengths", n))
    return losses, _detach(**{"nll_loss": losses.mean()})


# --------------------------------------------------------------------------------------------------------------
# Reference-free pairwise losses (policy log-likelihoods)
# --------------------------------------------------------------------------------------------------------------


@register("simpo", kind="reference_free", check=_checker("simpo", label_smoothing=_cdpo_eps))
def simpo(
    *,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO: ``-log sigma(beta (pi_c/n_c - pi_r/n_r) - gamma)`` (Meng et al. 2024, Eq. 6).

    Reference-free, length-normalised, with a target margin ``gamma``. ``label_smoothing`` as TRL's CPO trainer.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed policy log-likelihoods.
        chosen_lengths, rejected_lengths: ``[B]`` token counts (>= 1).
        beta: 2.0-2.5 in the paper; simpo_gamma: the margin (TRL's ``simpo_gamma``).

    Returns:
        ``[B]`` losses; metrics with ``rewards/chosen = beta * pi_c / n_c``.
    """
    _REGISTRY["simpo"].check(beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing)
    pc, pr, n_c, n_r = _batch("simpo", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)  # fmt: skip
    a_c = pc / _lengths("simpo", "chosen_lengths", n_c)
    a_r = pr / _lengths("simpo", "rejected_lengths", n_r)
    return _smoothed_sigmoid(beta * (a_c - a_r) - simpo_gamma, label_smoothing), _reward_metrics(beta, a_c, a_r)


@register("cpo", kind="reference_free", check=_checker("cpo", label_smoothing=_cdpo_eps))
def cpo(
    *,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
) -> LossOutput:
    """CPO: ``-log sigma(beta (pi_c - pi_r)) + alpha NLL_c`` (Xu et al. 2024, Eq. 3, plus the NLL term).

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed policy log-likelihoods.
        chosen_lengths: ``[B]`` chosen token counts, for the token-level NLL.
        cpo_alpha: weight of the NLL (behaviour-cloning) term.

    Returns:
        ``[B]`` losses (preference term + ``cpo_alpha`` x per-sample share of the token-mean NLL), metrics.
    """
    _REGISTRY["cpo"].check(beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
    pc, pr, n_c = _batch("cpo", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                         chosen_lengths=chosen_lengths)  # fmt: skip
    nll = _token_mean_nll(pc, _lengths("cpo", "chosen_lengths", n_c))
    losses = _smoothed_sigmoid(beta * (pc - pr), label_smoothing) + cpo_alpha * nll
    return losses, {**_reward_metrics(beta, pc, pr), "nll_loss": nll.detach().mean()}


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - e^x)`` for ``x <= 0``, accurate on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register("orpo", kind="reference_free", check=_checker("orpo"))
def orpo(
    *,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO: ``NLL_c - lambda log sigma(log odds_c - log odds_r)`` (Hong et al. 2024, ORPO, the odds ratio of Eq. 4
    and loss of Eq. 7 as TRL cites them; ``beta`` is ``lambda``, as TRL's ORPO trainer).

    ``odds = p / (1 - p)`` with ``p = exp(mean token log-prob)``; ``log odds = a - log(1 - e^a)``, ``a = pi/n``.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed policy log-likelihoods.
        chosen_lengths, rejected_lengths: ``[B]`` token counts (>= 1).

    Returns:
        ``[B]`` losses (per-sample share of the token-mean NLL minus the odds-ratio term); metrics with
        ``rewards/chosen = beta * pi_c / n_c`` (TRL), ``log_odds_ratio`` and ``log_odds_chosen``.
    """
    _REGISTRY["orpo"].check(beta=beta)
    pc, pr, n_c, n_r = _batch("orpo", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)  # fmt: skip
    n_c, n_r = _lengths("orpo", "chosen_lengths", n_c), _lengths("orpo", "rejected_lengths", n_r)
    a_c, a_r = pc / n_c, pr / n_r
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    ratio = F.logsigmoid(log_odds)
    nll = _token_mean_nll(pc, n_c)
    metrics = {**_reward_metrics(beta, a_c, a_r), "nll_loss": nll.detach().mean(),
               "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}  # fmt: skip
    return nll - beta * ratio, metrics


# --------------------------------------------------------------------------------------------------------------
# Unpaired losses (KTO, NPO)
# --------------------------------------------------------------------------------------------------------------


def _unpaired(loss: str, logratios: Tensor, desirable: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool:
        raise VisalignError(f"loss {loss!r}: desirable must be a bool tensor [N] (True = desirable completion)")
    (r,) = _batch(loss, logratios=logratios)
    if desirable.shape != r.shape:
        raise VisalignError(f"loss {loss!r}: desirable has shape {list(desirable.shape)}, logratios {list(r.shape)}")
    return r, desirable


def _unpaired_metrics(beta: float, r: Tensor, desirable: Tensor) -> dict[str, Tensor]:
    rewards = beta * r.detach()
    n_d, n_u = desirable.sum(), (~desirable).sum()
    return {
        "rewards/chosen": torch.where(desirable, rewards, 0).sum() / n_d.clamp(min=1),
        "rewards/rejected": torch.where(desirable, 0, rewards).sum() / n_u.clamp(min=1),
        "count/chosen": n_d.to(rewards.dtype),
        "count/rejected": n_u.to(rewards.dtype),
    }


_WEIGHT_RULES = {"desirable_weight": _positive_rule, "undesirable_weight": _positive_rule}


@register("kto", kind="unpaired", check=_checker("kto", **_WEIGHT_RULES))
def kto(
    *,
    logratios: Tensor,
    desirable: Tensor,
    kl_logratios: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO: ``lambda_D (1 - sigma(beta (r - z)))`` for desirable, ``lambda_U (1 - sigma(beta (z - r)))`` for
    undesirable examples (Ethayarajh et al. 2024, KTO, Eq. 7 as TRL cites it).

    ``z = max(0, mean(kl_logratios))``, detached: the batch estimate of ``KL(pi || pi_ref)`` from mismatched
    prompt/completion pairs (TRL pairs each prompt with the next example's completion).

    Args:
        logratios: ``[N]`` log-ratios of the examples.
        desirable: ``[N]`` bool, True for desirable (thumbs-up) completions.
        kl_logratios: ``[M]`` log-ratios of the mismatched pairs (pass ``torch.zeros(1)`` for ``z = 0``).
        desirable_weight, undesirable_weight: ``lambda_D, lambda_U``; balance them when the classes are uneven.

    Returns:
        ``[N]`` losses in input order, metrics (``kl`` = ``z``).
    """
    _REGISTRY["kto"].check(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    r, desirable = _unpaired("kto", logratios, desirable)
    (kl,) = _batch("kto", kl_logratios=kl_logratios)
    z = kl.detach().mean().clamp(min=0).to(r.dtype)
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, {**_unpaired_metrics(beta, r, desirable), "kl": z.detach()}


@register("apo_zero_unpaired", kind="unpaired", check=_checker("apo_zero_unpaired", **_WEIGHT_RULES))
def apo_zero_unpaired(
    *,
    logratios: Tensor,
    desirable: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """APO-zero, unpaired: ``1 - sigma(beta r)`` for desirable, ``sigma(beta r)`` for undesirable examples
    (D'Oosterlinck et al. 2024, Eq. 7 split per example, as TRL's KTO trainer).

    Returns:
        ``[N]`` losses in input order, metrics.
    """
    _REGISTRY["apo_zero_unpaired"].check(beta=beta, desirable_weight=desirable_weight,
                                         undesirable_weight=undesirable_weight)  # fmt: skip
    r, desirable = _unpaired("apo_zero_unpaired", logratios, desirable)
    s = torch.sigmoid(beta * r)
    losses = torch.where(desirable, desirable_weight * (1 - s), undesirable_weight * s)
    return losses, _unpaired_metrics(beta, r, desirable)


@register("npo", kind="unpaired", check=_checker("npo"))
def npo(*, logratios: Tensor, beta: float = 0.1) -> LossOutput:
    """NPO: ``-(2/beta) log sigma(-beta r)`` on negative (to-forget) examples only (Zhang et al. 2024,
    "Negative Preference Optimization").

    As ``beta -> 0`` this tends to gradient ascent on the NLL, but bounded: the loss saturates as ``r -> -inf``.

    Args:
        logratios: ``[N]`` log-ratios of the negative examples.

    Returns:
        ``[N]`` losses, metrics (``rewards/rejected = beta * r``).
    """
    _REGISTRY["npo"].check(beta=beta)
    (r,) = _batch("npo", logratios=logratios)
    return -(2 / beta) * F.logsigmoid(-beta * r), {"rewards/rejected": (beta * r.detach()).mean()}


# --------------------------------------------------------------------------------------------------------------
# Listwise losses (K candidates per prompt)
# --------------------------------------------------------------------------------------------------------------


def _lists(loss: str, **tensors: Tensor) -> tuple[Tensor, ...]:
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.ndim != 2:
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise VisalignError(f"loss {loss!r}: {name} must have shape [B, K] (K candidates per prompt), got {got}")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise VisalignError(f"loss {loss!r}: shapes differ: {shapes}")
    b, k = next(iter(shapes.values()))
    if b == 0 or k < 2:
        raise VisalignError(f"loss {loss!r}: need at least one list of K >= 2 candidates, got [B, K] = [{b}, {k}]")
    return tuple(_float(t) for t in tensors.values())


def lambda_weights(scores: Tensor, labels: Tensor, *, log_base: float = 2.0) -> Tensor:
    """LambdaLoss ``Delta DCG`` pair weights (Wang et al. 2018, LambdaLoss; as used by LiPO-lambda).

    ``Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|`` with gain ``G = 2^psi - 1``, discount
    ``D(tau) = log(1 + tau)`` (base ``log_base``) and ``tau`` the 1-based rank of each candidate under the model's
    current ``scores`` (descending). Ranks are not differentiable, so the weights carry no gradient.

    Args:
        scores: ``[B, K]`` model scores ``s = beta r``.
        labels: ``[B, K]`` preference labels ``psi`` (higher = better).

    Returns:
        ``[B, K, K]`` weights, zero on the diagonal.
    """
    with torch.no_grad():
        order = scores.argsort(dim=1, descending=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
        ranks.scatter_(1, order, positions)
        inv_discount = math.log(log_base) / torch.log1p(ranks.to(scores.dtype))  # 1 / log_base(1 + tau)
        gain = torch.pow(2.0, labels) - 1
        return (gain[:, :, None] - gain[:, None, :]).abs() * (
            inv_discount[:, :, None] - inv_discount[:, None, :]
        ).abs()


def _lambda_loss(loss: str, logratios: Tensor, scores: Tensor, beta: float, log_base: float) -> LossOutput:
    r, psi = _lists(loss, logratios=logratios, scores=scores)
    s = beta * r
    better = psi[:, :, None] > psi[:, None, :]  # pair (i, j) with i preferred over j
    weights = lambda_weights(s, psi, log_base=log_base)
    pair_loss = F.softplus(-(s[:, :, None] - s[:, None, :]))  # -log sigma(s_i - s_j)
    losses = torch.where(better, weights * pair_loss, 0).sum(dim=(1, 2))
    with torch.no_grad():
        n_pairs = better.sum(dim=(1, 2)).clamp(min=1)
        agree = (better & (s[:, :, None] > s[:, None, :])).sum(dim=(1, 2)) / n_pairs
        top = psi.argmax(dim=1, keepdim=True)
    metrics = {"rewards/accuracies": agree.to(s.dtype).mean(), "rewards/chosen": s.gather(1, top).mean(),
               "rewards/mean": s.mean()}  # fmt: skip
    return losses, _detach(**metrics)


@register("lipo_lambda", kind="listwise", check=_checker("lipo_lambda"))
def lipo_lambda(*, logratios: Tensor, scores: Tensor, beta: float = 0.1) -> LossOutput:
    """LiPO-lambda: ``sum_{psi_i > psi_j} Delta_ij log(1 + e^{-(s_i - s_j)})``, ``s = beta r`` (Liu et al. 2024,
    LiPO, the LiPO-lambda objective) with the LambdaLoss weights of :func:`lambda_weights` (log base 2).

    With ``K = 2`` and ``Delta = 1`` this is DPO on the pair.

    Args:
        logratios: ``[B, K]`` log-ratios of the K candidates of each prompt.
        scores: ``[B, K]`` labels ``psi`` (reward or preference scores; higher = better; ties add no pair).

    Returns:
        ``[B]`` losses (one per list), metrics (``rewards/accuracies`` = share of label-ordered pairs the
        implicit reward orders the same way).
    """
    _REGISTRY["lipo_lambda"].check(beta=beta)
    return _lambda_loss("lipo_lambda", logratios, scores, beta, 2.0)


@register("rankdpo", kind="listwise", check=_checker("rankdpo"))
def rankdpo(*, logratios: Tensor, scores: Tensor, beta: float = 5000.0) -> LossOutput:
    """RankDPO: Diffusion-DPO over every label-ordered pair of a ranked list, weighted by ``Delta DCG``
    (Karthik et al. 2024, "Scalable Ranked Preference Optimization", Eq. 5-7).

    Scores are the Diffusion-DPO implicit rewards ``s_i = beta r_i`` with ``r = -1/2 (e_theta - e_ref)``
    (:func:`diffusion_logratios`; all candidates of a prompt share noise and timestep), the pair loss is
    ``-log sigma(s_i - s_j)`` and the weight is the LambdaLoss ``Delta DCG`` of swapping the two candidates in
    the model's current ranking (:func:`lambda_weights`, gain ``2^psi - 1``, discount ``log2(1 + rank)``).
    It is the same objective as ``lipo_lambda``; this entry carries the diffusion default ``beta = 5000``.

    Args:
        logratios: ``[B, K]`` log-ratios of the K images of each prompt.
        scores: ``[B, K]`` preference labels (e.g. the mean of several reward models; higher = better).

    Returns:
        ``[B]`` losses (one per list), metrics.
    """
    _REGISTRY["rankdpo"].check(beta=beta)
    return _lambda_loss("rankdpo", logratios, scores, beta, 2.0)


@register("pro", kind="listwise", check=_checker("pro", sft_weight=lambda v: None if v >= 0 else "must be >= 0"))
def pro(
    *, logps: Tensor, lengths: Tensor, scores: Tensor, sft_weight: float = 0.05, reward_temperature: bool = True
) -> LossOutput:
    """PRO: ``sum_k -log softmax`` of the k-th best candidate against all worse ones (Song et al. 2024, Eq. 5).

    Reference-free. Candidate scores are length-normalised log-likelihoods ``a_i = pi_i / n_i``. With candidates
    ordered best first by ``scores``, step ``k`` contrasts ``y_k`` with ``{y_i: i > k}``:
    ``-log( e^{a_k T_k} / (e^{a_k T_k} + sum_{i>k} e^{a_i T_ki}) )`` where, with ``reward_temperature``,
    ``T_ki = psi_k - psi_i`` and ``T_k = max_i T_ki`` (the paper's reward-difference temperatures, as
    ``1/T`` multipliers); otherwise all ``T = 1`` (plain Plackett-Luce). Plus the SFT term
    ``sft_weight (K - 1)^2 (-pi_best)`` on the best candidate's summed log-likelihood, as the official code.

    Args:
        logps: ``[B, K]`` summed policy log-likelihoods.
        lengths: ``[B, K]`` token counts (>= 1).
        scores: ``[B, K]`` rewards ``psi`` (higher = better). Candidates need not be pre-sorted.
        sft_weight: weight of the SFT term (0.05 in the official scripts).
        reward_temperature: use reward differences as temperatures (needs real-valued rewards, not ranks).

    Returns:
        ``[B]`` losses, metrics.
    """
    _REGISTRY["pro"].check(sft_weight=sft_weight)
    pi, n, psi = _lists("pro", logps=logps, lengths=lengths, scores=scores)
    if bool((n <= 0).any()):
        raise VisalignError("loss 'pro': lengths must be >= 1 (an empty completion has no log-likelihood)")
    order = psi.argsort(dim=1, descending=True)
    pi, n, psi = pi.gather(1, order), n.gather(1, order), psi.gather(1, order)
    a = pi / n
    k = psi.shape[1]
    # Step k (0 <= k < K-1) contrasts candidate k with candidates i > k; `later[k, i]` marks those.
    later = torch.triu(torch.ones(k - 1, k, dtype=torch.bool, device=a.device), diagonal=1)
    if reward_temperature:
        temps = (psi[:, : k - 1, None] - psi[:, None, :]).detach()  # [B, K-1, K]: psi_k - psi_i
        t_pos = torch.where(later, temps, -torch.inf).amax(dim=2)  # [B, K-1]
    else:
        temps = torch.ones(a.shape[0], k - 1, k, dtype=a.dtype, device=a.device)
        t_pos = torch.ones_like(a[:, : k - 1])
    pos = a[:, : k - 1] * t_pos
    neg = torch.where(later, a[:, None, :] * temps, -torch.inf)
    rank_losses = torch.logsumexp(torch.cat([pos[:, :, None], neg], dim=2), dim=2) - pos  # [B, K-1]
    losses = rank_losses.sum(dim=1) + sft_weight * (k - 1) ** 2 * -pi[:, 0]
    metrics = {"rank_loss": rank_losses.sum(dim=1).mean(), "nll_loss": -pi[:, 0].mean(),
               "rewards/accuracies": (a[:, :1] > a[:, 1:]).to(a.dtype).mean()}  # fmt: skip
    return losses, _detach(**metrics)


# --------------------------------------------------------------------------------------------------------------
# Losses on per-sample denoising errors (diffusion, reference-free)
# --------------------------------------------------------------------------------------------------------------


def _mapo_score(e: Tensor, s: float) -> Tensor:
    """``f(e) = s e / (e^{s e} - 1)``, with its limit 1 at ``e = 0`` (and a finite gradient there)."""
    x = s * e
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2, safe / torch.expm1(safe))


@register("mapo", kind="errors",
          check=_checker("mapo", mapo_snr=_positive_rule, num_train_timesteps=_positive_rule))  # fmt: skip
def mapo(
    *,
    chosen_errors: Tensor,
    rejected_errors: Tensor,
    beta: float = 0.1,
    mapo_snr: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO (reference-free): ``e_w - beta log sigma(T (f(e_w) - f(e_l)))``, ``f(e) = s e / (e^{s e} - 1)``
    (Hong et al. 2024, MaPO, as the official mapo-t2i ``compute_loss``).

    ``f`` is decreasing, so a lower winner error widens the margin and lowers the loss; ``e_w`` itself is the
    likelihood (SFT) term on the winner. No reference forward.

    Args:
        chosen_errors, rejected_errors: ``[B]`` per-sample mean denoising errors of winner and loser (same noise
            and timestep), with gradients.
        beta: weight of the margin term (0.1); mapo_snr: ``s`` (0.5); num_train_timesteps: ``T`` (1000).

    Returns:
        ``[B]`` losses, metrics (``rewards/accuracies = mean(e_w < e_l)``, ``mapo/margin``).
    """
    _REGISTRY["mapo"].check(beta=beta, mapo_snr=mapo_snr, num_train_timesteps=num_train_timesteps)
    e_w, e_l = _batch("mapo", chosen_errors=chosen_errors, rejected_errors=rejected_errors)
    f_w, f_l = _mapo_score(e_w, mapo_snr), _mapo_score(e_l, mapo_snr)
    ratio = F.logsigmoid(num_train_timesteps * (f_w - f_l))
    losses = e_w - beta * ratio
    metrics = {"rewards/accuracies": (e_w < e_l).to(e_w.dtype).mean(), "mapo/margin": (f_w - f_l).mean(),
               "mapo/ratio_loss": -ratio.mean(), "mapo/error_chosen": e_w.mean(),
               "mapo/error_rejected": e_l.mean()}  # fmt: skip
    return losses, _detach(**metrics)


# --------------------------------------------------------------------------------------------------------------
# Weighted combinations
# --------------------------------------------------------------------------------------------------------------


def parse_loss_spec(spec: str | Sequence[str | tuple[str, float]]) -> list[tuple[str, float]]:
    """``"sigmoid:1.0,bco_pair:0.5,sft"`` or ``[("sigmoid", 1.0), "sft"]`` -> ``[(name, weight), ...]``.

    A missing weight is 1.0. Unknown names, repeated names, non-numeric or negative weights raise
    :class:`ConfigError`.
    """
    if isinstance(spec, str):
        items: list[str | tuple[str, float]] = [p for p in (s.strip() for s in spec.split(",")) if p]
    else:
        items = list(spec)
    if not items:
        raise ConfigError(f"empty loss specification {spec!r}; available losses: {', '.join(available())}")
    terms: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, str):
            name, _, weight_text = item.partition(":")
            name = name.strip()
            try:
                weight = float(weight_text) if weight_text.strip() else 1.0
            except ValueError:
                raise ConfigError(f"loss {name!r}: weight {weight_text.strip()!r} is not a number") from None
        else:
            name, weight = item
        get(name)  # unknown names list the available ones
        if not (math.isfinite(float(weight)) and float(weight) >= 0):
            raise ConfigError(f"loss {name!r}: weight must be a finite number >= 0, got {weight!r}")
        if name in (n for n, _ in terms):
            raise ConfigError(f"loss {name!r} appears twice in {spec!r}; give it once with the summed weight")
        terms.append((name, float(weight)))
    return terms


def _layout(kind: str) -> str:
    return "pair" if kind in _PAIR_LAYOUT else kind


@dataclass
class PreferenceLoss:
    """A validated weighted sum of registered losses: ``losses = sum_k w_k loss_k`` per sample.

    Hyper-parameters are shared like TRL's config: each one goes to every term that takes it (``beta`` to all),
    and its value is checked against each term's rules when the object is built. All terms must share one
    sample layout (pairs, unpaired examples, or lists).

    Attributes:
        terms: ``[(name, weight), ...]``.
        params: the shared hyper-parameters given.
    """

    terms: list[tuple[str, float]]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.specs = [get(name) for name, _ in self.terms]
        layouts = {_layout(s.kind) for s in self.specs}
        if len(layouts) > 1:
            kinds = ", ".join(f"{s.name} ({s.kind})" for s in self.specs)
            raise ConfigError(f"losses {kinds} cannot be summed: they score different units (pairs, examples, lists)")
        accepted = {p for s in self.specs for p in s.params}
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ConfigError(f"no loss in {self.names} takes parameter(s) {unknown}; they take {sorted(accepted)}")
        for s in self.specs:
            s.validate(**{k: v for k, v in self.params.items() if k in s.params})

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.terms]

    @property
    def inputs(self) -> set[str]:
        """Tensor inputs that at least one term requires."""
        return {i for s in self.specs for i in s.inputs}

    def __call__(self, **inputs: Tensor) -> LossOutput:
        """Evaluate every term on the tensors it takes.

        Args:
            **inputs: tensors by name (``TENSOR_INPUTS``); each term receives the ones in its signature.

        Returns:
            ``[B]`` weighted per-sample losses; metrics merged (the first term's value wins on a shared key)
            plus ``loss/<name>`` = each term's unweighted batch mean.
        """
        unknown = sorted(set(inputs) - TENSOR_INPUTS)
        if unknown:
            raise VisalignError(f"unknown loss input(s) {unknown}; known inputs: {sorted(TENSOR_INPUTS)}")
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for (name, weight), spec in zip(self.terms, self.specs):
            missing = [i for i in spec.inputs if i not in inputs]
            if missing:
                raise VisalignError(f"loss {name!r} needs input(s) {missing}; got {sorted(inputs)}")
            kwargs = {k: v for k, v in inputs.items() if k in spec.inputs or k in spec.optional_inputs}
            kwargs.update({k: v for k, v in self.params.items() if k in spec.params})
            losses, term_metrics = spec.fn(**kwargs)
            if total is not None and losses.shape != total.shape:
                raise VisalignError(f"loss {name!r} returned shape {list(losses.shape)}, others {list(total.shape)}")
            total = weight * losses if total is None else total + weight * losses
            for key, value in term_metrics.items():
                metrics.setdefault(key, value)
            metrics[f"loss/{name}"] = losses.detach().mean()
        assert total is not None
        return total, metrics


def build(spec: str | Sequence[str | tuple[str, float]], **params: Any) -> PreferenceLoss:
    """Build a (weighted sum of) loss(es) from ``"name:weight,..."`` or ``[(name, weight), ...]``, validated now.

    Example: ``build("sigmoid:1.0,bco_pair:0.5,sft:1.0", beta=0.1)`` (the MPO-style mix of TRL's docs).
    """
    return PreferenceLoss(parse_loss_spec(spec), dict(params))
