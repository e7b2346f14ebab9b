"""Stochastic sampling steps that return log-probabilities, for online RL on diffusion and flow models.

Every step is one Gaussian transition ``x' ~ N(mean, std^2 I)`` built from the denoiser's output at the
current sample. The functions are stateless (the caller passes the schedule values ``sigma, sigma'`` or
``abar_t, abar_prev`` explicitly), compute in float32 whatever the input dtype (bf16 log-probs at rollout
and at training time otherwise disagree), and return a :class:`StepOutput`. The sampler objects that bind a
step to its settings (what ``DiffusionModel.sample(sde=...)`` and GRPO take) are in :mod:`visalign.samplers`.

======================  ==========  =================================================================
sampler                 kind        source
======================  ==========  =================================================================
``flow-sde``            flow        Flow-GRPO (Liu et al. 2025), SDE with the ODE's marginals
``dance-sde``           flow        DanceGRPO (Xue et al. 2025)
``cps``                 flow        Coefficients-Preserving Sampling (Wang & Yu 2025)
``ddim``                ddim        DDIM-eta (Song et al. 2021) as used by DDPO (Black et al. 2024)
======================  ==========  =================================================================

Conventions shared by every step:

* ``log_prob`` is the exact Gaussian log-density **averaged** (not summed) over all non-batch elements,
  as in flow_grpo and ddpo-pytorch, so its scale does not depend on the latent size.
* The log-prob treats ``prev_sample`` as a constant (it is detached): gradients flow only through ``mean``
  (and ``std``), which is what the policy-gradient ratio ``exp(logp - logp_old)`` needs.
* Passing ``prev_sample`` skips sampling and scores that given sample: this is how GRPO recomputes the
  log-prob of a stored rollout transition under the current policy (a ``generator`` is then left unused).
* Where ``std == 0`` (DDIM with ``eta=0``, CPS with ``noise_level=0`` or at ``sigma'=0``) the transition is
  deterministic and the density is undefined; ``log_prob`` is then **0** for those samples, so such a step
  adds nothing to a log-ratio (its ratio is exactly 1) and gradients stay finite.
* ``std`` is always shaped ``[B, 1, ..., 1]`` (broadcastable to the sample). ``noise_scale`` is the std that
  the GRPO KL term divides by (flow_grpo: the SDE's ``sigma_t`` *without* the ``sqrt(-dt)`` factor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "StepOutput",
    "gaussian_log_prob",
    "kl_to_reference",
    "flow_sde_step",
    "dance_sde_step",
    "cps_step",
    "ddim_step",
]

Generator = torch.Generator | Sequence[torch.Generator] | None
Scalar = float | torch.Tensor

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


@dataclass
class StepOutput:
    """One stochastic sampling step.

    Attributes:
        prev_sample: ``[B, ...]`` float32, the next (less noisy) sample ``x'``.
        log_prob: ``[B]`` float32, ``log N(x'; mean, std^2)`` averaged over every non-batch element
            (0 where ``std == 0``).
        mean: ``[B, ...]`` float32, the mean of the transition Gaussian (carries gradients of the model output).
        std: ``[B, 1, ..., 1]`` float32, the std of the transition Gaussian (for Flow-SDE it includes the
            ``sqrt(-dt)`` factor; for Dance-SDE the ``sqrt(|dsigma|)`` factor).
        noise_scale: ``[B, 1, ..., 1]`` float32, the std used by GRPO's KL term
            ``||mean - mean_ref||^2 / (2 noise_scale^2)``: Flow-SDE ``a sqrt(sigma / (1 - sigma))`` and
            Dance-SDE ``eta`` (both without the ``sqrt(-dt)`` factor, as flow_grpo); equal to ``std`` for
            CPS and DDIM, whose std has no such factor. Defaults to ``std``.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    noise_scale: torch.Tensor | None = None

    def __post_init__(self):
        if self.noise_scale is None:
            self.noise_scale = self.std


# ----------------------------------------------------------------------------- helpers
def _per_sample(value: Scalar, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float, 0-dim, ``[B]`` or ``[B, 1, ..., 1]`` value as a float32 tensor broadcastable to ``like``.

    Scalars come back as ``[1, ..., 1]``, per-sample values as ``[B, 1, ..., 1]``; gradients are kept.
    """
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    batch = like.shape[0]
    if t.ndim == 0:
        return t.reshape([1] * like.ndim)
    if t.ndim == 1 and t.shape[0] in (1, batch):
        return t.reshape(-1, *([1] * (like.ndim - 1)))
    if t.ndim == like.ndim and t.shape[0] in (1, batch):
        try:
            torch.broadcast_shapes(t.shape, like.shape)
            return t
        except RuntimeError:
            pass
    raise ValueError(
        f"{name} must be a float, a 0-dim tensor or a per-sample tensor of shape [{batch}] "
        f"(or broadcastable to the sample {tuple(like.shape)}); got shape {tuple(t.shape)}"
    )


def _batch_std(std: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expand a scalar or per-sample std to exactly ``[B, 1, ..., 1]`` (what ``SampleOutput.stds`` reads)."""
    return std.expand(like.shape[0], *([1] * (like.ndim - 1))).contiguous()


def _check_same_shape(ref: torch.Tensor, name: str, other: torch.Tensor | None, ref_name: str) -> None:
    if other is not None and other.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _draw_noise(shape: torch.Size, generator: Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on each generator's own device (as Diffusers' ``randn_tensor``)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per sample")
    one = (1, *shape[1:])
    draws = [torch.randn(one, generator=g, device=g.device, dtype=torch.float32).to(device) for g in generators]
    return torch.cat(draws)


def _gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    noise: torch.Tensor | None,
    generator: Generator,
    prev_sample: torch.Tensor | None,
    noise_scale: torch.Tensor | None = None,
) -> StepOutput:
    """Sample ``x' = mean + std z`` (or take the given ``prev_sample``) and score it."""
    if prev_sample is not None and noise is not None:
        raise ValueError("pass either prev_sample (to score a stored transition) or noise, not both")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    _check_same_shape(mean, "noise", noise, "the sample")
    _check_same_shape(mean, "prev_sample", prev_sample, "the sample")
    std = _batch_std(std, mean)
    if prev_sample is None:
        z = noise.to(device=mean.device, dtype=torch.float32) if noise is not None else None
        if z is None:
            z = _draw_noise(mean.shape, generator, mean.device)
        prev_sample = mean + std * z
    else:
        prev_sample = prev_sample.to(device=mean.device, dtype=torch.float32)
    # The action is a constant of the policy-gradient estimator: only mean/std carry gradients.
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    if noise_scale is not None:
        noise_scale = _batch_std(noise_scale, mean)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, noise_scale=noise_scale)


