"""DRL: discriminator-guided RL, GRPO toward real data without preference labels.

"The reward was in your data all along": a logistic classifier ``D`` trained to tell real images (label 1) from
the **base model's** samples (label 0) has, at its optimum, the logit ``log p_data(x) / p_base(x)``. Used as the
reward of KL-regularised RL, it pulls the policy toward the data distribution (``pi ~ p_base exp(r / beta)`` is
``p_data`` at ``beta = 1``). The recipe:

1. sample ``disc_samples`` images from the base model with the rollout's sampler and settings (so the
   discriminator learns the distribution the policy starts from), and take as many real images;
2. fit a head on a frozen pretrained encoder (DINOv2 by default; :mod:`reward_models.discriminator`), then freeze
   it; the head is saved in ``OUTPUT_DIR/discriminator.safetensors`` and reused on resume;
3. run the GRPO loop (:mod:`trainers.grpo`) with the logit as the reward and ``beta_kl`` toward the base.

Evaluation adds the Fréchet distance between samples and the real data in the discriminator's feature space
(``drift/fd_to_reference``): the figure DRL is meant to lower. In the shapes world the real data is the
renderer's output for the training prompts (``--real_data toyworld``).

Variant (``disc_refit_every N``, off by default): every N rollouts the head is refitted, from where it is, on the
latest ``disc_samples`` rollout samples against the same real images, so the logit follows the gap that is left
instead of the gap at the start (Adv-GRPO keeps updating its head in the same way, with a hinge loss; here the
logistic loss stays). The head and its fakes are part of the checkpoint.

Departures: the paper's head sees the encoder features of its own choosing (DINOv3 among others); here any
``FeatureEncoder`` source works. GRPO normalises advantages per group, so ``beta_kl`` is a strength to tune, not
the ``beta = 1`` of the closed form. Images only (the discriminator fits image features).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.grpo import GRPO, GRPOConfig
from visalign.config import field
from visalign.distributed import gather_rows, process_state
from visalign.errors import ConfigError

HEAD_FILE = "discriminator.safetensors"


@dataclass
class DRLConfig(GRPOConfig):
    """DRL options: GRPO's, with the discriminator in place of ``reward``."""

    real_data: str | None = field(None, help="real images: a folder of .png/.jpg, or 'toyworld' (renders of prompts)")
    encoder: str = field("facebook/dinov2-base", help="discriminator's frozen encoder: hub id, folder, open_clip:NAME")
    encoder_pretrained: str | None = field(None, help="open_clip pretrained tag or weights file (open_clip encoders)")
    discriminator_head: str | None = field(None, help="a head saved by an earlier run (skips fitting)")
    disc_samples: int = field(256, help="base-model samples (and real images) the discriminator is fitted on")
    disc_steps: int = field(500, help="optimizer steps of the discriminator head")
    disc_lr: float = field(1e-3, help="learning rate of the head (AdamW)")
    disc_batch_size: int = field(256, help="head minibatch (half real, half base samples)")
    disc_hidden: int = field(256, help="hidden width of the head (0: a linear head)")
    disc_refit_every: int = field(0, help="refit the head every N rollouts on recent policy samples (an adversarial "
                                  "variant, as Adv-GRPO; 0: frozen, DRL as published)")  # fmt: skip
    disc_refit_steps: int = field(50, help="head optimizer steps per refit, continuing from the current head")
    beta_kl: float = field(0.01, help="KL weight to the base model")

    def __post_init__(self):
        super().__post_init__()
        if self.reward:
            raise ConfigError("DRL's reward is its discriminator: drop --reward (use train grpo for other rewards)")
        if not self.real_data:
            raise ConfigError("real_data is required: --real_data FOLDER_OF_IMAGES (or 'toyworld')")
        if self.disc_refit_every < 0:
            raise ConfigError(f"disc_refit_every must be >= 0 (0: a frozen head), got {self.disc_refit_every}")
        for name in ("disc_samples", "disc_steps", "disc_batch_size", "disc_refit_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class DRL(GRPO):
    """The DRL task: fits (or loads) the discriminator at start-up, then trains as GRPO on its logit."""

    def __init__(self, config: DRLConfig, model=None, discriminator=None):
        self._discriminator = discriminator  # an untrained (or trained) DiscriminatorReward, e.g. for tests
        self.fit_report: dict[str, float] = {}
        self._real_captions: list[str] | None = None  # the renders' captions (real_data toyworld)
        self._fakes: torch.Tensor | None = None  # features of the latest rollout samples (disc_refit_every)
        super().__init__(config, model=model)

    @property
    def reward_label(self) -> str:
        return "discriminator"

    def real_images(self, size: int) -> torch.Tensor:
        """``disc_samples`` real images ``[N, 3, size, size]`` in [0, 1]."""
        cfg = self.config
        if cfg.real_data == "toyworld":
            from visalign.toyworld import render_images

            captions = [self.prompts[i % len(self.prompts)] for i in range(cfg.disc_samples)]
            images, _ = render_images(captions, seed=cfg.seed)
            self._real_captions = captions
        else:
            from visalign.data import load_image

            folder = Path(cfg.real_data)
            if not folder.is_dir():
                raise ConfigError(f"real_data {folder} is not a folder of images (or 'toyworld')")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            if len(files) < 2:
                raise ConfigError(f"real_data {folder} must hold at least two .png/.jpg images")
            images = torch.stack([load_image(f, size, where=str(f)) for f in files[: cfg.disc_samples]])
        if images.shape[-1] != size or images.shape[-2] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return images.clamp(0, 1)

    def base_samples(self, size: int) -> torch.Tensor:
        """``disc_samples`` samples of the base model (LoRA off) with the rollout's sampler, steps and guidance."""
        from visalign.evaluation import sample_all

        cfg = self.config
        prompts = [self.prompts[i % len(self.prompts)] for i in range(cfg.disc_samples)]
        seeds = [cfg.seed + 1_000_000 + i for i in range(cfg.disc_samples)]  # apart from the evaluation seeds
        with self.model.lora_disabled():
            return sample_all(self.model, prompts, seeds, steps=cfg.steps, guidance=self.guidance, sde=self.sampler,
                              height=size, width=size, negative_prompt=cfg.negative_prompt,
                              progress=False)  # fmt: skip

    def build_reward(self):
        """Load the discriminator head (given, or saved by this run) or fit it on real vs base samples."""
        from reward_models.discriminator import load_discriminator, new_discriminator

        cfg = self.config
        if self.model.is_video:
            raise ConfigError(f"DRL fits an image discriminator; {self.model.family} makes videos")
        size = cfg.resolution or self.model.default_resolution
        saved = Path(cfg.output_dir) / HEAD_FILE
        head = cfg.discriminator_head or (str(saved) if saved.exists() else None)
        real = self.real_images(size)
        if self._discriminator is not None:
            disc = self._discriminator
            if head:
                disc.load_head(head)
        elif head:
            disc = load_discriminator(head, cfg.encoder, cfg.encoder_pretrained)
        else:
            disc = new_discriminator(cfg.encoder, cfg.encoder_pretrained, cfg.disc_hidden)
        disc = disc.to(self.model.device)
        if not head:
            fake = self.base_samples(size)
            losses = disc.fit(real.to(disc.device), fake.to(disc.device), steps=cfg.disc_steps, lr=cfg.disc_lr,
                              batch_size=cfg.disc_batch_size, seed=cfg.seed)  # fmt: skip
            with torch.no_grad():
                real_logit, fake_logit = disc(real.to(disc.device)).scores, disc(fake.to(disc.device)).scores
            self.fit_report = {
                "first_loss": losses[0],
                "final_loss": losses[-1],
                "real_accuracy": float((real_logit > 0).float().mean()),
                "base_accuracy": float((fake_logit < 0).float().mean()),
            }
            state = process_state()
            if state.is_main_process:  # every process fitted the same head (same seeds); one writes it
                saved.parent.mkdir(parents=True, exist_ok=True)
                disc.save_head(saved)
                (saved.parent / "discriminator.json").write_text(json.dumps(self.fit_report, indent=2))
            state.wait_for_everyone()
        self._real = real
        return disc

    def features(self, media: torch.Tensor) -> torch.Tensor:
        """The discriminator encoder's (normalised) features: the space DRL's Fréchet distance is measured in."""
        with torch.no_grad():
            return torch.cat([self.reward.features(media[i : i + 64].to(self.reward.device)).cpu()
                              for i in range(0, len(media), 64)])  # fmt: skip

    def load_reference_features(self) -> torch.Tensor:
        return self.features(self._real).float()

    def extra_metrics(self, media: torch.Tensor, texts: list[str]) -> dict[str, float]:
        """In the shapes world, where the distance comes from: ``drl/fd/<shape>`` (the samples of captions naming
        that shape against the renders of such captions) and the mean object size in pixels, ``drl/object_pixels``
        against the renders' ``drl/real_object_pixels``."""
        if self._real_captions is None or media.ndim != 4:
            return {}
        from visalign.metrics import frechet_distance
        from visalign.toyworld import parse_caption
        from visalign.toyworld.captions import CaptionError
        from visalign.toyworld.oracle import foreground

        def pixels(images: torch.Tensor) -> float:
            return float(foreground(images.permute(0, 2, 3, 1).float().cpu().numpy()).sum((1, 2)).mean())

        out = {"drl/object_pixels": pixels(media), "drl/real_object_pixels": pixels(self._real)}
        try:
            real_shapes = [parse_caption(c).shape for c in self._real_captions]
            shapes = [parse_caption(t).shape for t in texts]
        except CaptionError:  # prompts outside the shapes world: no breakdown
            return out
        feats = self.features(media).float()
        for shape in sorted(set(shapes) & set(real_shapes)):
            mine = [i for i, s in enumerate(shapes) if s == shape]
            theirs = [i for i, s in enumerate(real_shapes) if s == shape]
            if len(mine) > 1 and len(theirs) > 1:
                out[f"drl/fd/{shape}"] = frechet_distance(feats[mine], self.reference_features[theirs])
        return out

    # ----------------------------------------------------------------- adversarial variant (disc_refit_every)
    def rollout(self, prompt_ids: list[int]):
        """GRPO's rollout; with ``disc_refit_every`` its samples then join the head's fakes (the latest
        ``disc_samples``, gathered over processes so every rank keeps the same head) and every N-th rollout refits the
        head on them against the real images. A rollout is scored by the head fitted before it was sampled."""
        ro = super().rollout(prompt_ids)
        cfg = self.config
        if not cfg.disc_refit_every:
            return ro
        (new,) = gather_rows(self.features(ro.pixels).cpu())
        self._fakes = new if self._fakes is None else torch.cat([self._fakes, new])[-cfg.disc_samples :]
        if self.rollouts % cfg.disc_refit_every == 0:
            device = self.reward.device
            real, fakes = self.reference_features.to(device), self._fakes.to(device)
            fit = dict(steps=cfg.disc_refit_steps, lr=cfg.disc_lr, batch_size=cfg.disc_batch_size)
            losses = self.reward.fit_features(real, fakes, seed=cfg.seed + self.rollouts, **fit)
            ro.metrics["discriminator/refit_loss"] = losses[-1]
        return ro

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.config.disc_refit_every:
            state.update({f"grpo/drl/head/{k}": v.detach().clone() for k, v in self.reward.head.state_dict().items()})
            if self._fakes is not None:
                state["grpo/drl/fakes"] = self._fakes.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.config.disc_refit_every:
            prefix = "grpo/drl/head/"
            self.reward.head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            self._fakes = state.get("grpo/drl/fakes")
