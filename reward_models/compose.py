"""Explicit rescaling and combination of rewards: :class:`Affine`, :class:`ZScore`, :class:`Composite`.

Scorers return raw scores; these wrappers are the only place scores change scale, so a number in a log always
says which transformation produced it.

* ``Affine(r, scale, shift)``: ``scale * r + shift`` (e.g. PickScore / 26, or a nominal range to [0, 1]).
* ``ZScore(r, mean, std)``: ``(r - mean) / (std + eps)`` with fixed statistics (from :meth:`ZScore.calibrate`
  on a reference set), or, with ``mean=std=None``, the statistics of each call's batch.
* ``Composite``: a weighted sum ``sum_i w_i r_i`` of members, optionally normalised either way:
  ``"normalise-then-sum"`` z-scores each member before weighting, ``"sum-then-normalise"`` z-scores the
  weighted sum. Statistics are fixed (``stats``) or per batch. Components hold every member's raw score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Reward, RewardOutput, RewardSpec, RewardSpecError, check_prompts, media_modality

NORMALIZATIONS = ("none", "normalise-then-sum", "sum-then-normalise")
_ALIASES = {"normalize-then-sum": "normalise-then-sum", "sum-then-normalize": "sum-then-normalise"}


def zscore(
    x: torch.Tensor,
    mean: float | torch.Tensor | None,
    std: float | torch.Tensor | None,
    eps: float,
    valid: torch.Tensor | None = None,
):
    """``(x - mean) / (std + eps)``; ``mean``/``std`` ``None`` use the batch's (population std) over the ``valid``
    samples only, so one unscorable sample (NaN) does not spoil the others."""
    if mean is None or std is None:
        ref = x if valid is None else x[valid]
        mean = ref.mean() if ref.numel() else torch.zeros((), device=x.device)
        std = ref.std(correction=0) if ref.numel() > 1 else torch.zeros((), device=x.device)
    return (x - mean) / (std + eps)


class _Wrapper(Reward):
    """A reward that transforms another reward's full-batch output (validation is the inner reward's)."""

    def __init__(self, reward: Reward, spec: RewardSpec):
        super().__init__(spec, reward.batch_size)
        self.reward = reward

    def forward(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        out = self.reward(media, prompts)
        return self.transform(out)

    def transform(self, out: RewardOutput) -> RewardOutput:
        raise NotImplementedError


class Affine(_Wrapper):
    """``scale * r + shift`` (``components["raw"]``: the inner scores)."""

    def __init__(self, reward: Reward, scale: float = 1.0, shift: float = 0.0):
        lo_hi = reward.spec.nominal_range
        rng = None if lo_hi is None else tuple(sorted((scale * lo_hi[0] + shift, scale * lo_hi[1] + shift)))
        spec = RewardSpec(
            f"affine({reward.spec.name})",
            reward.spec.modalities,
            reward.spec.needs_prompt,
            reward.spec.differentiable,
            reward.spec.pairwise,
            rng,
            f"{scale} * {reward.spec.name} + {shift}",
        )
        super().__init__(reward, spec)
        self.scale = float(scale)
        self.shift = float(shift)

    @classmethod
    def to_unit(cls, reward: Reward) -> Affine:
        """Map the reward's ``nominal_range`` to ``[0, 1]``."""
        if reward.spec.nominal_range is None:
            raise RewardSpecError(f"{reward.spec.name} has no nominal_range to map to [0, 1]")
        lo, hi = reward.spec.nominal_range
        return cls(reward, 1.0 / (hi - lo), -lo / (hi - lo))

    def transform(self, out: RewardOutput) -> RewardOutput:
        return RewardOutput(self.scale * out.scores + self.shift, {**out.components, "raw": out.scores}, out.valid)


