"""Sampler objects: a stochastic step of :mod:`visalign.sde` bound to its settings, by name.

``get_sampler("flow-sde", noise_level=0.7)`` is what ``DiffusionModel.sample(sde=...)`` and the GRPO trainer take;
``kind`` says which schedule keywords its ``step`` needs (``DiffusionModel.sde_schedule`` gives them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from .sde import Generator, Scalar, StepOutput, cps_step, dance_sde_step, ddim_step, flow_sde_step

__all__ = ["Sampler", "FlowSDE", "DanceSDE", "CPS", "DDIMEta", "SAMPLERS", "get_sampler", "available_samplers"]


@runtime_checkable
class Sampler(Protocol):
    """What :meth:`DiffusionModel.sample` and the GRPO trainer call.

    ``kind`` says which schedule keywords ``step`` takes: ``"flow"`` → ``sigma, sigma_next, sigma_max``;
    ``"ddim"`` → ``alpha_prod_t, alpha_prod_prev, prediction_type`` (``DiffusionModel.sde_schedule`` gives them).
    """

    name: ClassVar[str]
    kind: ClassVar[str]

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
        **schedule,
    ) -> StepOutput: ...


@dataclass(frozen=True)
class FlowSDE:
    """Flow-GRPO's SDE sampler (:func:`flow_sde_step`)."""

    name: ClassVar[str] = "flow-sde"
    kind: ClassVar[str] = "flow"
    noise_level: float = 0.7

    def __post_init__(self):
        if self.noise_level < 0:
            raise ValueError(f"flow-sde noise_level must be >= 0, got {self.noise_level}")

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        sigma: Scalar,
        sigma_next: Scalar,
        sigma_max: Scalar | None = None,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        return flow_sde_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            noise_level=self.noise_level,
            sigma_max=sigma_max,
            noise=noise,
            generator=generator,
            prev_sample=prev_sample,
        )


@dataclass(frozen=True)
class DanceSDE:
    """DanceGRPO's SDE sampler (:func:`dance_sde_step`). ``sigma_max`` is accepted and unused."""

    name: ClassVar[str] = "dance-sde"
    kind: ClassVar[str] = "flow"
    eta: float = 0.3

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"dance-sde eta must be >= 0, got {self.eta}")

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        sigma: Scalar,
        sigma_next: Scalar,
        sigma_max: Scalar | None = None,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        return dance_sde_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            eta=self.eta,
            noise=noise,
            generator=generator,
            prev_sample=prev_sample,
        )


@dataclass(frozen=True)
class CPS:
    """Coefficients-Preserving Sampling (:func:`cps_step`). ``sigma_max`` is accepted and unused."""

    name: ClassVar[str] = "cps"
    kind: ClassVar[str] = "flow"
    noise_level: float = 0.8

    def __post_init__(self):
        if not 0 <= self.noise_level <= 1:
            raise ValueError(f"cps noise_level must be in [0, 1], got {self.noise_level}")

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        sigma: Scalar,
        sigma_next: Scalar,
        sigma_max: Scalar | None = None,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        return cps_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            noise_level=self.noise_level,
            noise=noise,
            generator=generator,
            prev_sample=prev_sample,
        )


@dataclass(frozen=True)
class DDIMEta:
    """DDPO's DDIM-eta sampler for epsilon/v UNets (:func:`ddim_step`)."""

    name: ClassVar[str] = "ddim"
    kind: ClassVar[str] = "ddim"
    eta: float = 1.0

    def __post_init__(self):
        if not 0 <= self.eta <= 1:
            raise ValueError(f"ddim eta must be in [0, 1], got {self.eta}")

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        alpha_prod_t: Scalar,
        alpha_prod_prev: Scalar,
        prediction_type: str = "epsilon",
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        return ddim_step(
            model_output,
            sample,
            alpha_prod_t,
            alpha_prod_prev,
            eta=self.eta,
            prediction_type=prediction_type,
            noise=noise,
            generator=generator,
            prev_sample=prev_sample,
        )


SAMPLERS: dict[str, type] = {cls.name: cls for cls in (FlowSDE, DanceSDE, CPS, DDIMEta)}


def available_samplers() -> list[str]:
    """Registered sampler names, sorted."""
    return sorted(SAMPLERS)


def get_sampler(name: str, **kwargs) -> Sampler:
    """Build a registered sampler, e.g. ``get_sampler("flow-sde", noise_level=0.7)``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or an invalid setting.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available_samplers())}")
    return SAMPLERS[name](**kwargs)
