"""Stable Diffusion 3 / 3.5 (MM-DiT, rectified flow) behind the DiffusionModel seam.

Mirrors ``StableDiffusion3Pipeline.__call__``: prompts go through the pipeline's own ``encode_prompt`` (two
CLIP encoders plus T5, or zeros in T5's place when the pipeline was loaded with ``text_encoder_3=None``),
latents are ``[B, 16, H/8, W/8]`` scaled as ``(z - shift_factor) * scaling_factor``, the transformer takes the
timestep ``t = sigma * 1000`` and CFG is ``u + w (c - u)`` over one batched forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Cond, ModelError, register_family
from .flow import FlowMatchingModel


@register_family
class SD3Model(FlowMatchingModel):
    """SD3 / SD3.5 pipelines (``StableDiffusion3Pipeline``)."""

    family: ClassVar[str] = "sd3"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    default_resolution: ClassVar[int] = 1024
    default_steps: ClassVar[int] = 28
    default_guidance: ClassVar[float] = 7.0
    default_max_shift: ClassVar[float] = 1.16  # StableDiffusion3Pipeline's fallback for dynamic shifting
    # T5 tokens per prompt, the pipeline's default (set on an instance to trade context for speed)
    max_sequence_length: int = 256

    def __init__(self, pipe, **kw):
        super().__init__(pipe, **kw)
        # the pipeline's default resolution, as StableDiffusion3Pipeline computes it: 1024 for SD3 / SD3.5
        size = getattr(pipe.transformer.config, "sample_size", None)
        if size:
            self.default_resolution = int(size) * int(pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """Text conditioning of the pipeline, without CFG.

        Returns:
            ``encoder_hidden_states`` ``[B, 77 + max_sequence_length, joint_attention_dim]`` (CLIP-L and CLIP-G
            penultimate states concatenated and zero-padded to T5's width, then the T5 states, or zeros
            without T5) and ``pooled_projections`` ``[B, pooled_projection_dim]``.
        """
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[0, 1]`` to latents ``[B, C, H/f, W/f]`` (``f`` = VAE scale factor)."""
        return self.encode_shifted(pixels, generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_shifted(latents)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity ``[B, C, h, w]`` for latents ``x_t`` ``[B, C, h, w]`` at timesteps ``t`` ``[B]`` (sigma * 1000)."""
        return self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=t.to(device=self.device, dtype=torch.float32),
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def prepare_latents(
        self, batch_size: int, height: int, width: int, num_frames: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Initial noise ``[B, C, H/f, W/f]``, drawn as the pipeline draws it."""
        multiple = self.pipe.vae_scale_factor * self.denoiser.config.patch_size
        if height % multiple or width % multiple:
            raise ModelError(
                f"height and width must be multiples of {multiple} for this SD3 model; got {height}x{width}"
            )
        return self.pipe.prepare_latents(
            batch_size, self.denoiser.config.in_channels, height, width, self.dtype, self.device, generator
        )

    def image_seq_len(self, latents: torch.Tensor) -> int:
        patch = self.denoiser.config.patch_size
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
