"""Video rewards: any image reward over sampled frames (``video``), and ``temporal-consistency``.

``video``: ``K`` frames sampled uniformly (indices ``round(linspace(0, T - 1, K))``, all frames when
``K >= T`` or ``K`` is ``None``), scored by the image reward with the video's prompt, reduced per video by
``mean``, ``min`` or ``first`` (the first sampled frame). A video is valid when every frame used is.

``temporal-consistency``: ``mean_t cos(f_t, f_{t+1})`` over consecutive frames of a frozen encoder's features
(DINO ViT-B/16 by default, as VBench's subject consistency); 1 for a still video.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .base import Reward, RewardOutput
from .encoders import FeatureEncoder
from .specs import BUILTIN_SPECS

REDUCTIONS = ("mean", "min", "first")


def sample_frame_indices(num_frames: int, k: int | None) -> torch.Tensor:
    """``K`` uniformly spaced frame indices in ``[0, num_frames)`` (all frames when ``k`` is None or >= T)."""
    if k is None or k >= num_frames:
        return torch.arange(num_frames)
    if k < 1:
        raise ValueError(f"frames must be >= 1, got {k}")
    return torch.linspace(0, num_frames - 1, k).round().long()


def reduce_frames(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """``[B, K]`` -> ``[B]`` by ``mean``, ``min`` or ``first``."""
    if reduce == "mean":
        return values.mean(dim=1)
    if reduce == "min":
        return values.min(dim=1).values
    if reduce == "first":
        return values[:, 0]
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


class VideoReward(Reward):
    """An image reward applied to sampled frames of each video.

    Args:
        reward: any image :class:`~reward_models.base.Reward`.
        frames: frames sampled per video (``None``: all).
        reduce: ``"mean"``, ``"min"`` or ``"first"``.
        batch_size: videos per chunk (the image reward chunks frames by its own ``batch_size``).
    """

    def __init__(self, reward: Reward, frames: int | None = 8, reduce: str = "mean", batch_size: int = 4):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if "image" not in reward.spec.modalities:
            raise ValueError(f"video() needs an image reward; {reward.spec.name} scores {reward.spec.modalities}")
        inner = reward.spec
        spec = replace(
            BUILTIN_SPECS["video"],
            name=f"video({inner.name})",
            needs_prompt=inner.needs_prompt,
            differentiable=inner.differentiable,
            nominal_range=inner.nominal_range,
        )
        super().__init__(spec, batch_size)
        self.reward = reward
        self.frames = frames
        self.reduce = reduce

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        b, t = media.shape[:2]
        idx = sample_frame_indices(t, self.frames).to(media.device)
        k = len(idx)
        frames = media[:, idx].flatten(0, 1)  # [b*k, 3, H, W], video-major
        frame_prompts = None if prompts is None else [p for p in prompts for _ in range(k)]
        out = self.reward(frames, frame_prompts)
        scores = reduce_frames(out.scores.view(b, k), self.reduce)
        components = {name: reduce_frames(v.view(b, k), self.reduce) for name, v in out.components.items()}
        valid = out.valid.view(b, k)[:, :1].all(1) if self.reduce == "first" else out.valid.view(b, k).all(1)
        return RewardOutput(scores, components, valid)


class TemporalConsistencyReward(Reward):
    """Mean cosine similarity of consecutive frames' encoder features (``[B, T, 3, H, W]`` -> ``[B]``).

    Args:
        encoder: :class:`~reward_models.encoders.FeatureEncoder`.
        batch_size: videos per chunk.
    """

    def __init__(self, encoder: FeatureEncoder, batch_size: int = 4):
        super().__init__(BUILTIN_SPECS["temporal-consistency"], batch_size)
        self.encoder = encoder

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        b, t = media.shape[:2]
        if t < 2:
            return torch.ones(b, device=media.device)
        feats = F.normalize(self.encoder(self.pixels(media.flatten(0, 1))).float(), dim=-1).view(b, t, -1)
        return (feats[:, 1:] * feats[:, :-1]).sum(-1).mean(1)


def load_video(reward: str = "hps-v2.1", frames: int | None = 8, reduce: str = "mean", batch_size: int = 4):
    """``video(reward=SPEC, frames=K, reduce=mean|min|first)``: wrap a registered image reward."""
    from .registry import build_reward

    return VideoReward(build_reward(reward), frames, reduce, batch_size)


def random_video(size: str = "tiny", reward: str = "clip", frames: int | None = 4, reduce: str = "mean"):
    """``video`` around a random-weight image reward."""
    from .registry import build_random_reward

    return VideoReward(build_random_reward(reward, size), frames, reduce)


def load_temporal_consistency(
    encoder: str = "facebook/dino-vitb16", encoder_pretrained: str | None = None, batch_size: int = 4
) -> TemporalConsistencyReward:
    """``temporal-consistency`` on a pretrained encoder (hub id / folder, or ``open_clip:NAME``)."""
    return TemporalConsistencyReward(FeatureEncoder.load(encoder, encoder_pretrained), batch_size).freeze()


def random_temporal_consistency(size: str = "tiny", kind: str = "dinov2", seed: int = 0):
    """``temporal-consistency`` on a random encoder."""
    return TemporalConsistencyReward(FeatureEncoder.random(kind, size, seed)).freeze()
