"""The UNet families: Stable Diffusion 1.x/2.x (``sd``, epsilon or v-prediction) and SDXL (``sdxl``).

Both mirror their Diffusers pipeline's ``__call__``: prompts go through the pipeline's own ``encode_prompt``,
latents are the VAE's scaled (and, where configured, shifted/normalised) latents, the UNet sees the
scheduler's ``scale_model_input``, and sampling without ``sde`` runs the pipeline's scheduler, so it
reproduces ``pipe(prompt, latents=...)`` image for image. Training uses the DDPM forward process with the
pipeline scheduler's betas, as Diffusers' training scripts do (``DDPMScheduler.from_pretrained(.., "scheduler")``).

SDXL adds the pooled embedding of its second text encoder (``cond["text_embeds"]``) and the size/crop
micro-conditioning ``time_ids`` (Podell et al. 2023, Sec. 2.2). ``time_ids`` are computed from the latent
size in :meth:`StableDiffusionXL.predict` unless ``cond`` carries them, so a data loader can pass the real
original size and crop of each training image (:meth:`StableDiffusionXL.time_ids`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any

import torch

from ..diffusion import ddpm_add_noise, ddpm_target
from .base import Cond, DiffusionModel, ModelError, register_family

if TYPE_CHECKING:
    from ..samplers import Sampler

PREDICTION_TYPES = ("epsilon", "v_prediction")


@register_family
class StableDiffusion(DiffusionModel):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``); epsilon or v-prediction per the scheduler config.

    ``cond``: ``{"encoder_hidden_states": [B, L, D]}`` (the text encoder's last hidden state).
    Latents: ``[B, C, H / f, W / f]`` with ``f = pipe.vae_scale_factor``, already multiplied by the VAE's
    ``scaling_factor``.
    """

    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    default_steps = 50
    default_guidance = 7.5

    def __init__(self, pipe, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import DDPMScheduler

        super().__init__(pipe, device=device, dtype=dtype)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        size = pipe.unet.config.sample_size
        # the pipeline's default resolution: 512 for SD1.5, 768 for SD2 (v), 1024 for SDXL
        if size is not None:  # else the family's default (a UNet config without sample_size)
            self.default_resolution = (size if isinstance(size, int) else size[0]) * self.vae_scale_factor
        self.prediction_type = pipe.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(
                f"{self.family}: scheduler prediction_type {self.prediction_type!r} is not supported; "
                f"expected one of {PREDICTION_TYPES}"
            )
        # The forward (training) process is DDPM on the scheduler's betas whatever the inference scheduler is.
        train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = train_scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)

    @classmethod
    def load_kwargs(cls, model_index: dict) -> dict[str, Any]:
        # visalign decodes latents itself and never runs the safety checker: do not load its 1.2 GB weights
        if "safety_checker" in model_index:
            return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return {}

    # ----------------------------------------------------------------- prompts
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """``{"encoder_hidden_states": [B, 77, D]}`` from the pipeline's ``encode_prompt`` (no CFG batch)."""
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def negative_cond(self, cond: Cond, negative_prompt: str | list[str] | None = None) -> Cond:
        """The negative prompt's encoding; entries ``encode_prompt`` does not produce (SDXL ``time_ids`` from a
        data loader) are shared with the conditional branch, as the pipeline shares ``add_time_ids``."""
        uncond = super().negative_cond(cond, negative_prompt)
        return {**{k: v for k, v in cond.items() if k not in uncond}, **uncond}

    # ----------------------------------------------------------------- pixels <-> latents
    @property
    def upcast_vae(self) -> bool:
        """Whether the VAE runs in fp32 for a fp16 model (the SD pipeline never upcasts; SDXL overrides)."""
        return False

    @contextlib.contextmanager
    def _vae_precision(self):
        """Run the VAE in fp32 when :attr:`upcast_vae` (as the SDXL pipeline's ``upcast_vae``), then restore."""
        if not self.upcast_vae:
            yield self.dtype
            return
        self.vae.to(torch.float32)
        try:
            yield torch.float32
        finally:
            self.vae.to(self.dtype)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel ``latents_mean, latents_std`` ``[1, C, 1, 1]`` of VAEs that set them (e.g. Playground)."""
        cfg = self.vae.config
        if cfg.get("latents_mean") is None or cfg.get("latents_std") is None:
            return None
        shape = (1, -1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[0, 1]`` to model latents ``[B, C, H / f, W / f]`` (a VAE posterior sample).

        The exact inverse of :meth:`decode`'s scaling: ``(z - shift) * scaling_factor`` (shift 0 unless the
        VAE config sets ``shift_factor``), or ``(z - mean) * scaling_factor / std`` for VAEs with latent stats.
        """
        cfg = self.vae.config
        with self._vae_precision() as vae_dtype:
            x = pixels.to(self.device, vae_dtype) * 2 - 1
            z = self.vae.encode(x).latent_dist.sample(generator)
        stats = self._latent_stats(z)
        if stats is not None:
            z = (z - stats[0]) * cfg.scaling_factor / stats[1]
        else:
            z = (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor
        return z.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents ``[B, C, h, w]`` to pixels ``[B, 3, h f, w f]`` float32 in ``[0, 1]``, as the pipeline."""
        cfg = self.vae.config
        with self._vae_precision() as vae_dtype:
            z = latents.to(self.device, vae_dtype)
            stats = self._latent_stats(z)
            # same operation order as the pipelines, so decoding is bit-identical to theirs
            if stats is not None:
                z = z * stats[1] / cfg.scaling_factor + stats[0]
            else:
                z = z / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
            image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------- training view
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, T)`` as float ``[B]`` (Ho et al. 2020, Algorithm 1)."""
        device = generator.device if generator is not None else self.device
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)
        return t.float().to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_add_noise(x0, noise, t, self.alphas_cumprod)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)

    def added_cond_kwargs(self, x_t: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor] | None:
        """Extra UNet conditioning (``added_cond_kwargs``); none for SD1.x/2.x."""
        return None

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's epsilon or v prediction ``[B, C, h, w]`` (model dtype) at float timesteps ``t`` ``[B]``."""
        return self.denoiser(
            x_t.to(self.device, self.dtype),
            t.to(self.device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, self.dtype),
            added_cond_kwargs=self.added_cond_kwargs(x_t, cond),
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------- sampling hooks
    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        num_frames: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Unit noise ``[B, C, H / f, W / f]``, drawn as the pipeline draws it (scaled later by the loop)."""
        from diffusers.utils.torch_utils import randn_tensor

        f = self.vae_scale_factor
        if height % f or width % f:
            raise ModelError(f"{self.family}: height and width must be multiples of {f}; got {height}x{width}")
        shape = (batch_size, self.denoiser.config.in_channels, height // f, width // f)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return noise

    def inference_scheduler(self, steps: int, latents: torch.Tensor | None, sde: Sampler | None = None):
        """The pipeline's scheduler for ODE sampling; a DDIM grid on the same betas for DDIM-eta (``sde``).

        The DDIM grid never clips ``x0_hat`` (as :func:`visalign.sde.ddim_step`): a config without
        ``clip_sample`` (e.g. an Euler one) would otherwise get DDIM's default ``clip_sample=True``.
        """
        if sde is None:
            return super().inference_scheduler(steps, latents, sde)
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, clip_sample=False)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def scale_model_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def scheduler_step(self, scheduler, model_output, t, latents, generator=None) -> torch.Tensor:
        # as the pipeline's prepare_extra_step_kwargs: only stochastic schedulers take a generator
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        return scheduler.step(model_output, t, latents, **kwargs, return_dict=False)[0]

    def sde_schedule(self, scheduler, index: int) -> dict[str, Any]:
        """``alpha_prod_t``, ``alpha_prod_prev`` (0-dim fp32) and ``prediction_type`` at step ``index``.

        Exactly the quantities of ``DDIMScheduler.step``: the previous timestep is ``t - T // steps`` and
        past ``t = 0`` the scheduler's ``final_alpha_cumprod`` is used (the last step).
        """
        t = int(scheduler.timesteps[index])
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod
        alpha_prod_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        return {
            "alpha_prod_t": alphas[t].to(self.device, torch.float32),
            "alpha_prod_prev": torch.as_tensor(alpha_prod_prev).to(self.device, torch.float32),
            "prediction_type": scheduler.config.prediction_type,
        }


@register_family
class StableDiffusionXL(StableDiffusion):
    """SDXL (``StableDiffusionXLPipeline``).

    ``cond``: ``{"encoder_hidden_states": [B, 77, D1 + D2], "text_embeds": [B, P]}`` (both encoders'
    penultimate hidden states concatenated; the second encoder's pooled projection), optionally
    ``"time_ids": [B, 6]`` (original size, crop top-left, target size).
    """

    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_steps = 50
    default_guidance = 5.0

    @classmethod
    def load_kwargs(cls, model_index: dict) -> dict[str, Any]:
        return {}

    def encode_prompt(self, prompts: list[str]) -> Cond:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def negative_cond(self, cond: Cond, negative_prompt: str | list[str] | None = None) -> Cond:
        """As :meth:`StableDiffusion.negative_cond`, but with no negative prompt and the pipeline's
        ``force_zeros_for_empty_prompt`` (SDXL base) the unconditional embeddings are zeros, as in the pipeline.
        """
        if negative_prompt is None and self.pipe.config.force_zeros_for_empty_prompt:
            zeros = {k: torch.zeros_like(cond[k]) for k in ("encoder_hidden_states", "text_embeds")}
            return {**cond, **zeros}
        return super().negative_cond(cond, negative_prompt)

    @property
    def upcast_vae(self) -> bool:
        # the SDXL 1.0 VAE overflows in fp16 (force_upcast=True); bf16 has the range and is left as is
        return self.dtype == torch.float16 and bool(self.vae.config.force_upcast)

    def time_ids(
        self,
        batch_size: int,
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """SDXL micro-conditioning ``[B, 6]``: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

        Same values and dtype as the pipeline's ``_get_add_time_ids``; ``target_size`` defaults to
        ``original_size``.
        """
        values = [*original_size, *crop_top_left, *(target_size or original_size)]
        return torch.tensor([values], dtype=self.dtype, device=self.device).repeat(batch_size, 1)

    def added_cond_kwargs(self, x_t: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        time_ids = cond.get("time_ids")
        if time_ids is None:
            # the pipeline's default: original = target = the generated size, no crop
            size = (x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor)
            time_ids = self.time_ids(x_t.shape[0], size)
        return {
            "text_embeds": cond["text_embeds"].to(self.device, self.dtype),
            "time_ids": time_ids.to(self.device, self.dtype),
        }
