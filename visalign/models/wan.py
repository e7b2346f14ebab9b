"""Wan 2.1 / 2.2 text-to-video (``WanPipeline``): a flow-matching transformer on a causal video VAE.

Latent layout: ``[B, C, F', h, w]``, the layout ``WanTransformer3DModel`` takes, with ``F' = (F - 1) / 4 + 1``
and ``h, w = H / 8, W / 8`` for the released VAE (``F' = F`` for a VAE with ``scale_factor_temporal=1``, whose
frame count is free: see :meth:`prepare_latents`). Latents are normalised per channel with the VAE's
``latents_mean`` / ``latents_std`` exactly as ``WanPipeline.__call__`` undoes them before decoding.

Training view (rectified flow, as SD3): ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``,
``t = sigma * 1000``. Sampling mirrors ``WanPipeline.__call__`` with the checkpoint's own scheduler (UniPC with
flow sigmas for the released models, or ``FlowMatchEulerDiscreteScheduler``).

Not supported: the two-expert Wan 2.2 A14B pipelines (``transformer_2`` / ``boundary_ratio``), which would need
one LoRA per expert and a timestep switch; loading one raises a :class:`ModelError`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import Cond, ModelError, SampleOutput, register_family
from .flow import FlowMatchingModel


def check_flow_scheduler(scheduler) -> None:
    """Raise a :class:`ModelError` unless ``scheduler`` is one of the flow-matching schedulers Wan ships with.

    UniPC / DPM-Solver sample flow models only with ``use_flow_sigmas``; without it they would silently run a
    DDPM schedule on a velocity model.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or scheduler.config.get("use_flow_sigmas", False):
        return
    raise ModelError(
        f"Wan needs a flow-matching scheduler, got {type(scheduler).__name__} without use_flow_sigmas; use "
        "UniPCMultistepScheduler(prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=...) "
        "or FlowMatchEulerDiscreteScheduler"
    )


