"""Pairwise losses on log-ratios ``r_c, r_r`` (the DPO family), plus the ``sft`` term on the chosen side.

Every function takes per-pair tensors ``[B]`` and returns ``([B] losses, metrics)``; see the package docstring
for the log-ratio convention shared by text and diffusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visalign.errors import ConfigError, VisalignError

from .registry import _REGISTRY, F_DIVERGENCES, LossOutput, Tensor, _checker, _positive_rule, register
from .tensors import _batch, _detach, _lengths, _reward_metrics, _smoothed_sigmoid, _token_mean_nll


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
