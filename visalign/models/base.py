"""The DiffusionModel seam: the one interface between trainers and model families.

A trainer never branches on the family; it asks the wrapped pipeline to encode prompts, move between
pixels and latents, noise, predict and sample. Each family (``sd.py``, ``sd3.py``, ``flux.py``, ``wan.py``,
``cogvideox.py``) is one subclass registered with :func:`register_family`.

Conventions shared by every family:

* ``cond`` is a ``dict[str, Tensor]`` whose tensors are all batch-first, so it can be indexed and
  concatenated generically (:func:`cat_cond`, :func:`index_cond`).
* Timesteps ``t`` are float tensors ``[B]`` in scheduler units ``[0, T)``; flow families use ``t = sigma * T``.
* Pixels are float in ``[0, 1]``, RGB, channel-first: images ``[B, 3, H, W]``, videos ``[B, F, 3, H, W]``.
* The reference model is the same network with LoRA disabled (:meth:`DiffusionModel.lora_disabled`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm.auto import tqdm

from ..diffusion import per_sample_mse
from ..errors import ModelError
from .lora import LoraMixin

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..samplers import Sampler
    from ..sde import StepOutput

Cond = dict[str, torch.Tensor]


def cat_cond(*conds: Cond) -> Cond:
    """Concatenate conditionings along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def index_cond(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """Select samples of a conditioning."""
    return {k: v[index] for k, v in cond.items()}


def repeat_cond(cond: Cond, repeats: int) -> Cond:
    """Repeat every sample ``repeats`` times in place (``[a, b] -> [a, a, b, b]``), e.g. for GRPO groups."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


@dataclass
class SampleOutput:
    """What :meth:`DiffusionModel.sample` returns.

    Attributes:
        pixels: ``[B, 3, H, W]`` or ``[B, F, 3, H, W]`` float32 in ``[0, 1]``.
        latents: final latents ``[B, ...]``.
        timesteps: ``[S]`` the timesteps visited (scheduler units).
        trajectory: ``[B, S + 1, ...]`` latents before each step and after the last (only when recorded).
        log_probs: ``[B, S]`` fp32 per-step log-probs of the stochastic sampler (only with ``sde``).
        means, stds: per-step transition means ``[B, S, ...]`` and stds ``[B, S]`` (only with ``sde``).
    """

    pixels: torch.Tensor | None
    latents: torch.Tensor
    timesteps: torch.Tensor
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    means: torch.Tensor | None = None
    stds: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class DiffusionModel(LoraMixin):
    """A Diffusers pipeline wrapped for training and sampling. Subclass per family.

    Subclasses set the class attributes and implement the abstract methods; everything else (CFG,
    the sampling loop, attention backends, the denoising error) is shared here, LoRA and the reference
    in :class:`~visalign.models.lora.LoraMixin`.
    """

    family: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_name: ClassVar[str] = "unet"
    is_video: ClassVar[bool] = False
    is_flow: ClassVar[bool] = False
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_resolution: ClassVar[int] = 512
    default_steps: ClassVar[int] = 30
    default_guidance: ClassVar[float] = 5.0

    def __init__(self, pipe, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        pipe.to(device=self.device)
        if pipe.dtype != dtype:  # a pipeline built in code; from_pretrained(dtype=...) already placed it and
            pipe.to(dtype=dtype)  # keeps the modules a model marks as fp32 (Wan's norms, rotary) in fp32
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()
        pipe.set_progress_bar_config(disable=True)
        self.source: str | None = None

    @classmethod
    def load_kwargs(cls, model_index: dict) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments a family needs for a given ``model_index.json``."""
        return {}

    # ----------------------------------------------------------------- components
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    # ----------------------------------------------------------------- family hooks
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """Text conditioning for ``prompts`` (all tensors batch-first)."""
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in ``[0, 1]`` to scaled (and shifted) latents that the denoiser sees."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to pixels in ``[0, 1]`` (float32)."""
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps ``[B]`` in scheduler units."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's raw output (epsilon, v or velocity, as the family trains), same shape as ``x_t``."""
        raise NotImplementedError

    def negative_cond(self, cond: Cond, negative_prompt: str | list[str] | None = None) -> Cond:
        """The unconditional branch of classifier-free guidance for a batch conditioned on ``cond``.

        Encodes ``negative_prompt`` (``""`` when ``None``), one string for the batch or one per sample. Trainers
        use this same hook, so CFG at training time matches sampling. Families override it where the pipeline
        does something else (SDXL zeros the branch for an absent negative prompt).
        """
        batch = next(iter(cond.values())).shape[0]
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch
        if len(negs) != batch:
            raise ModelError(f"got {len(negs)} negative prompts for a batch of {batch}; pass one or one per prompt")
        return self.encode_prompt(negs)

    def prepare_latents(
        self, batch_size: int, height: int, width: int, num_frames: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Unit Gaussian initial noise, drawn as the pipeline draws it, in the layout :meth:`predict` takes.

        The scheduler-dependent scale is applied afterwards by :meth:`scale_initial_noise`, so a caller can
        draw one noise per seed and pass it as ``sample(latents=...)``.
        """
        raise NotImplementedError

    def scale_initial_noise(self, scheduler, latents: torch.Tensor) -> torch.Tensor:
        """Scale unit noise to the scheduler's first step (``init_noise_sigma``: > 1 for Euler-type grids)."""
        return latents * scheduler.init_noise_sigma

    def inference_scheduler(self, steps: int, latents: torch.Tensor, sde: Sampler | None = None):
        """A private copy of the pipeline's scheduler with ``set_timesteps`` applied.

        Families whose stochastic sampler needs another timestep grid (e.g. DDIM for DDIM-eta) return that
        scheduler when ``sde`` is given.
        """
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def scale_model_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Scheduler-specific input scaling before the denoiser (identity for most schedulers)."""
        return latents

    def scheduler_step(self, scheduler, model_output, t, latents, generator=None) -> torch.Tensor:
        """One deterministic (ODE) step with the pipeline's scheduler."""
        return scheduler.step(model_output, t, latents, return_dict=False)[0]

    def sde_schedule(self, scheduler, index: int) -> dict[str, Any]:
        """The schedule quantities a stochastic sampler of :mod:`visalign.samplers` needs at step ``index``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared training view
    def denoising_error(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        cond: Cond,
        uncond: Cond | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Per-sample mean squared error of the prediction, ``[B]`` float32 (the ELBO surrogate); with ``uncond``
        and ``guidance`` the error of the classifier-free-guided prediction (what sampling uses)."""
        x_t = self.add_noise(x0, noise, t)
        return per_sample_mse(self.guided_predict(x_t, t, cond, uncond, guidance), self.target(x0, noise, t))

    def guided_predict(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, guidance: float
    ) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): ``u + w (c - u)`` in one batched forward."""
        if uncond is None or guidance == 1.0:
            return self.predict(x_t, t, cond)
        both = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
        out_u, out_c = both.chunk(2)
        return out_u + guidance * (out_c - out_u)

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1.0

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        prompts: list[str],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        sde: Sampler | Sequence[Sampler] | None = None,
        latents: torch.Tensor | None = None,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        record_trajectory: bool = False,
        decode: bool = True,
        progress: bool = False,
        step_callback=None,
        grad: bool = False,
        output_hook=None,
    ) -> SampleOutput:
        """Generate from ``prompts``; with ``sde`` the sampler is stochastic and log-probs are returned.

        ``sde`` is one sampler for every step or a sequence of one per step (an SDE window: noise-free samplers
        outside it, whose steps are deterministic with log-prob 0); each step is :meth:`sde_step`.

        ``latents`` are unit-Gaussian initial noise (as :meth:`prepare_latents` draws it); they are scaled to
        the scheduler's first step here, as the Diffusers pipelines scale given latents.

        The deterministic path (``sde=None``) uses the pipeline's own scheduler, so it reproduces the
        Diffusers pipeline given the same initial latents. ``step_callback(model, index, t)`` runs before
        each step (used to switch adapters per timestep). ``output_hook(model, scheduler, index, latents, out)``
        may replace the guided prediction before the scheduler steps (reward guidance,
        :mod:`visalign.guidance`; deterministic sampling only). Sampling runs without autograd unless ``grad``
        (for backpropagation through the sampler).
        """
        if output_hook is not None and sde is not None:
            raise ValueError("output_hook applies to deterministic sampling; pass sde=None")
        with torch.set_grad_enabled(grad):
            return self._sample(
                prompts,
                steps=steps,
                guidance=guidance,
                negative_prompt=negative_prompt,
                generator=generator,
                height=height,
                width=width,
                num_frames=num_frames,
                sde=sde,
                latents=latents,
                cond=cond,
                uncond=uncond,
                record_trajectory=record_trajectory,
                decode=decode,
                progress=progress,
                step_callback=step_callback,
                output_hook=output_hook,
            )

    def _sample(
        self,
        prompts,
        *,
        steps,
        guidance,
        negative_prompt,
        generator,
        height,
        width,
        num_frames,
        sde,
        latents,
        cond,
        uncond,
        record_trajectory,
        decode,
        progress,
        step_callback,
        output_hook=None,
    ) -> SampleOutput:
        steps = steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        height = height or self.default_resolution
        width = width or self.default_resolution
        batch = len(prompts)
        if cond is None:
            cond = self.encode_prompt(list(prompts))
        if uncond is None and self.uses_cfg(guidance):
            uncond = self.negative_cond(cond, negative_prompt)
        if latents is None:
            latents = self.prepare_latents(batch, height, width, num_frames, generator)
        scheduler = self.inference_scheduler(steps, latents, sde)
        latents = self.scale_initial_noise(scheduler, latents)
        timesteps = scheduler.timesteps
        samplers = self._per_step_samplers(sde, len(timesteps))
        traj, logps, means, stds = [latents], [], [], []
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            if step_callback is not None:
                step_callback(self, i, t)
            if sde is None:
                t_batch = t.expand(latents.shape[0]).to(self.device)
                x_in = self.scale_model_input(scheduler, latents, t)
                out = self.guided_predict(x_in, t_batch, cond, uncond, guidance)
                if output_hook is not None:
                    out = output_hook(self, scheduler, i, latents, out)
                latents = self.scheduler_step(scheduler, out, t, latents, generator)
            else:
                step = self.sde_step(scheduler, i, latents, cond, uncond, guidance, samplers[i], generator=generator)
                latents = step.prev_sample.to(latents.dtype)
                logps.append(step.log_prob)
                means.append(step.mean)
                stds.append(step.std.flatten(1)[:, 0] if step.std.ndim else step.std.expand(latents.shape[0]))
            if record_trajectory:
                traj.append(latents)
        pixels = self.decode(latents) if decode else None
        return SampleOutput(
            pixels=pixels,
            latents=latents,
            timesteps=timesteps,
            trajectory=torch.stack(traj, dim=1) if record_trajectory else None,
            log_probs=torch.stack(logps, dim=1) if sde is not None else None,
            means=torch.stack(means, dim=1) if sde is not None and record_trajectory else None,
            stds=torch.stack(stds, dim=1) if sde is not None else None,
        )

    @property
    def sde_kind(self) -> str:
        return "flow" if self.is_flow else "ddim"

    def _per_step_samplers(self, sde: Sampler | Sequence[Sampler] | None, steps: int) -> list[Sampler | None]:
        """``sde`` as one sampler per step (a sequence mixes samplers, e.g. an SDE window with noise-free steps)."""
        if sde is None:
            return [None] * steps
        samplers = list(sde) if isinstance(sde, (list, tuple)) else [sde] * steps
        if len(samplers) != steps:
            raise ModelError(f"got {len(samplers)} per-step samplers for {steps} sampling steps; pass one per step")
        for s in samplers:
            if s.kind != self.sde_kind:
                raise ModelError(
                    f"sampler {s.name!r} is for {s.kind} models but {self.family} needs a {self.sde_kind} sampler"
                )
        return samplers

    def sde_step(
        self,
        scheduler,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        cond: Cond,
        uncond: Cond | None,
        guidance: float,
        sde: Sampler,
        *,
        generator: torch.Generator | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        """One stochastic transition from ``latents`` at step ``index`` of ``scheduler``'s grid, with its log-prob.

        The one step shared by :meth:`sample` (rollouts) and by online RL training (GRPO recomputes the log-prob
        of a stored transition by passing ``prev_sample``), so both use the same timestep grid, input scaling,
        classifier-free guidance and schedule values.

        Args:
            scheduler: from :meth:`inference_scheduler` (called with the same ``steps``, latent shape and ``sde``).
            index: the step, an ``int`` or a per-sample ``[B]`` integer tensor (samples at different steps).
            latents: ``[B, ...]`` the samples before the step.
            cond, uncond, guidance: as :meth:`guided_predict`.
            sde: a sampler of :mod:`visalign.samplers`.
            generator: draws the step's noise (unused when ``prev_sample`` is given).
            prev_sample: ``[B, ...]`` a stored next sample to score instead of sampling one.

        Returns:
            :class:`~visalign.sde.StepOutput`; ``prev_sample`` is the sample in ``latents``' dtype (as the
            trajectory keeps it) and ``log_prob`` is the log-density of exactly that sample.
        """
        batch = latents.shape[0]
        if isinstance(index, torch.Tensor):
            if index.shape != (batch,):
                raise ModelError(f"per-sample step indices must have shape [{batch}], got {tuple(index.shape)}")
            if bool((index == index[0]).all()):
                index = int(index[0])
        if isinstance(index, int):
            t = scheduler.timesteps[index]
            t_batch = t.expand(batch).to(self.device)
            x_in = self.scale_model_input(scheduler, latents, t)
            schedule = self.sde_schedule(scheduler, index)
        else:
            steps = index.tolist()
            t_batch = scheduler.timesteps[index.to(scheduler.timesteps.device)].to(self.device)
            x_in = torch.empty_like(latents)
            for i in sorted(set(steps)):  # input scaling may depend on the step: one call per step present
                rows = index.to(latents.device) == i
                x_in[rows] = self.scale_model_input(scheduler, latents[rows], scheduler.timesteps[i])
            schedule = _stack_schedules([self.sde_schedule(scheduler, i) for i in steps])
        out = self.guided_predict(x_in, t_batch, cond, uncond, guidance)
        step = sde.step(out, latents, generator=generator, prev_sample=prev_sample, **schedule)
        if prev_sample is None and latents.dtype != torch.float32:
            # the trajectory keeps the sample in the model's dtype: score that rounded sample, so the rollout's
            # log-prob is the one that training recomputes from the stored trajectory (no model call)
            kept = step.prev_sample.to(latents.dtype)
            step = sde.step(out, latents, prev_sample=kept, **schedule)
        return step

    # ----------------------------------------------------------------- attention
    sampling_source: str = "family"  # where default_steps / default_guidance / default_resolution come from

    def apply_sampling_defaults(self, sampling: dict, source: str) -> None:
        """This model's own sampling settings (a shapes-world folder's ``toyworld.json``: ``steps``, ``guidance``,
        ``height``/``width``, ``num_frames``) as its defaults, in place of the family's; every command that samples
        without an explicit setting then uses them."""
        if not sampling:
            return
        if sampling.get("steps"):
            self.default_steps = int(sampling["steps"])
        if sampling.get("guidance") is not None:
            self.default_guidance = float(sampling["guidance"])
        if sampling.get("height") and sampling.get("height") == sampling.get("width", sampling["height"]):
            self.default_resolution = int(sampling["height"])
        if sampling.get("num_frames") and hasattr(self, "default_num_frames"):
            self.default_num_frames = int(sampling["num_frames"])
        self.sampling_source = source

    def resolve_sampling(self, steps=None, guidance=None, height=None, width=None, num_frames=None, **_) -> dict:
        """What :meth:`sample` uses given these arguments (``None``: the default), which were set explicitly and
        where the defaults came from: written into metadata and reports so a figure names its settings."""
        given = {"steps": steps, "guidance": guidance, "height": height, "width": width, "num_frames": num_frames}
        out = {
            "steps": steps or self.default_steps,
            "guidance": self.default_guidance if guidance is None else guidance,
            "height": height or self.default_resolution,
            "width": width or self.default_resolution,
        }
        if self.is_video:
            out["num_frames"] = num_frames or getattr(self, "default_num_frames", None)
        out["set_explicitly"] = [k for k, v in given.items() if v is not None]
        out["defaults_from"] = self.sampling_source
        return out

    def set_attention(self, backend: str = "sdpa") -> None:
        """Select the attention implementation: ``sdpa`` (PyTorch's SDPA, its own kernel choice; default), one SDPA
        kernel for the denoiser (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``) or ``xformers``
        (CUDA only)."""
        from ..attention import SDPA_BACKENDS, check_xformers, use_sdpa_backend

        if backend == "sdpa":
            return
        if backend in SDPA_BACKENDS:
            use_sdpa_backend(self.denoiser, backend, self.device)
            return
        if backend != "xformers":
            choices = ", ".join(["sdpa", *SDPA_BACKENDS, "xformers"])
            raise ModelError(f"unknown attention backend {backend!r}; choose one of {choices}")
        check_xformers(self.device)
        self.pipe.enable_xformers_memory_efficient_attention()

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.denoiser.parameters())
        return f"{type(self).__name__}(family={self.family}, source={self.source}, denoiser={n / 1e6:.1f}M params)"


def _stack_schedules(schedules: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step schedule dicts of :meth:`DiffusionModel.sde_schedule` as one dict of per-sample ``[B]`` values."""
    out: dict[str, Any] = {}
    for key, first in schedules[0].items():
        values = [s[key] for s in schedules]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack([torch.as_tensor(v).reshape(()) for v in values])
        elif any(v != first for v in values):
            raise ModelError(f"schedule value {key!r} differs between steps ({sorted(set(map(str, values)))})")
        else:
            out[key] = first
    return out


FAMILIES: dict[str, type[DiffusionModel]] = {}


def register_family(cls: type[DiffusionModel]) -> type[DiffusionModel]:
    """Class decorator that adds a family to the registry used by :func:`visalign.models.load_model`."""
    if not cls.family or not cls.pipeline_classes:
        raise TypeError(f"{cls.__name__} must set family and pipeline_classes")
    if cls.family in FAMILIES:
        raise TypeError(f"family {cls.family!r} registered twice")
    FAMILIES[cls.family] = cls
    return cls