@register_family
class WanModel(FlowMatchingModel):
    """Wan text-to-video as a :class:`DiffusionModel` (flow matching, latents ``[B, C, F', h, w]``).

    Noising, targets, training timesteps (logit-normal sigmas with the scheduler's ``flow_shift``), the inference
    scheduler and the Flow-SDE schedule come from :class:`FlowMatchingModel`.
    """

    family: ClassVar[str] = "wan"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("WanPipeline",)
    is_video: ClassVar[bool] = True
    # Wan blocks have self- (attn1) and cross-attention (attn2), each with these projections
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # WanPipeline.__call__ defaults (Wan2.1-T2V: 480 x 832, 81 frames, 50 steps, CFG 5)
    default_height: ClassVar[int] = 480
    default_width: ClassVar[int] = 832
    default_num_frames: ClassVar[int] = 81
    default_resolution: ClassVar[int] = 480
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 5.0
    max_sequence_length: ClassVar[int] = 512  # WanPipeline.__call__ default (Wan's text_len)

    def __init__(self, pipe, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if pipe.transformer is None or pipe.transformer_2 is not None or pipe.config.boundary_ratio is not None:
            raise ModelError(
                "two-expert Wan 2.2 pipelines (transformer_2 / boundary_ratio, e.g. Wan2.2-T2V-A14B) are not "
                "supported; use a single-transformer Wan checkpoint (Wan2.1-T2V-1.3B/14B, Wan2.2-TI2V-5B)"
            )
        check_flow_scheduler(pipe.scheduler)  # fail at load time, not at the first sample
        super().__init__(pipe, device=device, dtype=dtype)

    # ----------------------------------------------------------------- latents
    @property
    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, std)`` as ``[1, C, 1, 1, 1]`` float32 tensors on the model device."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, config.z_dim, 1, 1, 1)
        return mean.to(self.device), std.to(self.device)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos to normalised latents.

        Args:
            pixels: ``[B, F, 3, H, W]`` float in ``[0, 1]``; ``F = 4k + 1`` for the released VAE, any ``F`` for a VAE
                without temporal compression (``scale_factor_temporal=1``, as the shapes world's toy-video).
            generator: draws the VAE posterior sample (a fresh sample per call, as latent-diffusion training does).

        Returns:
            ``[B, C, F', h, w]`` float32, ``(z - latents_mean) / latents_std``.
        """
        _check_video(pixels)
        video = pixels.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
        frames = video.shape[2]
        if self.pipe.vae_scale_factor_temporal == 1 and (frames - 1) % 4:
            # The encoder reads frames in chunks of 1 + 4 + 4 ... and silently drops a remainder. Without temporal
            # compression latent frame i depends only on frames <= i (causal convolutions), so padding with copies
            # of the last frame and dropping their latents is exact.
            pad = 4 - (frames - 1) % 4
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        z = self.vae.encode(video).latent_dist.sample(generator=generator)[:, :, :frames].float()
        mean, std = self._latent_stats
        return (z - mean) * (1.0 / std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, F', h, w]`` to pixels ``[B, F, 3, H, W]`` float32 in ``[0, 1]``."""
        mean, std = self._latent_stats
        # the same arithmetic as WanPipeline.__call__ (division by 1 / std), so sampling matches it bit for bit
        z = latents.to(self.device, self.vae.dtype) / (1.0 / std).to(self.vae.dtype) + mean.to(self.vae.dtype)
        video = self.vae.decode(z, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="pt").float()

    # ----------------------------------------------------------------- conditioning and denoiser
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """UMT5 embeddings ``{"prompt_embeds": [B, 512, D]}``, zeroed past each prompt, via the pipeline's own code."""
        embeds, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds.to(self.denoiser.dtype)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity ``[B, C, F', h, w]`` for latents ``x_t`` in the same layout at timesteps ``t`` ``[B]``.

        The output keeps the transformer's dtype, as in ``WanPipeline.__call__`` (whose scheduler step then rounds
        ``sigma * v`` in that dtype); the stochastic samplers and the training error upcast to float32 themselves.
        """
        timestep = t.to(self.device)
        if self.pipe.config.expand_timesteps:
            # Wan2.2-TI2V takes one timestep per token; for text-to-video every token shares t (all-ones mask),
            # over the tokens of a 2 x 2 spatial patchification as in WanPipeline.__call__
            frames, height, width = x_t.shape[2:]
            tokens = frames * ((height + 1) // 2) * ((width + 1) // 2)
            timestep = timestep.float()[:, None].expand(x_t.shape[0], tokens)
        return self.denoiser(
            hidden_states=x_t.to(self.device, self.denoiser.dtype),
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.denoiser.dtype),
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        prompts: list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        **kwargs,
    ) -> SampleOutput:
        """:meth:`DiffusionModel.sample` with WanPipeline's default size (480 x 832, 81 frames)."""
        return super().sample(
            prompts,
            height=height or self.default_height,
            width=width or self.default_width,
            num_frames=num_frames or self.default_num_frames,
            **kwargs,
        )

    def prepare_latents(
        self, batch_size: int, height: int, width: int, num_frames: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Initial noise ``[B, C, F', h, w]`` float32, drawn by ``WanPipeline.prepare_latents`` itself.

        Unlike the pipeline, sizes it would round (with a warning) are rejected, so the output size is the one asked.
        With ``scale_factor_temporal=1`` any ``num_frames`` is taken as is; plain ``WanPipeline.__call__`` (diffusers
        0.42) still "rounds" it, since ``num_frames % 1 != 1``, to ``num_frames + 1`` (8 frames become 9).
        """
        num_frames = num_frames or self.default_num_frames
        temporal = self.pipe.vae_scale_factor_temporal
        # a VAE without temporal compression (factor 1) takes any frame count
        if temporal > 1 and num_frames % temporal != 1:
            raise ModelError(f"Wan needs num_frames = {temporal}k + 1 (e.g. 81 or {temporal + 1}), got {num_frames}")
        _, patch_h, patch_w = self.denoiser.config.patch_size
        # check_inputs wants multiples of 16; patchification wants multiples of vae factor x patch size
        mult_h = math.lcm(16, self.pipe.vae_scale_factor_spatial * patch_h)
        mult_w = math.lcm(16, self.pipe.vae_scale_factor_spatial * patch_w)
        if height % mult_h or width % mult_w:
            raise ModelError(f"Wan needs height divisible by {mult_h} and width by {mult_w}, got {height} x {width}")
        return self.pipe.prepare_latents(
            batch_size,
            self.denoiser.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            self.device,
            generator,
        )


def _check_video(pixels: torch.Tensor) -> None:
    if pixels.ndim != 5 or pixels.shape[2] != 3:
        raise ModelError(f"videos must be [B, F, 3, H, W] floats in [0, 1], got shape {tuple(pixels.shape)}")
