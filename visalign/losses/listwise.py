"""Listwise losses over K candidates per prompt: LiPO-lambda, RankDPO, PRO, and reward-weighted regression."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visalign.errors import VisalignError

from .registry import _REGISTRY, LossOutput, Tensor, _checker, register
from .tensors import _detach, _float


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


def _positive_temperature(value) -> str | None:
    return None if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else "must be > 0"


@register("rwr", kind="listwise", check=_checker("rwr", temperature=_positive_temperature))
def rwr(*, errors: Tensor, scores: Tensor, temperature: float = 1.0) -> LossOutput:
    """Reward-weighted regression (Flow-RWR; Liu et al. 2025, "Improving Video Generation with Human Feedback",
    VideoAlign): ``sum_k softmax(scores / temperature)_k * e_k`` over the K samples of a prompt.

    The weights carry no gradient (scores are labels); a score of ``-inf`` gives its sample weight 0 (an invalid
    sample), so each list needs at least one finite score.

    Args:
        errors: ``[B, K]`` per-sample denoising errors of the model's own samples (the regression targets).
        scores: ``[B, K]`` rewards (or their group-normalised advantages) of those samples.
        temperature: softmax temperature: small -> regress on the best sample only, large -> on all alike.

    Returns:
        ``[B]`` losses (one per list), metrics.
    """
    _REGISTRY["rwr"].check(temperature=temperature)
    e, s = _lists("rwr", errors=errors, scores=scores)
    if not torch.isfinite(s).any(dim=1).all():
        raise VisalignError("loss 'rwr': every list needs at least one finite score (drop all-invalid lists)")
    weights = torch.softmax(s.detach() / temperature, dim=1).to(e.dtype)
    losses = (weights * e).sum(dim=1)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=1)
    metrics = {"rwr/max_weight": weights.amax(dim=1).mean(), "rwr/weight_entropy": entropy.mean(),
               "rwr/error": e.mean()}  # fmt: skip
    return losses, _detach(**metrics)
