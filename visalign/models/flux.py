"""FLUX.1 (dev and schnell; MM-DiT with single-stream blocks, rectified flow) behind the DiffusionModel seam.

Mirrors ``FluxPipeline.__call__`` with one difference in layout: the latents that cross the seam (``encode``,
``prepare_latents``, ``predict``, ``sample``) stay **unpacked**, ``[B, 16, H/8, W/8]``, so trainers and
samplers treat FLUX like any image model. :meth:`FluxModel.predict` packs them into the 2x2-patch token
sequence the transformer takes, builds the positional ids, and unpacks the output.

Guidance: FLUX.1-dev is guidance-distilled (``guidance_embeds=True``): the guidance scale is an input of the
transformer, not a second CFG forward. :meth:`FluxModel.guided_predict` passes it that way; in training,
``predict`` reads it from ``cond["guidance"]`` (``[B]``) and otherwise uses :attr:`FluxModel.default_guidance`
(3.5, the pipeline's default and the value Diffusers' FLUX LoRA scripts and Flow-GRPO train with). Models
without a guidance embedding (FLUX.1-schnell) ignore the guidance scale, as the pipeline does. The pipeline's
optional "true CFG" (``true_cfg_scale`` with a negative prompt) is not part of this seam.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .base import Cond, ModelError, register_family
from .flow import FlowMatchingModel


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` latents to FLUX's token sequence ``[B, (h/2)(w/2), 4C]`` of 2x2 patches.

    Same element order as ``FluxPipeline._pack_latents``; ``h`` and ``w`` must be even.
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width to pack into 2x2 patches; got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C]`` to ``[B, C, h, w]`` (``height=h``, ``width=w``)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} FLUX tokens into {height}x{width} latents")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(
    height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Positional ids ``[height * width, 3]`` of the packed image tokens: ``(0, row, col)`` per token.

    ``height``/``width`` count tokens (half the latent size), as ``FluxPipeline._prepare_latent_image_ids``.
    """
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


@register_family
class FluxModel(FlowMatchingModel):
    """FLUX.1 pipelines (``FluxPipeline``)."""

    family: ClassVar[str] = "flux"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    default_resolution: ClassVar[int] = 1024
    default_steps: ClassVar[int] = 28
    default_guidance: ClassVar[float] = 3.5
    default_max_shift: ClassVar[float] = 1.15  # FluxPipeline's fallback for dynamic shifting
    # T5 tokens per prompt, the pipeline's default (FLUX.1-schnell was trained with 256)
    max_sequence_length: int = 512

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (FLUX.1-dev) rather than ignoring it."""
        return bool(self.denoiser.config.guidance_embeds)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """Text conditioning of the pipeline.

        Returns:
            ``encoder_hidden_states`` ``[B, max_sequence_length, joint_attention_dim]`` (T5) and
            ``pooled_projections`` ``[B, pooled_projection_dim]`` (CLIP pooled output). The text position ids
            are all zeros and are built in :meth:`predict`.
        """
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def with_guidance(self, cond: Cond, guidance: float) -> Cond:
        """``cond`` plus ``guidance`` ``[B]`` float32, the distilled guidance scale :meth:`predict` passes on."""
        batch = cond["encoder_hidden_states"].shape[0]
        return {**cond, "guidance": torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)}

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[0, 1]`` to unpacked latents ``[B, C, H/f, W/f]``."""
        return self.encode_shifted(pixels, generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_shifted(latents)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity ``[B, C, h, w]`` for unpacked latents ``x_t`` ``[B, C, h, w]`` at timesteps ``t`` ``[B]``.

        The transformer takes ``t / 1000`` (in the latents' dtype, as the pipeline passes it) and, when it has
        a guidance embedding, ``cond["guidance"]`` or :attr:`default_guidance`.
        """
        b, _, h, w = x_t.shape
        hidden = pack_latents(x_t.to(self.dtype))
        text = cond["encoder_hidden_states"]
        guidance = None
        if self.guidance_embeds:
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.full((b,), self.default_guidance, device=self.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=hidden,
            timestep=t.to(device=self.device, dtype=self.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=text.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, self.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def uses_cfg(self, guidance: float) -> bool:
        # dev embeds the guidance scale, schnell ignores it: neither runs an unconditional forward
        return False

    def guided_predict(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, guidance: float
    ) -> torch.Tensor:
        """One conditional forward; the guidance scale goes to the guidance embedding (``uncond`` is unused)."""
        if self.guidance_embeds:
            cond = self.with_guidance(cond, guidance)
        return self.predict(x_t, t, cond)

    def prepare_latents(
        self, batch_size: int, height: int, width: int, num_frames: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Initial noise ``[B, C, H/f, W/f]``: the pipeline's draw before it packs it (same generator, same noise)."""
        from diffusers.utils.torch_utils import randn_tensor

        factor = self.pipe.vae_scale_factor
        if height % (2 * factor) or width % (2 * factor):
            # the pipeline would silently round the size down; say so instead
            raise ModelError(f"height and width must be multiples of {2 * factor} for FLUX; got {height}x{width}")
        shape = (batch_size, self.denoiser.config.in_channels // 4, height // factor, width // factor)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def inference_sigmas(self, steps: int) -> np.ndarray | None:
        # FluxPipeline: a linear grid from 1 to 1/steps, shifted by the scheduler (unless it uses flow sigmas)
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / steps, steps)
