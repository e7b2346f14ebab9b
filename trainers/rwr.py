"""Flow-RWR: reward-weighted regression on the model's own samples, online (docs/train_online.md).

Each rollout samples ``group_size`` images (or videos) per prompt and scores them, exactly as GRPO does
(:mod:`trainers.grpo`: same samplers, text cache, reward handling, monitors, checkpoints and exact resume). The
update is then not a policy gradient but a regression: the clean latents ``x_0`` of a prompt's samples are
noised again at fresh training timesteps and the model's denoising errors ``e_k`` (the family's own training
target: ε, v or the flow velocity) are weighted by ``softmax(s / temperature)`` over the group,
``loss = sum_k softmax(s / τ)_k e_k`` (:func:`visalign.losses.get` ``"rwr"``), averaged over prompts.

The regression targets are the decoded samples encoded again (the images the reward scored, on the VAE's
manifold, as offline data would be): the sampler's own final latents sit off it (toy-sd with CFG 3: latent std
1.13 against 1.07 for encoded renders and for the same images re-encoded), and regressing on them drifts the
colours within tens of steps.

The error is that of the classifier-free-guided prediction, at the rollout's guidance: the samples came from the
guided model, so the guided model is what regresses on them (its own samples are then a fixed point, which the
reward weights tilt). Regressing the conditional branch alone on CFG samples sharpens it at every step and
collapses (measured on toy-sd, CFG 3: oracle strict 60% -> 0.5% in 120 steps).

``s`` is by default the group-normalised advantage GRPO computes (``(r - mean) / std``, clipped), so the
temperature means the same for any reward's scale; ``--rwr_scores reward`` uses the raw reward, the formula as
VideoAlign writes it. No log-probs are needed; ``temperature`` sets how strongly the update prefers the best
samples. Iterated regression on its own samples still drifts (toy-sd, lr 1e-3: strict 60% -> 65.5% at step 40,
then 42% at step 80), so ``beta_kl`` adds an anchor to the base, ``beta_kl * mean ||pred - pred_ref||^2`` on the
same noisy inputs (the reference is the base with the LoRA disabled: one more forward, no copy).
Invalid (NaN or ``valid=False``) samples get weight 0; a prompt whose samples are all invalid is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers.grpo import GRPO, GRPOConfig
from visalign import losses
from visalign.config import field
from visalign.diffusion import per_sample_mse
from visalign.errors import ConfigError
from visalign.models import index_cond


@dataclass
class RWRConfig(GRPOConfig):
    """Flow-RWR options: GRPO's rollout options, a temperature instead of PPO's clip and KL."""

    temperature: float = field(1.0, help="softmax temperature of the weights over a prompt's samples")
    rwr_scores: str = field("advantage", help="weights from the group-normalised 'advantage' or the raw 'reward'")
    beta_kl: float = field(0.0, help="weight of the anchor to the base: mean squared distance of the predictions")

    def __post_init__(self):
        super().__post_init__()
        if self.rwr_scores not in ("advantage", "reward"):
            raise ConfigError(f"rwr_scores must be 'advantage' or 'reward', got {self.rwr_scores!r}")
        losses.get("rwr").validate(temperature=self.temperature)
        if self.skip_flat_groups:
            raise ConfigError(
                "skip_flat_groups is GRPO's: RWR regresses on a tied group too (its softmax weights are uniform)"
            )
        for name in ("train_batch_size", "samples_per_update"):
            if getattr(self, name) % self.group_size:
                raise ConfigError(
                    f"RWR weighs a prompt's samples against each other: {name} ({getattr(self, name)}) must be a "
                    f"multiple of group_size ({self.group_size})"
                )

    @property
    def trained_steps(self) -> int:
        """One regression term per sample (at a fresh timestep), not one per sampling step."""
        return 1


class RWR(GRPO):
    """The Flow-RWR task: GRPO's rollouts, a reward-weighted regression update."""

    def enqueue(self, ro, generator: torch.Generator) -> None:
        """Micro-batches of whole prompt groups (the softmax runs over a group), in a shuffled group order."""
        cfg = self.config
        g, n = cfg.group_size, len(ro.prompts)
        micro = cfg.train_batch_size or n
        per_update = cfg.samples_per_update or n
        groups = n // g
        with torch.no_grad():  # the images the reward saw, as the VAE encodes them (not the sampler's raw latents)
            chunk = cfg.rollout_batch_size or n
            ro.clean = torch.cat(
                [
                    self.model.encode(ro.pixels[i : i + chunk].to(self.model.device), generator)
                    for i in range(0, n, chunk)
                ]
            )
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(groups, generator=generator) if cfg.shuffle_samples else torch.arange(groups)
            rows = (order[:, None] * g + torch.arange(g)).flatten()
            for u in range(0, n, per_update):
                for m in range(u, u + per_update, micro):
                    self.queue.append((ro, rows[m : m + micro], 0))

    def item_loss(self, ro, rows: torch.Tensor, slot: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, model = self.config, self.model
        rows = rows.view(-1, cfg.group_size)
        valid = ro.valid[rows]
        rows, valid = rows[valid.any(dim=1)], valid[valid.any(dim=1)]
        if rows.numel() == 0:  # no valid sample in these groups: no gradient at all
            return torch.zeros((), requires_grad=True), {"rwr/max_weight": math.nan, "rwr/error": math.nan}
        flat = rows.flatten()
        x0 = ro.clean[flat.to(ro.clean.device)]
        noise = torch.randn_like(x0)
        t = model.sample_timesteps(len(flat))
        cond = index_cond(ro.cond, flat)
        uncond = None if ro.uncond is None else index_cond(ro.uncond, flat)
        x_t = model.add_noise(x0, noise, t)
        pred = model.guided_predict(x_t, t, cond, uncond, self.guidance)
        errors = per_sample_mse(pred, model.target(x0, noise, t)).view(rows.shape)
        scores = (ro.advantages if cfg.rwr_scores == "advantage" else ro.rewards)[rows].to(errors.device)
        scores = torch.where(valid.to(errors.device), scores, torch.full_like(scores, -math.inf))
        per_group, metrics = losses.get("rwr")(errors=errors, scores=scores, temperature=cfg.temperature)
        loss = per_group.mean()
        metrics = {k: float(v) for k, v in metrics.items()}
        if cfg.beta_kl > 0:  # stay near the base: the squared distance of the two guided predictions
            with torch.no_grad(), model.reference():
                ref = model.guided_predict(x_t, t, cond, uncond, self.guidance)
            anchor = per_sample_mse(pred, ref).view(rows.shape)[valid.to(pred.device)].mean()
            loss = loss + cfg.beta_kl * anchor
            metrics["rwr/anchor"] = float(anchor.detach())
        return loss, metrics
