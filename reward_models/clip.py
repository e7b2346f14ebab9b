"""``clip``: cosine similarity of CLIP image and text embeddings (open_clip or transformers).

``score = cos(E_img(x), E_txt(p))``; with ``hessel=True`` the CLIPScore of Hessel et al. (2021, Eq. 1),
``2.5 * max(cos, 0)`` (the raw cosine stays in ``components["cosine"]``).

Also the base of the other CLIP-family scorers (HPS, PickScore): a tower, a per-prompt text-embedding cache,
and a cosine computed in float32 on L2-normalised embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import CheckpointError, Reward, RewardOutput, RewardSpec, TextEmbeddingCache
from .encoders import HFCLIPTower, OpenCLIPTower
from .loading import is_hub_id
from .specs import BUILTIN_SPECS

DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"


class CLIPReward(Reward):
    """Cosine between image and prompt embeddings of a CLIP tower.

    Args:
        tower: :class:`~reward_models.encoders.OpenCLIPTower` or :class:`~reward_models.encoders.HFCLIPTower`.
        hessel: return Hessel's CLIPScore ``2.5 * max(cos, 0)`` instead of the cosine.
        spec: metadata (default: the ``clip`` entry).
        batch_size: images per forward chunk.
        cache_size: prompts kept in the text-embedding cache.
    """

    def __init__(
        self,
        tower: torch.nn.Module,
        *,
        hessel: bool = False,
        spec: RewardSpec | None = None,
        batch_size: int = 16,
        cache_size: int = 4096,
    ):
        super().__init__(spec or BUILTIN_SPECS["clip"], batch_size)
        self.tower = tower
        self.hessel = hessel
        self.text_cache = TextEmbeddingCache(self._encode_text, cache_size)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.tower.encode_text(prompts).float(), dim=-1)

    def image_embeddings(self, media: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, D]`` L2-normalised float32 embeddings."""
        return F.normalize(self.tower.encode_image(self.pixels(media)).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``N`` prompts -> ``[N, D]`` L2-normalised float32 embeddings (cached per unique prompt)."""
        return self.text_cache(prompts)

    def cosine(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` cosine of each image with its own prompt."""
        return (self.image_embeddings(media) * self.text_embeddings(prompts)).sum(-1)

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput | torch.Tensor:
        cos = self.cosine(media, prompts)
        if self.hessel:
            return RewardOutput(2.5 * cos.clamp(min=0), {"cosine": cos})
        return cos


def is_open_clip_source(model: str | os.PathLike) -> bool:
    """Whether ``model`` names an open_clip model (name, ``hf-hub:``/``local-dir:`` or an open_clip folder)."""
    import open_clip

    text = str(model)
    if text.startswith(("hf-hub:", "local-dir:")) or (Path(text) / "open_clip_config.json").is_file():
        return True
    return text in open_clip.list_models()


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    hessel: bool = False,
    backend: str = "auto",
    batch_size: int = 16,
) -> CLIPReward:
    """The ``clip`` reward from published weights.

    Args:
        model: open_clip model name (with ``pretrained`` tag or weights file), ``hf-hub:org/repo``, a local
            open_clip folder (``open_clip_config.json`` + weights, e.g. ``assets/toyworld/toy-clip``), or a
            transformers ``CLIPModel`` hub id / local folder.
        pretrained: open_clip pretrained tag or local weights file (only for open_clip model names).
        hessel: Hessel CLIPScore (``2.5 * max(cos, 0)``).
        backend: ``"auto"`` (open_clip when ``model`` is an open_clip name or folder), ``"open_clip"`` or
            ``"transformers"``.
        batch_size: images per forward chunk.
    """
    if backend not in ("auto", "open_clip", "transformers"):
        raise ValueError(f"backend must be 'auto', 'open_clip' or 'transformers', got {backend!r}")
    use_open_clip = backend == "open_clip" or (backend == "auto" and is_open_clip_source(model))
    if not use_open_clip and not Path(str(model)).is_dir() and not is_hub_id(model):
        raise CheckpointError(
            f"CLIP model {model!r} not found: not an open_clip model name (open_clip.list_models()), "
            "not a local folder and not a hub id"
        )
    tower = OpenCLIPTower.load(model, pretrained) if use_open_clip else HFCLIPTower.load(model)
    return CLIPReward(tower, hessel=hessel, batch_size=batch_size).freeze()


def random_clip(size: str = "tiny", backend: str = "open_clip", hessel: bool = False, seed: int = 0) -> CLIPReward:
    """``clip`` with random weights: ``size`` ``"tiny"`` or ``"full"`` (open_clip ViT-L-14 / transformers CLIP-H)."""
    if backend == "open_clip":
        tower = OpenCLIPTower.random("tiny" if size == "tiny" else DEFAULT_MODEL, seed=seed)
    else:
        tower = HFCLIPTower.random("tiny" if size == "tiny" else "clip-h", seed=seed)
    return CLIPReward(tower, hessel=hessel).freeze()
