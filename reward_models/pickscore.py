"""``pickscore``: PickScore v1 (Kirstain et al., 2023), ``logit_scale.exp() * cos`` (about 18-24).

Model: transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (CLIP-H/14). Processor convention of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the processor the PickScore code loads): shortest side to 224
bicubic, center crop 224 (transformers' placement), OpenAI mean/std; here as tensor ops. The tokenizer is the
CLIP BPE (``visalign.offline_tokenizers.clip_tokenizer``: the same ids as the LAION tokenizer, nothing to
download); truncation at 77 tokens. Raw scores: some RL code divides by 26 or uses the raw cosine; do that
with :class:`reward_models.compose.Affine` (``components["cosine"]`` holds the cosine).
"""

from __future__ import annotations

import torch

from .base import RewardOutput
from .clip import CLIPReward
from .encoders import HFCLIPTower
from .preprocess import OPENAI_MEAN, OPENAI_STD, ImageTransform
from .specs import BUILTIN_SPECS

PICKSCORE_ID = "yuvalkirstain/PickScore_v1"


def pickscore_transform(size: int = 224) -> ImageTransform:
    """The CLIP-H processor convention (shortest side, bicubic, floor-placed center crop, OpenAI mean/std)."""
    return ImageTransform(size, "shortest", "bicubic", OPENAI_MEAN, OPENAI_STD, crop_rounding="floor")


class PickScoreReward(CLIPReward):
    """``logit_scale.exp() * cos(image, prompt)`` of a transformers CLIP model.

    Args:
        tower: :class:`~reward_models.encoders.HFCLIPTower` (its transform is set to the PickScore convention).
        batch_size: images per forward chunk.
    """

    def __init__(self, tower: HFCLIPTower, batch_size: int = 16):
        tower.transform = pickscore_transform(tower.model.config.vision_config.image_size)
        super().__init__(tower, spec=BUILTIN_SPECS["pickscore"], batch_size=batch_size)

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        cos = self.cosine(media, prompts)
        return RewardOutput(self.tower.logit_scale.float().exp() * cos, {"cosine": cos})


def load_pickscore(model: str = PICKSCORE_ID, batch_size: int = 16) -> PickScoreReward:
    """PickScore from a hub id or a local transformers folder (default ``yuvalkirstain/PickScore_v1``)."""
    from visalign.offline_tokenizers import clip_tokenizer

    tower = HFCLIPTower.load(model, tokenizer=clip_tokenizer())
    return PickScoreReward(tower, batch_size).freeze()


def random_pickscore(size: str = "tiny", seed: int = 0) -> PickScoreReward:
    """PickScore with random weights: tiny CLIP (``"tiny"``) or the CLIP-H/14 shape (``"full"``)."""
    return PickScoreReward(HFCLIPTower.random("tiny" if size == "tiny" else "clip-h", seed=seed)).freeze()
