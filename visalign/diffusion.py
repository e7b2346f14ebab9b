"""The family-agnostic training view of a denoiser.

Pure tensor functions shared by every model family: noising, prediction targets and the per-sample
denoising error that the preference losses turn into log-ratios (docs/design.md: ``r = -1/2 (e_theta - e_ref)``).

Timestep convention: every family speaks the scheduler's own units, ``t in [0, T)`` with ``T`` the number
of training timesteps (1000 for all released models). For flow-matching families ``t = sigma * T``, as in
Diffusers' ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "per_sample_mse",
    "ddpm_add_noise",
    "ddpm_target",
    "flow_add_noise",
    "flow_target",
    "sample_flow_sigmas",
    "shift_sigmas",
    "expand_like",
]


def expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor ``[B]`` to broadcast against ``x`` ``[B, ...]``."""
    return values.reshape(values.shape[0], *([1] * (x.ndim - 1)))


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over every non-batch element, computed in fp32.

    Args:
        pred, target: ``[B, ...]`` any float dtype.

    Returns:
        ``[B]`` float32. This is ``e`` of Diffusion-DPO (Wallace et al. 2024, Eq. 14) with a *mean* over
        elements, so that one ``beta`` fits every latent size.
    """
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def ddpm_add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Ho et al. 2020, Eq. 4).

    Args:
        x0, noise: ``[B, ...]``; t: ``[B]`` integer-valued timesteps in ``[0, T)``;
        alphas_cumprod: ``[T]`` from the scheduler.
    """
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t.long()]
    abar = expand_like(abar, x0)
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def ddpm_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The regression target of an epsilon- or v-prediction model (v: Salimans & Ho 2022, Sec. 4)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = expand_like(alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t.long()], x0)
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * x0.float()).to(x0.dtype)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation ``x_t = (1 - sigma) x0 + sigma noise`` (Esser et al. 2024, Eq. 3).

    Args:
        sigma: ``[B]`` in ``[0, 1]``.
    """
    s = expand_like(sigma.float(), x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity target ``noise - x0`` of flow matching."""
    return noise - x0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift of SD3 (Esser et al. 2024, Eq. 23): ``s sigma / (1 + (s - 1) sigma)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_flow_sigmas(
    batch_size: int,
    *,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training sigmas for flow matching, ``[B]`` float32 in ``(0, 1)``.

    ``logit_normal`` is SD3's default density (Esser et al. 2024, Sec. 3.1); ``uniform`` draws ``U(0, 1)``.
    ``shift`` applies the resolution shift afterwards.
    """
    if scheme == "logit_normal":
        u = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        sigmas = torch.sigmoid(u)
    elif scheme == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=device)
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r}; expected 'logit_normal' or 'uniform'")
    if not math.isclose(shift, 1.0):
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas.clamp(1e-5, 1.0)
