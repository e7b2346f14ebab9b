"""Reference-free pairwise losses on policy log-likelihoods: SimPO, CPO, ORPO."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pairwise import _cdpo_eps
from .registry import _REGISTRY, LossOutput, Tensor, _checker, register
from .tensors import _batch, _lengths, _reward_metrics, _smoothed_sigmoid, _token_mean_nll


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
