"""Shared view of flow-matching families (SD3, FLUX, Wan): rectified-flow noising, timesteps and schedules.

Rectified flow (Esser et al. 2024, Eq. 3) interpolates ``x_t = (1 - sigma) x0 + sigma noise`` and trains the
velocity ``noise - x0``. Timesteps are ``t = sigma * T`` as in Diffusers' ``FlowMatchEulerDiscreteScheduler``.
A family subclasses :class:`FlowMatchingModel` and supplies prompt encoding, the VAE and ``predict``; image
families with an ``AutoencoderKL`` that has ``shift_factor`` and ``scaling_factor`` (SD3, FLUX) reuse
:meth:`FlowMatchingModel.encode_shifted` / :meth:`FlowMatchingModel.decode_shifted`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..diffusion import flow_add_noise, flow_target, sample_flow_sigmas
from .base import DiffusionModel

if TYPE_CHECKING:
    from ..samplers import Sampler

# Attention projections of both streams of an MM-DiT block (image and text), as targeted by Diffusers'
# SD3/FLUX LoRA training scripts and by Flow-GRPO.
JOINT_ATTENTION_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def null_component_kwargs(model_index: dict) -> dict[str, None]:
    """``from_pretrained`` overrides for components saved as absent (``[null, null]`` in ``model_index.json``).

    A pipeline saved without an optional component (e.g. SD3 without T5) only reloads when that component
    is passed explicitly as ``None``.
    """
    return {
        name: None
        for name, value in model_index.items()
        if not name.startswith("_") and (value is None or (isinstance(value, list) and all(v is None for v in value)))
    }


class FlowMatchingModel(DiffusionModel):
    """Base of the flow-matching families: noising, targets, training timesteps, inference and SDE schedules.

    Subclasses implement ``encode_prompt``, ``encode``/``decode``, ``predict``, ``prepare_latents`` and
    :meth:`image_seq_len`; they may override :meth:`inference_sigmas` to mirror their pipeline's schedule.
    """

    is_flow: ClassVar[bool] = True
    denoiser_name: ClassVar[str] = "transformer"
    default_lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION_LORA_TARGETS
    # training density of sigma (SD3 paper, Sec. 3.1: logit-normal with m=0, s=1 performed best)
    timestep_scheme: ClassVar[str] = "logit_normal"
    logit_mean: ClassVar[float] = 0.0
    logit_std: ClassVar[float] = 1.0
    # fallback for a dynamic-shifting scheduler config without ``max_shift`` (pipelines differ: SD3 1.16, FLUX 1.15)
    default_max_shift: ClassVar[float] = 1.15

    @classmethod
    def load_kwargs(cls, model_index: dict) -> dict[str, Any]:
        return null_component_kwargs(model_index)

    # ----------------------------------------------------------------- training view
    @property
    def train_shift(self) -> float:
        """The shift applied to training sigmas: the scheduler's ``shift``, or 1 under dynamic shifting.

        This is what the scheduler's own training timesteps use (a dynamic-shifting scheduler such as FLUX's
        shifts only at inference, by resolution), and what Diffusers' SD3/FLUX training scripts sample from.
        """
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            return 1.0
        # FlowMatchEulerDiscreteScheduler names it ``shift``; UniPC/DPM-Solver with flow sigmas (Wan) ``flow_shift``
        return float(config.get("shift", config.get("flow_shift", 1.0)))

    def sigmas_of(self, t: torch.Tensor) -> torch.Tensor:
        """Scheduler timesteps ``[B]`` to sigmas ``[B]`` float32 in ``[0, 1]``."""
        return t.float() / self.num_train_timesteps

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps ``[B]`` float32, ``t = sigma * T`` with logit-normal, shifted sigmas."""
        sigmas = sample_flow_sigmas(
            batch_size,
            scheme=self.timestep_scheme,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            shift=self.train_shift,
            generator=generator,
            device=generator.device if generator is not None else self.device,
        )
        return (sigmas * self.num_train_timesteps).to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_add_noise(x0, noise, self.sigmas_of(t).to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_target(x0, noise)

    # ----------------------------------------------------------------- sampling schedule
    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Number of image tokens the denoiser sees for ``latents`` (drives the dynamic shift ``mu``)."""
        raise NotImplementedError

    def inference_sigmas(self, steps: int) -> np.ndarray | None:
        """Sigmas handed to ``set_timesteps`` (``None``: the scheduler's own linear grid), as the pipeline does."""
        return None

    def dynamic_shift_mu(self, latents: torch.Tensor) -> float:
        """``mu`` of a dynamic-shifting scheduler for these latents, with the pipeline's defaults."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        return calculate_shift(
            self.image_seq_len(latents),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", self.default_max_shift),
        )

    def inference_scheduler(self, steps: int, latents: torch.Tensor, sde: Sampler | None = None):
        """A private copy of the pipeline's scheduler on the pipeline's own timestep grid.

        The stochastic samplers of :mod:`visalign.samplers` use the same sigmas, so ``sde`` changes nothing here.
        """
        scheduler = copy.deepcopy(self.pipe.scheduler)
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.dynamic_shift_mu(latents)
        sigmas = self.inference_sigmas(steps)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, **kwargs)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        # the step index then starts at 0 without looking the first timestep up (no device sync)
        scheduler.set_begin_index(0)
        return scheduler

    def scale_initial_noise(self, scheduler, latents: torch.Tensor) -> torch.Tensor:
        """Flow sampling starts from unit noise at sigma = 1: no scaling."""
        return latents

    def sde_schedule(self, scheduler, index: int) -> dict[str, Any]:
        """Flow-SDE step quantities: current and next sigma, and ``sigmas[1]`` standing in for ``sigma = 1``.

        Returns:
            ``{"sigma", "sigma_next", "sigma_max"}``, each a 0-d float32 tensor on the model's device.
        """
        sigmas = scheduler.sigmas.to(device=self.device, dtype=torch.float32)
        return {"sigma": sigmas[index], "sigma_next": sigmas[index + 1], "sigma_max": sigmas[1]}

    # ----------------------------------------------------------------- AutoencoderKL with shift and scale
    def encode_shifted(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[0, 1]`` to ``(z - shift_factor) * scaling_factor`` (SD3/FLUX VAEs).

        The latent is a sample of the VAE posterior, as in Diffusers' SD3/FLUX training scripts.
        """
        vae = self.vae
        x = pixels.to(device=self.device, dtype=vae.dtype) * 2 - 1
        latents = vae.encode(x).latent_dist.sample(generator)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_shifted(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_shifted`: latents to pixels ``[B, 3, H, W]`` float32 in ``[0, 1]``."""
        vae = self.vae
        z = latents.to(device=self.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
