"""CogVideoX 1.0 / 1.5 text-to-video (``CogVideoXPipeline``): a v-prediction transformer on a causal video VAE.

Latent layout: ``[B, F', C, h, w]``, the layout ``CogVideoXTransformer3DModel`` takes (frames before channels),
scaled by the VAE's ``scaling_factor``. Timesteps are DDPM steps ``[0, 1000)`` and the noise schedule is the
scheduler's own ``alphas_cumprod``: the CogVideoX schedulers shift the SNR (``snr_shift_scale``) and rescale it to
zero at the last step, so recomputing it from the betas would be wrong.

CogVideoX 1.5 patchifies time in pairs (``patch_size_t = 2``) but its VAE makes an odd number of latent frames.
As ``CogVideoXPipeline.__call__`` (for sampling) and THUDM's fine-tuning code (for data) do, latents are padded at
the front to a multiple of ``patch_size_t`` (noise when sampling, copies of the first frame when encoding), and
:meth:`CogVideoXModel.decode` drops the padding again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..diffusion import ddpm_add_noise, ddpm_target
from .base import Cond, DiffusionModel, ModelError, SampleOutput, register_family

if TYPE_CHECKING:
    from ..samplers import Sampler


# The scheduler the released CogVideoX checkpoints ship (CogVideoX-2b/5b ``scheduler_config.json``), for pipelines
# built in code (tests, benchmarks): v-prediction on zero-terminal-SNR betas, trailing timesteps.
RELEASED_SCHEDULER_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    timestep_spacing="trailing",
)


@register_family
class CogVideoXModel(DiffusionModel):
    """CogVideoX text-to-video as a :class:`DiffusionModel` (v-prediction, latents ``[B, F', C, h, w]``)."""

    family: ClassVar[str] = "cogvideox"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("CogVideoXPipeline",)
    denoiser_name: ClassVar[str] = "transformer"
    is_video: ClassVar[bool] = True
    is_flow: ClassVar[bool] = False
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_resolution: ClassVar[int] = 480
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 6.0  # CogVideoXPipeline.__call__ default

    # ----------------------------------------------------------------- helpers
    @property
    def _patch_t(self) -> int | None:
        """Temporal patch size: ``None`` for CogVideoX 1.0, 2 for CogVideoX 1.5."""
        return self.denoiser.config.patch_size_t

    def _latent_frames(self, num_frames: int) -> tuple[int, int]:
        """``(latent frames, padding frames)`` for a video of ``num_frames`` frames, as ``CogVideoXPipeline``."""
        frames = (num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        if self._patch_t is None:
            return frames, 0
        _check_odd_latent_frames(frames)
        return frames, (-frames) % self._patch_t

    # ----------------------------------------------------------------- latents
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos to scaled latents.

        Args:
            pixels: ``[B, F, 3, H, W]`` float in ``[0, 1]``. The released VAE (4x in time) decodes ``F = 8k + 1``
                frames (e.g. 49) back to ``F``; it needs an odd latent length, so other counts come back longer,
                as in Diffusers.
            generator: draws the posterior sample (as CogVideoX fine-tuning does).

        Returns:
            ``[B, F', C, h, w]`` float32, ``z * scaling_factor``; CogVideoX 1.5 latents are front-padded with copies
            of the first latent frame to a multiple of ``patch_size_t``.
        """
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise ModelError(f"videos must be [B, F, 3, H, W] floats in [0, 1], got shape {tuple(pixels.shape)}")
        video = pixels.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
        z = self.vae.encode(video).latent_dist.sample(generator=generator).float() * self.vae.config.scaling_factor
        latents = z.permute(0, 2, 1, 3, 4)  # [B, F', C, h, w]
        if self._patch_t is not None:
            _check_odd_latent_frames(latents.shape[1])
            pad = (-latents.shape[1]) % self._patch_t
            latents = torch.cat([latents[:, :1].expand(-1, pad, -1, -1, -1), latents], dim=1)
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, F', C, h, w]`` to pixels ``[B, F, 3, H, W]`` float32 in ``[0, 1]``.

        For CogVideoX 1.5 an even latent length means one frame of front padding (see the module docstring),
        which is dropped as ``CogVideoXPipeline.__call__`` does.
        """
        if self._patch_t is not None and latents.shape[1] % 2 == 0:
            latents = latents[:, 1:]
        latents = latents.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4)  # [B, C, F', h, w]
        video = self.vae.decode(1 / self.vae.config.scaling_factor * latents).sample
        return self.pipe.video_processor.postprocess_video(video, output_type="pt").float()

    # ----------------------------------------------------------------- training view
    @property
    def _alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, T)`` as float32 ``[B]`` (as CogVideoX fine-tuning samples them)."""
        device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)
        return t.float().to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_add_noise(x0, noise, t, self._alphas_cumprod)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_target(x0, noise, t, self._alphas_cumprod, self.pipe.scheduler.config.prediction_type)

    def encode_prompt(self, prompts: list[str]) -> Cond:
        """T5 embeddings ``{"prompt_embeds": [B, L, D]}`` via the pipeline's own code.

        ``L`` is the transformer's ``max_text_seq_length`` (226 for the released models): its position embeddings
        assume exactly that many text tokens.
        """
        embeds, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.denoiser.config.max_text_seq_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds.to(self.denoiser.dtype)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v-prediction ``[B, F', C, h, w]`` float32 (the pipeline upcasts before the scheduler step)."""
        rotary = None
        if self.denoiser.config.use_rotary_positional_embeddings:
            spatial = self.pipe.vae_scale_factor_spatial
            height, width = x_t.shape[3] * spatial, x_t.shape[4] * spatial
            rotary = self.pipe._prepare_rotary_positional_embeddings(height, width, x_t.shape[1], self.device)
        out = self.denoiser(
            hidden_states=x_t.to(self.device, self.denoiser.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.denoiser.dtype),
            timestep=t.to(self.device),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return out.float()

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
        """:meth:`DiffusionModel.sample` with CogVideoXPipeline's defaults (the transformer's sample size)."""
        config = self.denoiser.config
        spatial = self.pipe.vae_scale_factor_spatial
        return super().sample(
            prompts,
            height=height or config.sample_height * spatial,
            width=width or config.sample_width * spatial,
            num_frames=num_frames or config.sample_frames,
            **kwargs,
        )

    def prepare_latents(
        self, batch_size: int, height: int, width: int, num_frames: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Unit-Gaussian initial noise ``[B, F', C, h, w]`` drawn as ``CogVideoXPipeline.prepare_latents`` draws it.

        For CogVideoX 1.5 ``F'`` includes the front padding to a multiple of ``patch_size_t``. The pipeline's
        ``init_noise_sigma`` factor (1 for both CogVideoX schedulers) is applied by :meth:`scale_initial_noise`.
        """
        from diffusers.utils.torch_utils import randn_tensor

        num_frames = num_frames or self.denoiser.config.sample_frames
        spatial = self.pipe.vae_scale_factor_spatial
        multiple = spatial * self.denoiser.config.patch_size
        if height % multiple or width % multiple:
            raise ModelError(f"CogVideoX needs height and width divisible by {multiple}, got {height} x {width}")
        frames, padding = self._latent_frames(num_frames)
        shape = (batch_size, frames + padding, self.denoiser.config.in_channels, height // spatial, width // spatial)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.denoiser.dtype)

    def inference_scheduler(self, steps: int, latents: torch.Tensor, sde: Sampler | None = None):
        scheduler = super().inference_scheduler(steps, latents, sde)
        # CogVideoXDPMScheduler is a two-step solver whose state the pipeline carries in its loop
        scheduler.visalign_old_x0 = None
        return scheduler

    def scale_model_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def scheduler_step(self, scheduler, model_output, t, latents, generator=None) -> torch.Tensor:
        """One step as ``CogVideoXPipeline.__call__`` takes it (``eta = 0``), for the DDIM and the DPM scheduler."""
        from diffusers import CogVideoXDPMScheduler

        if isinstance(scheduler, CogVideoXDPMScheduler):
            index = int((scheduler.timesteps == t).nonzero()[0, 0])
            previous = scheduler.timesteps[index - 1] if index > 0 else None
            prev_sample, scheduler.visalign_old_x0 = scheduler.step(
                model_output,
                scheduler.visalign_old_x0,
                t,
                previous,
                latents,
                eta=0.0,
                generator=generator,
                return_dict=False,
            )
        else:
            prev_sample = scheduler.step(model_output, t, latents, eta=0.0, generator=generator, return_dict=False)[0]
        return prev_sample.to(latents.dtype)

    def sde_schedule(self, scheduler, index: int) -> dict[str, Any]:
        """DDIM quantities at step ``index``, with the previous timestep chosen as the CogVideoX schedulers do.

        Returns:
            ``alpha_prod_t``, ``alpha_prod_prev`` (float32 scalar tensors) and ``prediction_type``.
        """
        t = int(scheduler.timesteps[index])
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod.to(self.device, torch.float32)
        alpha_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(self.device, torch.float32)
        return {
            "alpha_prod_t": alphas[t],
            "alpha_prod_prev": alpha_prev,
            "prediction_type": scheduler.config.prediction_type,
        }


def _check_odd_latent_frames(frames: int) -> None:
    """CogVideoX 1.5: the padding is recognisable (and the VAE decodes right) only for an odd latent length."""
    if frames % 2 == 0:
        raise ModelError(
            f"CogVideoX 1.5 needs num_frames = 8k + 1 (e.g. 81), which gives an odd number of latent frames; "
            f"got {frames} latent frames"
        )
