"""Diffusion-specific pieces: the log-ratio of a denoising error (so pairwise losses apply to diffusion
unchanged) and MaPO, which works on per-sample errors directly, without a reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import _REGISTRY, LossOutput, Tensor, _checker, _positive_rule, register
from .tensors import _batch, _detach


def diffusion_logratios(errors: Tensor, ref_errors: Tensor) -> Tensor:
    """The log-ratio of a diffusion or flow sample: ``r = -1/2 (e_theta - e_ref)`` (docs/design.md).

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
