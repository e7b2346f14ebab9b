"""``aesthetic``: the LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022).

``score = MLP(e / ||e||)`` with ``e`` the OpenAI CLIP ViT-L/14 image embedding (768-d) and the MLP of
``simple_inference.py``: ``Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
Dropout(0.1), Linear(64, 16), Linear(16, 1)`` (no activations; dropout is inactive at inference). Weights:
``sac+logos+ava1-l14-linearMSE.pth`` (state dict keys ``layers.{0,2,4,6,7}.*``). Scores about 1-10. The CLIP
preprocessing (shortest side 224 bicubic, center crop, OpenAI mean/std) runs as tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .encoders import OpenCLIPTower
from .loading import load_into, load_state_dict, resolve_file, resolve_url
from .specs import BUILTIN_SPECS

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class LinearMLP(nn.Module):
    """``d -> 1024 -> 128 -> 64 -> 16 -> 1`` linear layers with the original dropouts (no activations).

    The head of both the LAION aesthetic predictor and ImageReward (same layer list and state-dict keys).
    """

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` -> ``[B]``."""
        return self.layers(x).squeeze(-1)


class AestheticReward(Reward):
    """LAION aesthetic v2 on a CLIP image tower.

    Args:
        tower: :class:`~reward_models.encoders.OpenCLIPTower` (only its image side is used).
        mlp: :class:`LinearMLP` of the tower's embedding width.
        batch_size: images per forward chunk.
    """

    def __init__(self, tower: OpenCLIPTower, mlp: LinearMLP, batch_size: int = 16):
        super().__init__(BUILTIN_SPECS["aesthetic"], batch_size)
        self.tower = tower
        self.mlp = mlp

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        emb = self.tower.encode_image(self.pixels(media)).float()
        # the original divides by the L2 norm (norm 0 left as is); eps only guards an all-zero embedding
        emb = F.normalize(emb, dim=-1, eps=1e-12)
        return self.mlp(emb.to(self.mlp.layers[0].weight.dtype)).float()


def load_aesthetic(
    checkpoint: str | None = None,
    clip_model: str = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = "openai",
    batch_size: int = 16,
) -> AestheticReward:
    """The aesthetic predictor from its weights.

    Args:
        checkpoint: the MLP's ``.pth`` file, or a folder / hub repo holding ``sac+logos+ava1-l14-linearMSE.pth``;
            default: downloaded once from the original GitHub repository into torch's hub cache.
        clip_model, clip_pretrained: the CLIP image tower (open_clip name + tag/file, or an open_clip folder).
        batch_size: images per forward chunk.

    Raises:
        CheckpointError: missing checkpoint or one that does not fit the MLP.
    """
    if checkpoint is None:
        path = resolve_url(AESTHETIC_URL, AESTHETIC_FILE, what="aesthetic MLP")
    else:
        path = resolve_file(checkpoint, AESTHETIC_FILE, what="aesthetic MLP")
    state = load_state_dict(path, what="aesthetic MLP")
    tower = OpenCLIPTower.load(clip_model, clip_pretrained)
    mlp = LinearMLP(state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768)
    load_into(mlp, state, what=f"aesthetic MLP {path}")
    return AestheticReward(tower, mlp, batch_size).freeze()


def random_aesthetic(size: str = "tiny", seed: int = 0) -> AestheticReward:
    """Aesthetic predictor with random weights: tiny CLIP (``"tiny"``) or ViT-L/14 (``"full"``)."""
    tower = OpenCLIPTower.random("tiny" if size == "tiny" else "ViT-L-14-quickgelu", seed=seed)
    torch.manual_seed(seed)
    return AestheticReward(tower, LinearMLP(tower.model.visual.output_dim)).freeze()
