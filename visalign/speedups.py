"""Speed levers for the denoiser, each one switch: regional ``torch.compile`` and the channels-last layout.

The trainers turn them on from their options (``trainers/speed.py``); the benchmarks measure each one alone.
"""

from __future__ import annotations

import torch

from .errors import ModelError

RECOMPILE_LIMIT = 64  # per block: shapes per resolution level x grad / no-grad x LoRA on / off (the reference)


def repeated_block_names(denoiser: torch.nn.Module) -> list[str]:
    """Class names of the denoiser's repeated blocks: Diffusers' ``_repeated_blocks`` where the model defines them
    (UNet2DConditionModel, Flux, Wan), else its ``_no_split_modules`` (SD3's JointTransformerBlock, CogVideoXBlock)."""
    names = getattr(denoiser, "_repeated_blocks", None) or getattr(denoiser, "_no_split_modules", None)
    if not names:
        raise ModelError(f"{type(denoiser).__name__} names no repeated blocks to compile")
    return list(names)


def compile_repeated_blocks(denoiser: torch.nn.Module, **compile_kwargs) -> int:
    """Regional compilation: ``torch.compile`` each repeated block in place (blocks of one class share the compiled
    code), not the whole denoiser: seconds of compile instead of minutes, the same steady-state speed. Call it
    after the LoRA is added. Returns the number of blocks compiled."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    names = set(repeated_block_names(denoiser))
    blocks = [m for m in denoiser.modules() if type(m).__name__ in names]
    if not blocks:
        raise ModelError(f"{type(denoiser).__name__} holds none of its repeated blocks {sorted(names)}")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def to_channels_last(denoiser: torch.nn.Module) -> int:
    """Put a UNet's 4-D convolution weights in the channels-last layout (cuDNN's fastest for convolutions under
    bf16/fp16; activations follow the weights). Returns the number of tensors converted."""
    if not type(denoiser).__name__.startswith("UNet2D"):
        raise ModelError(f"channels_last is for UNet denoisers (sd, sdxl), not {type(denoiser).__name__}")
    denoiser.to(memory_format=torch.channels_last)
    return sum(p.ndim == 4 for p in denoiser.parameters())
