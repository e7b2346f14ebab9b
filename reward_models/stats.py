"""``stats``: an image statistic as a reward: brightness, saturation or colour entropy (images and videos).

No weights and no prompt. Two uses: a **penalty** inside a composite (``"hps-v2.1,stats(stat=saturation):-0.5"``
discourages the oversaturation that preference rewards drift into), and a **deliberately hackable reward** for
checking that the reward-hacking monitors of the online trainers fire: a policy paid for brightness washes its
samples out while any prompt-following metric falls. The statistics are those the monitors log as drift
(:mod:`visalign.metrics`), so the training reward and the drift curve are the same number. Differentiable (the
colour entropy's histogram is not; use it for scoring only).
"""

from __future__ import annotations

import torch

from .base import Reward
from .specs import BUILTIN_SPECS

STATS = ("brightness", "saturation", "color_entropy")


class StatsReward(Reward):
    """``sign * stat(media)`` per sample.

    Args:
        stat: ``"brightness"`` (mean Rec. 601 luma), ``"saturation"`` (mean HSV saturation) or
            ``"color_entropy"`` (bits of the 8-level colour histogram).
        sign: ``-1`` turns the statistic into a penalty (or pays for darkness).
    """

    def __init__(self, stat: str = "brightness", sign: float = 1.0, batch_size: int = 64):
        stat = {"colour_entropy": "color_entropy"}.get(stat, stat)
        if stat not in STATS:
            raise ValueError(f"stat must be one of {', '.join(STATS)}, got {stat!r}")
        super().__init__(BUILTIN_SPECS["stats"], batch_size)
        self.stat, self.sign = stat, float(sign)

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        from visalign import metrics

        return self.sign * getattr(metrics, self.stat)(media)


def load_stats(stat: str = "brightness", sign: float = 1.0, batch_size: int = 64) -> StatsReward:
    """The statistic reward (no weights)."""
    return StatsReward(stat, sign, batch_size).freeze()


def random_stats(size: str = "tiny", stat: str = "brightness", sign: float = 1.0) -> StatsReward:
    """No weights: the same as :func:`load_stats`."""
    return load_stats(stat, sign)
