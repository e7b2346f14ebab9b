"""Online-RL math shared by every modality: group advantages, the PPO-clip surrogate, KL estimators, shaping.

Pure tensor functions (plus one small stateful tracker for per-prompt statistics across steps). Conventions:

- Rewards are float ``[N]``, one per rollout; ``group_ids`` ``[N]`` (any integers) say which rollouts share a
  prompt. Statistics are computed in float64 and returned in the rewards' float dtype (float32 for integers).
- Standard deviations are **population** std (``ddof = 0``, ``numpy.std``'s default), as flow_grpo's
  ``PerPromptStatTracker``; pass ``unbiased=True`` for ``torch.std``'s ``ddof = 1`` (TRL, DanceGRPO).
- A **singleton group** (one rollout for its prompt) gets advantage exactly 0 in every estimator: there is no
  baseline to compare it with, so it carries no learning signal (rather than a NaN or its raw reward).
- Group-relative advantages are computed without gradient (rewards are data, not functions of the policy).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, VisalignError

__all__ = [
    "PromptStatTracker",
    "clip_advantages",
    "flat_groups",
    "gaussian_mean_kl",
    "group_advantages",
    "group_ids_from_prompts",
    "grpo_advantages",
    "kl_estimate",
    "par_shaping",
    "ppo_clip_loss",
    "rloo_advantages",
]

Tensor = torch.Tensor
STD_MODES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def _rewards_and_groups(rewards: Tensor, group_ids: Tensor | None, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Validate ``rewards [N]`` and return them in float64 with dense group indices ``[N]`` in ``[0, G)``."""
    if not isinstance(rewards, Tensor) or rewards.ndim != 1 or rewards.numel() == 0:
        got = list(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise VisalignError(f"rewards must be a non-empty 1-D tensor [N], got {got}")
    if not bool(torch.isfinite(rewards).all()):
        index = int(torch.nonzero(~torch.isfinite(rewards))[0, 0])
        raise VisalignError(f"rewards[{index}] is {rewards[index].item()}; every reward must be finite")
    n = rewards.shape[0]
    if group_ids is None and group_size is None:
        raise VisalignError("pass group_ids [N] (which prompt each rollout answers) or group_size (contiguous groups)")
    if group_ids is not None and group_size is not None:
        raise VisalignError("pass group_ids or group_size, not both")
    if group_size is not None:
        if group_size < 1 or n % group_size:
            raise VisalignError(f"{n} rewards do not split into groups of group_size={group_size}")
        dense = torch.arange(n, device=rewards.device) // group_size
    else:
        if not isinstance(group_ids, Tensor) or group_ids.shape != rewards.shape:
            got = list(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
            raise VisalignError(f"group_ids must be a tensor of shape {list(rewards.shape)} like rewards, got {got}")
        dense = torch.unique(group_ids, return_inverse=True)[1].to(rewards.device)
    return rewards.detach().to(torch.float64), dense


def _group_stats(r: Tensor, g: Tensor, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group count, mean and std (population unless ``unbiased``), all ``[N]`` float64."""
    n_groups = int(g.max()) + 1
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, g, r) / count
    sq = torch.zeros_like(count).index_add_(0, g, (r - mean[g]) ** 2)
    dof = (count - 1).clamp(min=1) if unbiased else count
    return count[g], mean[g], (sq / dof).sqrt()[g]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    group_size: int | None = None,
    std: str = "group",
    eps: float = 1e-4,
    unbiased: bool = False,
) -> Tensor:
    """GRPO advantages ``(r - mean_group) / (std + eps)`` (Shao et al. 2024, DeepSeekMath Sec. 4.1.2).

    ``std="group"`` divides by each group's std (DeepSeekMath, DanceGRPO); ``std="batch"`` by the std of the
    whole batch (flow_grpo with ``global_std``, Liu et al. 2025); ``std="none"`` does not divide (Dr. GRPO,
    Liu et al. 2025, "Understanding R1-Zero-Like Training": the std term up-weights too easy and too hard prompts).

    Args:
        rewards: ``[N]`` rewards.
        group_ids: ``[N]`` integers; equal ids share a prompt. Or ``group_size``: contiguous groups of that size.
        std: ``"group"``, ``"batch"`` or ``"none"``.
        eps: added to the std (1e-4 as flow_grpo; DeepSeekMath/TRL use 1e-4 too).
        unbiased: ``ddof = 1`` std instead of the population std.

    Returns:
        ``[N]`` advantages; 0 for singleton groups.
    """
    if std not in STD_MODES:
        raise ConfigError(f"std must be one of {STD_MODES}, got {std!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    r, g = _rewards_and_groups(rewards, group_ids, group_size)
    count, mean, group_std = _group_stats(r, g, unbiased)
    centred = r - mean
    if std == "group":
        scale = group_std + eps
    elif std == "batch":
        scale = (r.std(correction=1 if unbiased and r.numel() > 1 else 0) + eps).expand_as(r)
    else:
        scale = torch.ones_like(r)
    # Zero where the group has one member (no baseline, no signal) or all rewards tie with eps = 0 (0/0).
    adv = torch.where((count > 1) & (scale > 0), centred / scale.clamp(min=torch.finfo(r.dtype).tiny), 0.0)
    return adv.to(_out_dtype(rewards))


def grpo_advantages(rewards: Tensor, group_ids: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Alias of :func:`group_advantages` with ``std="group"`` by default."""
    return group_advantages(rewards, group_ids, **kwargs)


def flat_groups(rewards: Tensor, valid: Tensor, group_ids: Tensor) -> Tensor:
    """``[N]`` bool: the valid samples of groups whose valid rewards all tie (a singleton group too).

    Their group-relative advantages are 0, so they carry no policy gradient: DAPO (Yu et al. 2025, "dynamic
    sampling") leaves such groups out of the update. Ties are exact (``max == min``), as a verifiable reward's are.
    """
    if not (rewards.shape == valid.shape == group_ids.shape and rewards.ndim == 1):
        shapes = [list(rewards.shape), list(valid.shape), list(group_ids.shape)]
        raise VisalignError(f"rewards, valid and group_ids must be [N] alike, got {shapes}")
    out = torch.zeros_like(valid, dtype=torch.bool)
    if not bool(valid.any()):
        return out
    r, g = rewards[valid].double(), torch.unique(group_ids[valid], return_inverse=True)[1]
    size = int(g.max()) + 1
    high = torch.full((size,), -math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, g, r, "amax")
    low = torch.full((size,), math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, g, r, "amin")
    out[valid] = (high == low)[g]
    return out


def rloo_advantages(rewards: Tensor, group_ids: Tensor | None = None, *, group_size: int | None = None) -> Tensor:
    """REINFORCE leave-one-out: ``A_i = r_i - mean_{j != i} r_j`` within the group (Ahmadian et al. 2024).

    Equals ``K/(K-1) (r_i - mean_group)`` for a group of ``K``; singleton groups get 0.

    Args:
        rewards: ``[N]``; group_ids: ``[N]`` or group_size (contiguous groups).

    Returns:
        ``[N]`` advantages.
    """
    r, g = _rewards_and_groups(rewards, group_ids, group_size)
    count, mean, _ = _group_stats(r, g, False)
    adv = torch.where(count > 1, (r - mean) * count / (count - 1).clamp(min=1), torch.zeros_like(r))
    return adv.to(_out_dtype(rewards))


def clip_advantages(advantages: Tensor, max_abs: float = 5.0) -> Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (flow_grpo's ``adv_clip_max = 5``)."""
    if not (max_abs > 0):
        raise ConfigError(f"max_abs must be > 0, got {max_abs!r}")
    return advantages.clamp(-max_abs, max_abs)


def ppo_clip_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    *,
    clip_range: float = 1e-4,
    clip_range_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO clipped surrogate ``max(-A rho, -A clip(rho, 1 - c, 1 + c_high))`` (Schulman et al. 2017, Eq. 7).

    ``rho = exp(logp - logp_old)``. Flow-GRPO uses ``c = 1e-4`` (``1e-5`` in the fast variant) because a
    diffusion step's log-prob is a mean over many latent elements; text GRPO uses 0.2. ``clip_range_high``
    decouples the upper bound (DAPO's "clip-higher", Yu et al. 2025).

    Args:
        logp: ``[N]`` log-probs under the current policy (with gradient), fp32 recommended.
        logp_old: ``[N]`` log-probs at rollout time (no gradient).
        advantages: ``[N]``.
        clip_range: ``c``; clip_range_high: upper ``c`` (default: ``c``).

    Returns:
        ``[N]`` per-sample losses, metrics: ``clipfrac`` (share with ``|rho - 1| > c``), ``approx_kl``
        (``1/2 mean((logp - logp_old)^2)``, flow_grpo's), ``ratio`` (mean ``rho``).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    if not (0 < clip_range < 1 and high > 0):
        raise ConfigError(
            f"clip ranges must satisfy 0 < clip_range < 1 and clip_range_high > 0, got {clip_range}, {high}"
        )
    if not (logp.shape == logp_old.shape == advantages.shape):
        shapes = [list(logp.shape), list(logp_old.shape), list(advantages.shape)]
        raise VisalignError(f"logp, logp_old and advantages must share one shape, got {shapes}")
    log_ratio = logp - logp_old.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    losses = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + high))
    with torch.no_grad():
        clipped = (ratio < 1 - clip_range) | (ratio > 1 + high)
        metrics = {
            "clipfrac": clipped.to(ratio.dtype).mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "ratio": ratio.mean(),
        }
    return losses, metrics


def kl_estimate(logp: Tensor, logp_ref: Tensor, kind: str = "k3") -> Tensor:
    """Per-sample estimators of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman 2020, "Approximating KL").

    With ``log u = logp_ref - logp``: ``k1 = -log u`` (unbiased, high variance, can be negative);
    ``k2 = 1/2 (log u)^2`` (biased, low variance); ``k3 = (u - 1) - log u`` (unbiased, always >= 0; the GRPO KL
    term, DeepSeekMath Eq. 4).

    Args:
        logp: ``[...]`` log-probs of the sampled actions under the policy (with gradient).
        logp_ref: same shape, under the reference (no gradient).
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        Per-sample estimates, same shape.
    """
    if kind not in KL_ESTIMATORS:
        raise ConfigError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    if logp.shape != logp_ref.shape:
        raise VisalignError(f"logp {list(logp.shape)} and logp_ref {list(logp_ref.shape)} must have one shape")
    log_u = logp_ref.detach() - logp
    if kind == "k1":
        return -log_u
    if kind == "k2":
        return 0.5 * log_u**2
    return torch.expm1(log_u) - log_u


def gaussian_mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL between two Gaussian SDE steps with one std: ``mean((mu - mu_ref)^2) / (2 std^2)`` per sample.

    The exact ``KL(N(mu, s^2) || N(mu_ref, s^2))`` per element, averaged over non-batch dims (Flow-GRPO's KL
    term, Liu et al. 2025; GRPO passes the sampler's noise scale as ``std``, as :func:`visalign.sde.kl_to_reference`
    explains).

    Args:
        mean, mean_ref: ``[B, ...]`` step means of policy and reference (no gradient for the reference).
        std: scalar or ``[B]`` (broadcast over the rest).

    Returns:
        ``[B]`` KL per sample.
    """
    if mean.shape != mean_ref.shape:
        raise VisalignError(f"mean {list(mean.shape)} and mean_ref {list(mean_ref.shape)} must have one shape")
    sq = (mean.float() - mean_ref.detach().float()).pow(2).flatten(1).mean(dim=1)
    std_t = torch.as_tensor(std, dtype=sq.dtype, device=sq.device)
    return sq / (2 * std_t.reshape(-1) ** 2 if std_t.ndim else 2 * std_t**2)


def par_shaping(rewards: Tensor, reference_rewards: Tensor) -> Tensor:
    """Preference-as-Reward shaping: ``r_RL = mean_m sigma(r - r_ref_m)`` (Fu et al. 2025, PAR).

    The Bradley-Terry probability that the response beats the reference responses of the same prompt: a reward
    centred on the reference and bounded in (0, 1), which limits reward hacking.

    Args:
        rewards: ``[N]`` raw rewards.
        reference_rewards: ``[N]`` (one reference per sample) or ``[N, M]`` rewards of ``M`` reference responses
            to the same prompt (PAR finds ``M = 1`` enough).

    Returns:
        ``[N]`` shaped rewards in ``(0, 1)``.
    """
    if rewards.ndim != 1:
        raise VisalignError(f"rewards must be [N], got {list(rewards.shape)}")
    ref = reference_rewards if reference_rewards.ndim == 2 else reference_rewards[:, None]
    if ref.ndim != 2 or ref.shape[0] != rewards.shape[0] or ref.shape[1] == 0:
        raise VisalignError(
            f"reference_rewards must be [N] or [N, M] with N = {rewards.shape[0]}, got {list(reference_rewards.shape)}"
        )
    return torch.sigmoid(rewards[:, None] - ref).mean(dim=1)


def group_ids_from_prompts(prompts: Sequence[Hashable], device: torch.device | str | None = None) -> Tensor:
    """Dense group ids ``[N]`` (first occurrence order) from a list of prompts (or any hashable keys)."""
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompts], dtype=torch.long, device=device)


class PromptStatTracker:
    """Per-prompt reward statistics across steps, turned into z-scored advantages.

    ``update(prompts, rewards)`` appends the rewards to each prompt's history and returns
    ``(r - mean_prompt) / (std + eps)``. The history is unbounded (flow_grpo's ``PerPromptStatTracker``) or the last
    ``buffer_size`` rewards (ddpo-pytorch's); a prompt seen fewer than ``min_count`` times is normalised with the
    current batch's statistics instead (ddpo-pytorch). ``global_std`` divides by the batch std (flow_grpo).
    A prompt with a single reward in its history (and no batch fallback) gets advantage 0.

    Args:
        buffer_size: keep at most this many rewards per prompt (``None``: keep all until :meth:`clear`).
        min_count: below this many rewards, use the batch mean/std.
        global_std: divide by the std of the current batch instead of the prompt's.
        eps: added to the std (1e-4, flow_grpo).
    """

    def __init__(
        self, buffer_size: int | None = None, min_count: int = 0, global_std: bool = False, eps: float = 1e-4
    ) -> None:
        if buffer_size is not None and buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1 or None, got {buffer_size!r}")
        if min_count < 0:
            raise ConfigError(f"min_count must be >= 0, got {min_count!r}")
        self.buffer_size, self.min_count, self.global_std, self.eps = buffer_size, min_count, global_std, eps
        self.stats: dict[Hashable, deque[float]] = {}

    def update(self, prompts: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """Record the rewards and return their advantages.

        Args:
            prompts: ``N`` prompts (or keys); rewards: ``[N]``.

        Returns:
            ``[N]`` advantages (rewards' float dtype, on their device).
        """
        if not isinstance(rewards, Tensor) or rewards.ndim != 1 or len(prompts) != rewards.shape[0]:
            got = list(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
            raise VisalignError(f"got {len(prompts)} prompts but rewards of shape {got}; pass one reward per prompt")
        r = rewards.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(r).all()):
            raise VisalignError("rewards must be finite")
        batch_mean, batch_std = r.mean(), r.std(correction=0)
        out = torch.empty_like(r)
        groups = group_ids_from_prompts(prompts)
        keys = list(dict.fromkeys(prompts))
        for gi, key in enumerate(keys):
            mask = groups == gi
            history = self.stats.setdefault(key, deque(maxlen=self.buffer_size))
            history.extend(r[mask].tolist())
            values = torch.tensor(list(history), dtype=torch.float64)
            if len(values) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = values.mean(), values.std(correction=0)
            if self.global_std:
                std = batch_std
            # A prompt with one reward so far is its own mean: 0 exactly, also when eps = 0 and std = 0.
            out[mask] = (r[mask] - mean) / (std + self.eps) if std + self.eps > 0 else 0.0
        return out.to(device=rewards.device, dtype=_out_dtype(rewards))

    def clear(self) -> None:
        """Forget all history (flow_grpo clears once per epoch)."""
        self.stats.clear()

    def state_dict(self) -> dict[str, Any]:
        """Picklable state, so that resuming a run reproduces its advantages."""
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}

    def __len__(self) -> int:
        return len(self.stats)

    def prompts(self) -> Iterable[Hashable]:
        return self.stats.keys()
