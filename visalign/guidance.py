"""Flow-NRG: noisy-latent reward guidance at inference, with per-reward weights (images and videos; no training).

At every sampling step the denoiser's (CFG-guided) output gives the clean estimate ``x0_hat(x_t)``; the rewards
score ``decode(x0_hat)`` and the gradient of their weighted sum with respect to the noisy latent,

    g = grad_{x_t} sum_k w_k R_k(decode(x0_hat(x_t)), prompts)      (the denoiser's output held fixed),

is added to the step, so each step moves the sample toward higher reward:

* flow families (SD3, FLUX, Wan): ``v' = v - g``. The Euler step ``x' = x + (sigma' - sigma) v`` then gains
  ``(sigma - sigma') g``: Flow-NRG's "add w * grad R to the velocity", with the sign that raises the reward
  along the sampler's direction of travel (``x0_hat = x_t - sigma v``, so ``d x0_hat / d x_t = 1``).
* DDIM families (SD1.5, SDXL, CogVideoX): classifier guidance on the noise estimate (Dhariwal & Nichol 2021),
  ``eps' = eps - sqrt(1 - abar_t) g``; for v-prediction the same change expressed in v
  (``v' = v - sqrt(1 - abar_t) / sqrt(abar_t) g``), skipped where ``abar_t < 1e-3`` (no signal to steer).

Holding the denoiser fixed makes a step cost one VAE decode and one reward backward, not a backward through the
denoiser. Rewards must be differentiable (``reward.spec.differentiable``: CLIP score, PickScore, HPS, aesthetic,
...); video rewards get the decoded video, image rewards every frame (:mod:`reward_models.video`).

``RewardGuidance`` is the ``output_hook`` of :meth:`visalign.models.DiffusionModel.sample`; :class:`GuidedView`
turns it on as a named variant (``visalign generate --guide``, ``visalign evaluate --guide``: the rewards are built
by :func:`apps.generate.guidance_rewards`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ConfigError

MIN_ALPHA_PROD = 1e-3  # DDIM v-prediction: below this abar_t the v-space step would divide by ~0


class RewardGuidance:
    """Reward guidance for one batch of prompts; pass as ``output_hook`` to ``model.sample``.

    Args:
        rewards: ``(label, reward, weight)`` triples; ``reward(media, prompts) -> RewardOutput`` differentiable.
        prompts: the batch's prompts (one per sample), as the rewards need them.
        start, end: guide only steps with ``start <= index / steps < end`` (default every step).

    Attributes:
        history: per guided step ``{"index", "t", label: mean reward of the batch's x0_hat, ...}``.
    """

    def __init__(self, rewards: Sequence[tuple[str, object, float]], prompts: list[str], start=0.0, end=1.0):
        if not rewards:
            raise ConfigError("reward guidance needs at least one reward")
        for label, reward, weight in rewards:
            spec = getattr(reward, "spec", None)
            if spec is not None and not spec.differentiable:
                raise ConfigError(f"reward guidance needs differentiable rewards; {label!r} is not (pick another)")
            if not isinstance(weight, (int, float)) or weight != weight:
                raise ConfigError(f"guidance weight of {label!r} must be a number, got {weight!r}")
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(f"guidance window must satisfy 0 <= start < end <= 1, got [{start}, {end})")
        self.rewards = list(rewards)
        self.prompts = list(prompts)
        self.start, self.end = start, end
        self.history: list[dict] = []

    def __call__(self, model, scheduler, index: int, latents: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        steps = len(scheduler.timesteps)
        if not self.start <= index / steps < self.end:
            return out
        schedule = model.sde_schedule(scheduler, index)
        if model.is_flow:
            sigma = schedule["sigma"]
            gain = None
        else:
            abar = schedule["alpha_prod_t"].float()
            kind = schedule["prediction_type"]
            if kind == "v_prediction" and abar < MIN_ALPHA_PROD:
                return out
            gain = (1 - abar).sqrt() / (abar.sqrt() if kind == "v_prediction" else 1.0)
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            fixed = out.detach().float()
            if model.is_flow:
                x0 = x - sigma * fixed
            elif kind == "v_prediction":
                x0 = abar.sqrt() * x - (1 - abar).sqrt() * fixed
            else:
                x0 = (x - (1 - abar).sqrt() * fixed) / abar.sqrt()
            media = model.decode(x0.to(latents.dtype))
            total, record = 0.0, {"index": index, "t": float(scheduler.timesteps[index])}
            for label, reward, weight in self.rewards:
                scores = reward(media, self.prompts).scores.float()
                record[label] = float(scores.detach().mean())
                total = total + weight * scores.sum()
            (grad,) = torch.autograd.grad(total, x)
        self.history.append(record)
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"reward guidance: non-finite gradient at step {index} (t = {record['t']:g})")
        shift = grad if gain is None else gain * grad
        return (out.float() - shift).to(out.dtype)


class GuidedView:
    """A :class:`~visalign.models.DiffusionModel` whose ``set_adapters(name)`` turns reward guidance on.

    Every attribute not defined here is the wrapped model's, so the view goes wherever a model samples
    (:func:`visalign.evaluation.generate`, :func:`~visalign.evaluation.evaluate_variants`). Any other adapter
    name (or ``None``) turns guidance off and goes to the model.

    Args:
        model: the model.
        rewards: ``(label, reward, weight)`` triples (see :class:`RewardGuidance`).
        name: the variant name that turns guidance on.
        start, end: the guided fraction of the steps.

    Attributes:
        last: the :class:`RewardGuidance` of the last guided sampling run (its ``history``).
    """

    def __init__(self, model, rewards, name: str = "nrg", start: float = 0.0, end: float = 1.0):
        RewardGuidance(rewards, [], start, end)  # check the rewards, weights and window now
        self.model = model
        self.rewards = list(rewards)
        self.name = name
        self.window = (start, end)
        self.on = True
        self.last: RewardGuidance | None = None

    def __getattr__(self, name: str):  # only reached for names the view does not define
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def set_adapters(self, names, weights=None) -> None:
        self.on = names == self.name
        if not self.on:
            self.model.set_adapters(names, weights)
        elif self.model.adapter_names:  # guidance samples the base weights (peft refuses to disable nothing)
            self.model.set_adapters(None)

    def sample(self, prompts, **kw):
        if not self.on:
            return self.model.sample(prompts, **kw)
        if kw.pop("output_hook", None) is not None or kw.get("sde") is not None:
            raise ConfigError("reward-guided sampling sets the output hook itself and samples deterministically")
        self.last = RewardGuidance(self.rewards, list(prompts), *self.window)
        return self.model.sample(prompts, output_hook=self.last, **kw)
