"""Reward models behind one protocol and one registry (docs/design.md, "Rewards: one protocol").

```
from reward_models import build_reward, list_rewards
reward = build_reward("hps-v2.1:1.0,clip:0.5", device="cuda", dtype="bf16")
out = reward(images, prompts)          # images [B, 3, H, W] in [0, 1] -> out.scores [B] float32
```

Importing this package is light (torch only); open_clip and transformers load when a reward is built.
"""

from .base import (
    CheckpointError,
    Reward,
    RewardError,
    RewardInputError,
    RewardOutput,
    RewardSpec,
    RewardSpecError,
    TextEmbeddingCache,
    UnknownRewardError,
)
from .compose import Affine, Composite, ZScore
from .registry import (
    RewardEntry,
    build_random_reward,
    build_reward,
    list_rewards,
    parse_reward_spec,
    register_reward,
    reward_spec,
)

__all__ = [
    "Affine",
    "CheckpointError",
    "Composite",
    "Reward",
    "RewardEntry",
    "RewardError",
    "RewardInputError",
    "RewardOutput",
    "RewardSpec",
    "RewardSpecError",
    "TextEmbeddingCache",
    "UnknownRewardError",
    "ZScore",
    "build_random_reward",
    "build_reward",
    "list_rewards",
    "parse_reward_spec",
    "register_reward",
    "reward_spec",
]