# ----------------------------------------------------------------------------- densities
def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: Scalar) -> torch.Tensor:
    """Per-sample Gaussian log-density ``log N(x; mean, std^2)`` averaged over the non-batch elements.

    This is the per-step policy log-likelihood of DDPO (Black et al. 2024, Sec. 4.2) and Flow-GRPO, with a
    mean instead of a sum over elements as in their reference code.

    Args:
        x, mean: ``[B, ...]`` any float dtype (computed in float32).
        std: float, 0-dim, ``[B]`` or a tensor broadcastable to ``x`` (e.g. ``[B, 1, 1, 1]``); ``>= 0``.

    Returns:
        ``[B]`` float32. Elements with ``std == 0`` contribute 0 (the density of a deterministic step is
        undefined; 0 keeps log-ratios and gradients finite).
    """
    x, mean = x.float(), mean.float()
    std = _per_sample(std, mean, "std")
    positive = std > 0
    # A where() on the output alone would still back-propagate NaN from 1/0: sanitise the std first.
    safe = torch.where(positive, std, torch.ones_like(std))
    # Same expression as torch.distributions.Normal.log_prob.
    log_prob = -((x - mean) ** 2) / (2 * safe**2) - safe.log() - _LOG_SQRT_2PI
    log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob))
    return log_prob.flatten(1).mean(dim=1)


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: Scalar) -> torch.Tensor:
    """KL between two Gaussian steps with a shared std: ``mean(||mu - mu_ref||^2) / (2 std^2)`` per sample.

    The GRPO regulariser of Flow-GRPO (Liu et al. 2025, the KL term of its objective), with the mean over
    elements of its reference code. Pass ``StepOutput.noise_scale`` as ``std`` to follow flow_grpo (the SDE's
    ``sigma_t`` without ``sqrt(-dt)``), or ``StepOutput.std`` for the exact per-step KL.

    Args:
        mean, mean_ref: ``[B, ...]`` transition means of the policy and of the reference (LoRA disabled).
        std: float, 0-dim, ``[B]`` or broadcastable to ``mean``; must be ``> 0`` (0 gives ``inf``/``nan``).

    Returns:
        ``[B]`` float32, ``>= 0``.
    """
    mean, mean_ref = mean.float(), mean_ref.float()
    std = _per_sample(std, mean, "std")
    return ((mean - mean_ref) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------- flow-matching steps
def flow_sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    noise_level: float = 0.7,
    sigma_max: Scalar | None = None,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO's SDE step (Liu et al. 2025, arXiv:2505.05470): Euler–Maruyama on its ODE-to-SDE conversion.

    With ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity ``v = eps - x0`` and ``dt = sigma' - sigma < 0``,
    the SDE ``dx = [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt + s dw`` has the ODE's marginals. Its step:

        s    = a sqrt(sigma / (1 - min(sigma, sigma_max)))   (sigma_max: the second sigma, for the first step)
        mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
        x'   = mean + s sqrt(-dt) z,  z ~ N(0, I)

    With ``a = 0`` the mean is exactly the Euler step ``x + v dt``.

    Args:
        velocity: ``[B, ...]`` the flow model's output ``v`` at ``sample`` (any float dtype).
        sample: ``[B, ...]`` the current sample ``x_sigma``.
        sigma, sigma_next: current and next sigma in ``[0, 1]``, ``sigma_next < sigma``: floats, 0-dim or ``[B]``.
        noise_level: ``a >= 0`` (0.7 in Flow-GRPO).
        sigma_max: caps ``sigma`` in ``1 - sigma``, for the first step at (or just below) ``sigma = 1``
            (Flow-GRPO uses the scheduler's ``sigmas[1]``); required when some ``sigma > 0.999``.
        noise: ``[B, ...]`` the standard normal ``z`` to use (else drawn with ``generator``).
        generator: a ``torch.Generator`` or one per sample.
        prev_sample: ``[B, ...]`` a given ``x'`` to score instead of sampling.

    Returns:
        :class:`StepOutput` with ``std = s sqrt(-dt)`` and ``noise_scale = s``, both ``[B, 1, ..., 1]``.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    _check_same_shape(sample, "velocity", velocity, "sample")
    x, v = sample.float(), velocity.float()
    sigma = _per_sample(sigma, x, "sigma")
    sigma_next = _per_sample(sigma_next, x, "sigma_next")
    if sigma_max is None:
        if bool((sigma > 0.999).any()):
            raise ValueError("sigma near 1 makes sqrt(sigma / (1 - sigma)) explode: pass sigma_max (e.g. sigmas[1])")
        denom_sigma = sigma
    else:
        # sigma above sigma_max is the first step: some schedulers start just below 1 (UniPC's flow sigmas at
        # 1 - 1e-6, Wan's default), where 1 - sigma would blow the noise up by a thousand times
        denom_sigma = torch.minimum(sigma, _per_sample(sigma_max, x, "sigma_max"))
    dt = sigma_next - sigma
    s = noise_level * torch.sqrt(sigma / (1 - denom_sigma))
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    return _gaussian_step(mean, std, noise=noise, generator=generator, prev_sample=prev_sample, noise_scale=s)


def dance_sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    eta: float = 0.3,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """DanceGRPO's SDE step (Xue et al. 2025, arXiv:2505.07818; its reverse SDE with score from ``x0_hat``).

    With ``dsigma = sigma' - sigma < 0``, ``x0_hat = x - sigma v`` and the score of the Gaussian path
    ``score = -(x - (1 - sigma) x0_hat) / sigma^2``:

        mean = x + dsigma v - (eta^2 / 2) score dsigma
        x'   = mean + eta sqrt(|dsigma|) z

    With ``eta = 0`` the mean is the Euler step and the step is deterministic (``log_prob`` 0).

    Args:
        velocity, sample: ``[B, ...]`` as in :func:`flow_sde_step`.
        sigma, sigma_next: current and next sigma (``sigma > 0``): floats, 0-dim or ``[B]``.
        eta: noise strength ``>= 0`` (0.3 in DanceGRPO).
        noise, generator, prev_sample: as in :func:`flow_sde_step`.

    Returns:
        :class:`StepOutput` with ``std = eta sqrt(|dsigma|)`` and ``noise_scale = eta``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    _check_same_shape(sample, "velocity", velocity, "sample")
    x, v = sample.float(), velocity.float()
    sigma = _per_sample(sigma, x, "sigma")
    sigma_next = _per_sample(sigma_next, x, "sigma_next")
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = eta * torch.sqrt(dsigma.abs())
    scale = torch.full_like(std, float(eta))
    return _gaussian_step(mean, std, noise=noise, generator=generator, prev_sample=prev_sample, noise_scale=scale)


def cps_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    noise_level: float = 0.8,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Coefficients-Preserving Sampling (Wang & Yu 2025, arXiv:2509.05952), the DDIM-style CPS update.

    The next sample keeps the flow path's coefficients exactly: ``x'`` has ``(1 - sigma')`` of the predicted
    clean sample and a total noise weight of ``sigma'`` (split between the predicted and fresh noise), so no
    excess noise is injected:

        x0_hat  = x - sigma v                     (predicted clean sample)
        eps_hat = x + (1 - sigma) v               (predicted noise)
        std     = sigma' sin(eta pi / 2)
        mean    = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat
        x'      = mean + std z

    With ``eta = 0`` the mean is exactly the Euler step ``x + (sigma' - sigma) v`` and the step is
    deterministic; at ``sigma' = 0`` (the last step) ``std = 0`` too. Formula as in the authors' code
    (IamCreateAI/FlowCPS, ``sde_type == "cps"`` in flow_grpo); unlike that code, whose log-prob drops the
    Gaussian normalisation (``-||x' - mean||^2``), ``log_prob`` here is the exact Gaussian log-density.

    Args:
        velocity, sample: ``[B, ...]`` as in :func:`flow_sde_step`.
        sigma, sigma_next: current and next sigma in ``[0, 1]``: floats, 0-dim or ``[B]``.
        noise_level: ``eta`` in ``[0, 1]``; 1 replaces the whole noise component with fresh noise
            (0.8 in the flow_grpo CPS configs).
        noise, generator, prev_sample: as in :func:`flow_sde_step`.

    Returns:
        :class:`StepOutput` with ``std = noise_scale = sigma' sin(eta pi / 2)``.
    """
    if not 0 <= noise_level <= 1:
        raise ValueError(f"CPS noise_level must be in [0, 1], got {noise_level}")
    _check_same_shape(sample, "velocity", velocity, "sample")
    x, v = sample.float(), velocity.float()
    sigma = _per_sample(sigma, x, "sigma")
    sigma_next = _per_sample(sigma_next, x, "sigma_next")
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    # clamp: sigma'^2 - (sigma' sin)^2 is >= 0 in exact arithmetic; guard the rounding at noise_level = 1.
    mean = (1 - sigma_next) * x0_hat + (sigma_next**2 - std**2).clamp_min(0).sqrt() * eps_hat
    return _gaussian_step(mean, std, noise=noise, generator=generator, prev_sample=prev_sample)


# ----------------------------------------------------------------------------- DDIM (eps / v models)
def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: Scalar,
    alpha_prod_prev: Scalar,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """DDIM-eta step with its log-prob, as DDPO (Black et al. 2024, Sec. 4.2; ddpo-pytorch) uses it.

    DDIM (Song et al. 2021), Eq. 12 for the update and Eq. 16 for the variance, with ``a = abar``:

        x0_hat  = (x - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
        std     = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))
        mean    = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps_hat
        x'      = mean + std z

    For ``v_prediction`` (Salimans & Ho 2022): ``x0_hat = sqrt(a_t) x - sqrt(1 - a_t) v`` and
    ``eps_hat = sqrt(a_t) v + sqrt(1 - a_t) x``. No clipping or thresholding of ``x0_hat`` (the released
    SD/SDXL scheduler configs set ``clip_sample=False``); with that, ``mean`` equals the output of Diffusers'
    ``DDIMScheduler.step`` for the same ``eta`` with zero variance noise, and ``eta = 0`` is plain DDIM
    (``std = 0``, ``log_prob`` 0).

    Args:
        model_output: ``[B, ...]`` the UNet's epsilon, v or x0 prediction (any float dtype).
        sample: ``[B, ...]`` the current ``x_t``.
        alpha_prod_t, alpha_prod_prev: ``abar`` at the current and the previous (less noisy) timestep,
            ``abar_prev >= abar_t``; floats, 0-dim or ``[B]`` (Diffusers: ``alphas_cumprod[t]`` and
            ``alphas_cumprod[t - T // steps]`` or ``final_alpha_cumprod``).
        eta: in ``[0, 1]``; 1 (DDPO) is the DDPM posterior variance, 0 deterministic DDIM.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        noise, generator, prev_sample: as in :func:`flow_sde_step`.

    Returns:
        :class:`StepOutput` with ``std = noise_scale`` of shape ``[B, 1, ..., 1]``.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    _check_same_shape(sample, "model_output", model_output, "sample")
    x, out = sample.float(), model_output.float()
    alpha_prod_t = _per_sample(alpha_prod_t, x, "alpha_prod_t")
    alpha_prod_prev = _per_sample(alpha_prod_prev, x, "alpha_prod_prev")
    beta_prod_t = 1 - alpha_prod_t
    # Same operation order as DDIMScheduler.step, so eta = 0 reproduces it to the last bit.
    if prediction_type == "epsilon":
        x0_hat = (x - beta_prod_t ** (0.5) * out) / alpha_prod_t ** (0.5)
        eps_hat = out
    elif prediction_type == "v_prediction":
        x0_hat = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * out
        eps_hat = (alpha_prod_t**0.5) * out + (beta_prod_t**0.5) * x
    elif prediction_type == "sample":
        x0_hat = out
        eps_hat = (x - alpha_prod_t ** (0.5) * x0_hat) / beta_prod_t ** (0.5)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")
    beta_prod_prev = 1 - alpha_prod_prev
    variance = (beta_prod_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std = eta * variance ** (0.5)
    # clamp: at eta = 1 the coefficient is exactly 0 when abar_t = 0 (zero-terminal-SNR schedules, e.g.
    # CogVideoX), and rounding would otherwise make it a NaN; it leaves every positive value unchanged.
    direction = (1 - alpha_prod_prev - std**2).clamp_min(0) ** (0.5) * eps_hat
    mean = alpha_prod_prev ** (0.5) * x0_hat + direction
    return _gaussian_step(mean, std, noise=noise, generator=generator, prev_sample=prev_sample)