class ZScore(_Wrapper):
    """``(r - mean) / (std + eps)``; fixed statistics, or the batch's when ``mean``/``std`` are ``None``.

    Batch statistics use only valid samples; invalid ones are normalised with them too.
    """

    def __init__(self, reward: Reward, mean: float | None = None, std: float | None = None, eps: float = 1e-6):
        if (mean is None) != (std is None):
            raise RewardSpecError("ZScore needs both mean and std, or neither (batch statistics)")
        spec = RewardSpec(
            f"zscore({reward.spec.name})",
            reward.spec.modalities,
            reward.spec.needs_prompt,
            reward.spec.differentiable,
            reward.spec.pairwise,
            (-3.0, 3.0),
            f"z-scored {reward.spec.name}",
        )
        super().__init__(reward, spec)
        self.mean, self.std, self.eps = mean, std, eps

    @classmethod
    def calibrate(cls, reward: Reward, media: torch.Tensor, prompts: Sequence[str] | None = None, eps=1e-6):
        """Fixed statistics measured on a reference set (valid samples only)."""
        with torch.no_grad():
            out = reward(media, prompts)
        s = out.scores[out.valid]
        return cls(reward, float(s.mean()), float(s.std(correction=0)), eps)

    def transform(self, out: RewardOutput) -> RewardOutput:
        if self.mean is None:
            valid = out.scores[out.valid]
            mean = valid.mean() if valid.numel() else 0.0
            std = valid.std(correction=0) if valid.numel() > 1 else 0.0
        else:
            mean, std = self.mean, self.std
        return RewardOutput((out.scores - mean) / (std + self.eps), {**out.components, "raw": out.scores}, out.valid)


class Composite(Reward):
    """Weighted sum of rewards, with optional normalisation before or after summing.

    Args:
        members: ``(name, reward, weight)`` triples (names must be unique; they key the components).
        normalize: ``"none"``, ``"normalise-then-sum"`` or ``"sum-then-normalise"``.
        stats: fixed statistics for normalisation: ``{name: (mean, std)}`` for normalise-then-sum, or
            ``{"sum": (mean, std)}`` for sum-then-normalise; missing entries use each call's batch.
        eps: added to the standard deviation.
    """

    def __init__(
        self,
        members: Sequence[tuple[str, Reward, float]],
        normalize: str = "none",
        stats: dict[str, tuple[float, float]] | None = None,
        eps: float = 1e-6,
    ):
        normalize = _ALIASES.get(normalize, normalize)
        if normalize not in NORMALIZATIONS:
            raise RewardSpecError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not members:
            raise RewardSpecError("a composite needs at least one member")
        names = [n for n, _, _ in members]
        if len(set(names)) != len(names):
            raise RewardSpecError(f"composite member names must be unique, got {names}")
        specs = [r.spec for _, r, _ in members]
        modalities = tuple(m for m in ("image", "video") if all(m in s.modalities for s in specs))
        if not modalities:
            raise RewardSpecError(f"members {names} share no modality; wrap image rewards with video(...)")
        spec = RewardSpec(
            ",".join(f"{n}:{w:g}" for n, _, w in members),
            modalities,
            needs_prompt=any(s.needs_prompt for s in specs),
            differentiable=all(s.differentiable for s in specs),
            pairwise=any(s.pairwise for s in specs),
            nominal_range=None,
            description=f"weighted sum ({normalize})",
        )
        super().__init__(spec, min(r.batch_size for _, r, _ in members))
        self.names = names
        self.weights = [float(w) for _, _, w in members]
        self.members = torch.nn.ModuleList([r for _, r, _ in members])
        self.normalize = normalize
        self.stats = dict(stats or {})
        self.eps = eps

    def forward(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        media_modality(media, self.spec.name)
        prompts = check_prompts(prompts, media.shape[0], self.spec)
        components, valid = {}, None
        total = 0.0
        outputs = [reward(media, prompts) for reward in self.members]
        for out in outputs:
            valid = out.valid if valid is None else valid & out.valid
        for name, weight, out in zip(self.names, self.weights, outputs):
            components[name] = out.scores
            value = out.scores
            if self.normalize == "normalise-then-sum":
                mean, std = self.stats.get(name, (None, None))
                value = zscore(value, mean, std, self.eps, valid)
            total = total + weight * value
        if self.normalize == "sum-then-normalise":
            components["sum"] = total
            mean, std = self.stats.get("sum", (None, None))
            total = zscore(total, mean, std, self.eps, valid)
        return RewardOutput(total, components, valid)
