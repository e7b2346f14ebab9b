"""Rewards whose value is known by construction, for the tests of trainers, monitors and guidance."""

from __future__ import annotations

from reward_models.base import Reward, RewardSpec
from visalign.metrics import brightness


class Brightness(Reward):
    """Mean luma (times ``sign``): a reward any sample can hack by brightening (images and videos)."""

    def __init__(self, sign: float = 1.0, name: str = "brightness", differentiable: bool = False):
        spec = RewardSpec(name, modalities=("image", "video"), needs_prompt=False, differentiable=differentiable)
        super().__init__(spec)
        self.sign = sign

    def score_batch(self, media, prompts):
        return self.sign * brightness(media)
