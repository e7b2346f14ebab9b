"""``hps-v2`` / ``hps-v2.1``: Human Preference Score v2 (Wu et al., 2023), as the HPSv2 repository scores.

Architecture: open_clip ViT-H-14; the checkpoint ``HPS_v2(.1)_compressed.pt`` (repo ``xswu/HPSv2``) holds the
whole model's state dict under ``"state_dict"`` (no LAION weights are needed). Preprocessing is HPSv2's
``image_transform(..., resize_longest_max=True)``: longest side to 224 (bicubic), zero-pad the short side
centred to a square, OpenAI mean/std (see :func:`reward_models.preprocess.resize_longest_pad`). Score: the
cosine of the normalised image and text features, **no** logit scale (``hpsv2/img_score.py``). Scores of v2.0
and v2.1 are not comparable.
"""

from __future__ import annotations

import torch

from .base import CheckpointError
from .clip import CLIPReward
from .encoders import OpenCLIPTower
from .loading import resolve_file
from .preprocess import OPENAI_MEAN, OPENAI_STD, ImageTransform
from .specs import BUILTIN_SPECS

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"


def hps_transform(size: int = 224, antialias: bool = True) -> ImageTransform:
    """HPSv2's inference transform as tensor ops (``antialias``: see ``preprocess.resize_longest_pad``)."""
    return ImageTransform(size, "longest", "bicubic", OPENAI_MEAN, OPENAI_STD, fill=0.0, antialias=antialias)


class HPSReward(CLIPReward):
    """HPS v2.x: cosine of an open_clip tower with HPS preprocessing.

    Args:
        tower: :class:`~reward_models.encoders.OpenCLIPTower` (its transform is replaced by HPS's).
        version: ``"v2.0"`` or ``"v2.1"`` (selects the spec; the weights are the tower's).
        batch_size: images per forward chunk.
        antialias: antialiased downscaling (default, torchvision >= 0.17 behaviour of HPSv2's code); ``False``
            reproduces the torchvision < 0.17 setup HPSv2 was trained and benchmarked with.
    """

    def __init__(self, tower: OpenCLIPTower, version: str = "v2.1", batch_size: int = 16, antialias: bool = True):
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {sorted(HPS_FILES)}, got {version!r}")
        name = "hps-v2" if version == "v2.0" else "hps-v2.1"
        size = tower.model.visual.image_size
        tower.transform = hps_transform(size[0] if isinstance(size, (tuple, list)) else int(size), antialias)
        super().__init__(tower, spec=BUILTIN_SPECS[name], batch_size=batch_size)
        self.version = version


def load_hps(
    version: str = "v2.1", checkpoint: str | None = None, batch_size: int = 16, antialias: bool = True
) -> HPSReward:
    """HPS from its checkpoint.

    Args:
        version: ``"v2.0"`` or ``"v2.1"``.
        checkpoint: local ``.pt`` file, a folder holding ``HPS_v2(.1)_compressed.pt``, or a hub repo id
            (default ``xswu/HPSv2``, downloaded once to the Hugging Face cache).
        batch_size: images per forward chunk.
        antialias: see :class:`HPSReward`.

    Raises:
        CheckpointError: missing or unreadable checkpoint, or one that does not fit ViT-H-14.
    """
    import open_clip

    if version not in HPS_FILES:
        raise ValueError(f"HPS version must be one of {sorted(HPS_FILES)}, got {version!r}")
    path = resolve_file(checkpoint or HPS_REPO, HPS_FILES[version], what=f"HPS {version} checkpoint")
    model = open_clip.create_model(HPS_ARCH, pretrained=None)
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as e:
        raise CheckpointError(f"HPS {version} checkpoint {path} does not load into open_clip {HPS_ARCH}: {e}") from e
    tower = OpenCLIPTower(model, open_clip.get_tokenizer(HPS_ARCH))
    return HPSReward(tower, version, batch_size, antialias).freeze()


def random_hps(size: str = "tiny", version: str = "v2.1", seed: int = 0) -> HPSReward:
    """HPS with random weights: a tiny open_clip ViT (``"tiny"``) or ViT-H-14 (``"full"``)."""
    tower = OpenCLIPTower.random("tiny" if size == "tiny" else HPS_ARCH, seed=seed)
    torch.manual_seed(seed)
    return HPSReward(tower, version).freeze()
