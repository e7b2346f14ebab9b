"""``PretrainConfig``: the options of ``visalign toy pretrain`` and each shipped model's recipe defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import field
from ..errors import ConfigError
from .recipes import FLOW_WIDTH, VIDEO_PATCH, VIDEO_WIDTH, check_video_architecture, check_width

MODELS = ("toy-sd", "toy-flow", "toy-video", "toy-clip")

# Per-model defaults for the fields left at None; the shipped models were trained with exactly these
# (and the seed recorded in their toyworld.json).
RECIPE_DEFAULTS: dict[str, dict] = {
    "toy-sd": {"steps": 6000, "batch_size": 32, "lr": 1e-3, "sample_steps": 20, "guidance": 3.0},
    "toy-flow": {"steps": 8000, "batch_size": 32, "lr": 1e-3, "sample_steps": 20, "guidance": 3.0},
    "toy-clip": {"steps": 2000, "batch_size": 64, "lr": 2e-3, "sample_steps": 0, "guidance": 0.0},
    # toy-video (pretrain_video.py): the VAE trains on 8 videos (64 frames) a step, the transformer on a cache of
    # 8,000 encoded videos
    "toy-video": {
        "steps": 8000,
        "batch_size": 32,
        "lr": 1e-3,
        "sample_steps": 20,
        "guidance": 3.0,
        "vae_steps": 2400,
        "vae_batch_size": 8,
        "train_images": 8000,
        "stats_images": 512,
    },
}
# fields an entry of RECIPE_DEFAULTS may leave out, with the value every image recipe uses
COMMON_DEFAULTS = {"vae_steps": 2000, "vae_batch_size": 16, "train_images": 20000, "stats_images": 2048}


@dataclass
class PretrainConfig:
    """``visalign toy pretrain``: pretrain a shapes-world model from a seed."""

    model: Literal["toy-sd", "toy-flow", "toy-video", "toy-clip"] = field(help="which model to pretrain")
    out: str = field(help="output folder (becomes the model folder)")
    seed: int = field(0, help="seed of initialisation, data and noise")
    steps: int | None = field(None, help="training steps (default: the recipe's)")
    batch_size: int | None = field(None, help="batch size (default: the recipe's)")
    lr: float | None = field(None, help="peak AdamW learning rate, warm-up then cosine to a tenth (default: recipe's)")
    warmup: int = field(200, help="learning-rate warm-up steps")
    vae: str | None = field(None, help="reuse the VAE of this pipeline folder (or VAE folder) instead of training one")
    vae_steps: int | None = field(None, help="VAE training steps (when --vae is not given; default: the recipe's)")
    vae_batch_size: int | None = field(None, help="VAE batch size (videos for toy-video; default: the recipe's)")
    vae_lr: float = field(1e-3, help="VAE peak learning rate")
    train_images: int | None = field(None, help="renders (videos) in the latent cache the denoiser trains on")
    stats_images: int | None = field(None, help="renders whose latents set the VAE's scaling (and shift) factor")
    check_images: int = field(256, help="renders whose VAE reconstructions the oracle checks (0: skip)")
    prediction: Literal["epsilon", "v_prediction"] = field(
        "epsilon", help="toy-sd's prediction target (v_prediction with --zero_snr: Lin et al. 2024)"
    )
    text_encoder: str | None = field(
        None, help="toy-sd: take this pipeline's CLIP text encoder (e.g. toy-flow's) and keep it frozen, as SD does"
    )
    zero_snr: bool = field(False, help="toy-sd: rescale the betas to zero terminal SNR, trailing timesteps")
    caption_dropout: float = field(0.1, help="probability of training on the empty caption (for CFG)")
    ema_decay: float = field(0.999, help="EMA decay of the saved weights (0 disables EMA)")
    sample_every: int = field(1000, help="save a sample grid every N steps (0: only at the end)")
    video_patch: int = field(VIDEO_PATCH, help="toy-video: transformer patch in latent pixels (1, 2 or 4: 8x8 px)")
    video_width: int = field(VIDEO_WIDTH, help="toy-video: transformer width (heads of 16, FFN twice as wide)")
    flow_width: int = field(FLOW_WIDTH, help="toy-flow: transformer width (heads of 16)")
    near_miss: float = field(
        0.0, help="toy-clip: chance that a square in a batch gets a spoilt twin (rounded, tilted, wavy) as a negative"
    )
    save_every: int = field(0, help="also save the EMA pipeline every N steps in stages/ (0: never; not toy-clip)")
    sample_steps: int | None = field(None, help="sampling steps of the grids and the recorded default")
    guidance: float | None = field(None, help="CFG scale of the grids and the recorded default")
    log_every: int = field(25, help="write the loss to losses.csv every N steps")
    threads: int = field(0, help="torch threads (0: leave torch's default / OMP_NUM_THREADS)")
    progress: bool = field(True, help="show tqdm progress bars")

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        for name, value in {**COMMON_DEFAULTS, **RECIPE_DEFAULTS[self.model]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("steps", "batch_size", "vae_steps", "vae_batch_size", "train_images", "stats_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.save_every and self.model == "toy-clip":
            raise ConfigError("--save_every saves stages of the diffusion models; drop it for toy-clip")
        if (self.video_patch, self.video_width) != (VIDEO_PATCH, VIDEO_WIDTH) and self.model != "toy-video":
            raise ConfigError(f"--video_patch / --video_width shape toy-video only; drop them for {self.model}")
        check_video_architecture(self.video_patch, self.video_width)
        if self.flow_width != FLOW_WIDTH and self.model != "toy-flow":
            raise ConfigError(f"--flow_width shapes toy-flow only; drop it for {self.model}")
        check_width(self.flow_width, "--flow_width")
        if not 0 <= self.near_miss <= 1:
            raise ConfigError(f"--near_miss is a probability in [0, 1], got {self.near_miss}")
        if self.near_miss and self.model != "toy-clip":
            raise ConfigError(f"--near_miss adds negatives to toy-clip's contrastive loss; drop it for {self.model}")
