"""The speed options every diffusion trainer shares (:class:`SpeedOptions`) and the one place they are applied.

A trainer's config extends :class:`SpeedOptions`; its task calls :func:`apply_speed_options` once, after the LoRA
and gradient checkpointing are set up. The attention kernel is the ``attention`` option (``sdpa-flash`` ...,
applied when the model loads) and fused AdamW the loop's ``fused_adam``.
"""

from __future__ import annotations

from dataclasses import dataclass

from visalign.config import field
from visalign.errors import ConfigError

ATTENTION_HELP = (
    "attention: sdpa (PyTorch picks the kernel), one SDPA kernel for the denoiser (sdpa-flash, sdpa-efficient, "
    "sdpa-cudnn, sdpa-math) or xformers"
)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class SpeedOptions:
    compile: bool = field(False, help="torch.compile the denoiser's repeated blocks (regional compilation)")
    compile_mode: str = field("default", help=f"torch.compile mode with --compile: {', '.join(COMPILE_MODES)}")
    channels_last: bool = field(False, help="channels-last memory format for UNet denoisers (sd, sdxl)")

    def __post_init__(self):
        super().__post_init__()
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")


def apply_speed_options(model, config: SpeedOptions) -> None:
    """Turn on the levers ``config`` asks for on ``model``'s denoiser (in place)."""
    from visalign.errors import ModelError
    from visalign.speedups import compile_repeated_blocks, to_channels_last

    try:
        if config.channels_last:
            to_channels_last(model.denoiser)
        if config.compile:
            mode = None if config.compile_mode == "default" else config.compile_mode
            compile_repeated_blocks(model.denoiser, mode=mode)
    except ModelError as e:
        raise ConfigError(f"{model.family}: {e}") from e
