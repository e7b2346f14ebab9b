"""MaPO: margin-aware preference optimisation, reference-free (Hong et al. 2024, "Margin-aware Preference
Optimization for Aligning Diffusion Models without Reference").

``loss = e_w - beta * log sigma(T (f(e_w) - f(e_l)))`` with ``f(e) = s e / (e^{s e} - 1)`` on the per-sample
errors of winner and loser (shared noise and timestep); ``beta = 0.1``, ``s = 0.5``, ``T = 1000`` as the official
mapo-t2i code. There is no reference model and no reference forward pass: the loop is Diffusion-DPO's with the
``mapo`` loss of :mod:`visalign.losses`, which takes the errors directly. ``f`` decreases, so lowering the
winner's error relative to the loser's widens the margin and lowers the loss (one public port flips this sign).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from visalign.config import field
from visalign.errors import ConfigError


@dataclass
class MaPOConfig(DiffusionDPOConfig):
    loss: str = field("mapo", help="'mapo' (reference-free); other losses belong to diffusion-dpo")
    beta: float = field(0.1, help="weight of the margin term (MaPO's beta, 0.1 in the paper's code)")

    def __post_init__(self):
        super().__post_init__()
        if self.loss != "mapo":
            raise ConfigError(
                f"train mapo uses the 'mapo' loss, got {self.loss!r}; use train diffusion-dpo for others"
            )


class MaPO(DiffusionDPO):
    """MaPO task: Diffusion-DPO's data, timesteps and export, without a reference forward."""

    def __init__(self, config: MaPOConfig, model=None):
        super().__init__(config, model)
        assert not self.needs_reference
