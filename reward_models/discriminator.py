"""``discriminator``: a learned reward for matching data (DRL, Discriminator-guided RL).

A small head on a frozen pretrained encoder (DINO / DINOv2 through transformers, or an open_clip image tower)
is trained with the logistic loss to separate real images (label 1) from **base-model** samples (label 0).
At the optimum its logit is ``log p_data(x) / p_model(x)``, the reward whose KL-regularised optimum is the data
distribution; the reward is that logit. Heads are saved as safetensors with the encoder's name and the head's
shape in the metadata, so :func:`load_discriminator` rebuilds the whole reward from the head file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import CheckpointError, Reward, RewardInputError, media_modality
from .encoders import FeatureEncoder
from .specs import BUILTIN_SPECS


class DiscriminatorHead(nn.Module):
    """``Linear(d, hidden) -> SiLU -> Linear(hidden, 1)`` (``hidden=0``: one linear layer); ``[B, d] -> [B]``."""

    def __init__(self, feature_dim: int, hidden: int = 256):
        super().__init__()
        self.feature_dim = feature_dim
        self.hidden = hidden
        if hidden:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class DiscriminatorReward(Reward):
    """Logit of a head on frozen encoder features.

    Args:
        encoder: :class:`~reward_models.encoders.FeatureEncoder` (kept frozen).
        head: the head (default: a fresh :class:`DiscriminatorHead` of the encoder's feature width).
        normalize_features: L2-normalise features before the head (scale-free inputs train stably).
        batch_size: images per forward chunk.
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        head: DiscriminatorHead | None = None,
        normalize_features: bool = True,
        batch_size: int = 16,
    ):
        super().__init__(BUILTIN_SPECS["discriminator"], batch_size)
        self.encoder = encoder
        self.normalize_features = normalize_features
        self.head = head if head is not None else DiscriminatorHead(encoder.dim)

    def features(self, media: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, D]`` float32 features."""
        feats = self.encoder(self.pixels(media)).float()
        return F.normalize(feats, dim=-1) if self.normalize_features else feats

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.head(self.features(media).to(self.head.net[0].weight.dtype)).float()

    def _all_features(self, media: torch.Tensor) -> torch.Tensor:
        if media_modality(media, "discriminator.fit") != "image":
            raise RewardInputError("discriminator.fit takes images [N, 3, H, W]")
        step = self.batch_size
        with torch.no_grad():
            return torch.cat([self.features(media[i : i + step]) for i in range(0, len(media), step)])

    def fit(self, real: torch.Tensor, fake: torch.Tensor, **settings) -> list[float]:
        """Train the head with the logistic loss, real = 1, fake = 0 (the encoder stays frozen).

        Args:
            real: ``[N, 3, H, W]`` data images in ``[0, 1]``.
            fake: ``[M, 3, H, W]`` base-model samples in ``[0, 1]``.
            settings: :meth:`fit_features`' ``steps``, ``lr``, ``batch_size``, ``weight_decay``, ``seed``.

        Returns:
            the loss of every step.
        """
        return self.fit_features(self._all_features(real), self._all_features(fake), **settings)

    def fit_features(
        self,
        real_f: torch.Tensor,
        fake_f: torch.Tensor,
        steps: int = 500,
        lr: float = 1e-3,
        batch_size: int = 256,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> list[float]:
        """:meth:`fit` on features computed once (:meth:`features`, ``[N, D]`` and ``[M, D]``), continuing from the
        current head with a fresh AdamW. Each step draws a class-balanced minibatch of ``batch_size // 2`` per class.

        Args:
            real_f, fake_f: features of the real images and of the model samples.
            steps, lr, batch_size, weight_decay: AdamW settings.
            seed: minibatch sampling seed.

        Returns:
            the loss of every step.
        """
        gen = torch.Generator().manual_seed(seed)
        half = max(1, batch_size // 2)
        self.head.train().requires_grad_(True)
        dtype = self.head.net[0].weight.dtype
        opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    r = real_f[torch.randint(len(real_f), (min(half, len(real_f)),), generator=gen)]
                    f = fake_f[torch.randint(len(fake_f), (min(half, len(fake_f)),), generator=gen)]
                    logits = self.head(torch.cat([r, f]).to(dtype)).float()
                    labels = torch.cat([torch.ones(len(r)), torch.zeros(len(f))]).to(logits.device)
                    loss = F.binary_cross_entropy_with_logits(logits, labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
        finally:
            self.head.eval().requires_grad_(False)
        return losses

    def save_head(self, path: str | os.PathLike) -> Path:
        """Save the head (safetensors) with what is needed to rebuild the reward."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "feature_dim": str(self.head.feature_dim),
            "hidden": str(self.head.hidden),
            "normalize_features": json.dumps(self.normalize_features),
            "encoder": self.encoder.source or "",
        }
        state = {k: v.detach().cpu().float().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(path), metadata=meta)
        return path

    def load_head(self, path: str | os.PathLike) -> DiscriminatorReward:
        """Load a head saved by :meth:`save_head` (its shape must fit this encoder)."""
        head, normalize, _ = read_head(path)
        self.head = head.to(device=self.device, dtype=self.head.net[0].weight.dtype)
        self.normalize_features = normalize
        return self.freeze()


def read_head(path: str | os.PathLike) -> tuple[DiscriminatorHead, bool, str]:
    """``(head, normalize_features, encoder_source)`` from a saved head file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"discriminator head not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        head = DiscriminatorHead(int(meta["feature_dim"]), int(meta["hidden"]))
        head.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"cannot read discriminator head {path}: {e}") from e
    return head.eval(), json.loads(meta.get("normalize_features", "true")), meta.get("encoder", "")


def load_discriminator(
    head: str, encoder: str | None = None, encoder_pretrained: str | None = None, batch_size: int = 16
) -> DiscriminatorReward:
    """A trained discriminator from its head file.

    Args:
        head: ``.safetensors`` written by :meth:`DiscriminatorReward.save_head`.
        encoder: encoder hub id / folder / ``open_clip:NAME`` (default: the one recorded in the head file).
        encoder_pretrained: open_clip pretrained tag or file, for ``open_clip:`` encoders.
        batch_size: images per forward chunk.
    """
    head_module, normalize, recorded = read_head(head)
    source = encoder or recorded
    if not source:
        raise CheckpointError(f"{head} does not record its encoder; pass encoder=...")
    enc = FeatureEncoder.load(source, encoder_pretrained)
    return DiscriminatorReward(enc, head_module, normalize, batch_size).freeze()


def new_discriminator(
    encoder: str = "facebook/dinov2-base", encoder_pretrained: str | None = None, hidden: int = 256
) -> DiscriminatorReward:
    """An untrained discriminator on a pretrained encoder (train it with :meth:`DiscriminatorReward.fit`)."""
    enc = FeatureEncoder.load(encoder, encoder_pretrained)
    return DiscriminatorReward(enc, DiscriminatorHead(enc.dim, hidden)).freeze()


def random_discriminator(size: str = "tiny", kind: str = "dinov2", seed: int = 0) -> DiscriminatorReward:
    """Discriminator with a random encoder (tiny or DINOv2-B shape) and a random head."""
    enc = FeatureEncoder.random(kind, size, seed)
    torch.manual_seed(seed)
    return DiscriminatorReward(enc).freeze()
