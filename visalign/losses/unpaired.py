"""Unpaired losses, one value per example rather than per pair: KTO, APO-zero (unpaired), NPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visalign.errors import VisalignError

from .registry import _REGISTRY, LossOutput, Tensor, _checker, _positive_rule, register
from .tensors import _batch


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
