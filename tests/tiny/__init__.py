"""Tiny real Diffusers pipelines of every family, built in code with random weights (no Hub).

``build_tiny_pipeline(name)`` returns an unsaved pipeline; ``TINY_PIPELINES`` lists the names. Each
family module exposes builders; sizes are chosen so that a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import flow, sd, video

TINY_PIPELINES: dict[str, Callable] = {
    "sd": sd.build_sd,  # SD1.5-style, epsilon-prediction
    "sd-v": sd.build_sd_v,  # SD2-style, v-prediction
    "sdxl": sd.build_sdxl,
    "sd3": flow.build_sd3,
    "sd3-no-t5": flow.build_sd3_no_t5,
    "flux": flow.build_flux,
    "wan": video.build_wan,
    "cogvideox": video.build_cogvideox,
}

# the family each tiny pipeline loads as, and whether it makes videos
FAMILY_OF = {
    "sd": "sd",
    "sd-v": "sd",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "sd3-no-t5": "sd3",
    "flux": "flux",
    "wan": "wan",
    "cogvideox": "cogvideox",
}
VIDEO = {"wan", "cogvideox"}
ONLINE_PROMPTS = ["a red circle", "a blue square", "a green triangle on the left"]  # the online trainers' tests


def build_tiny_pipeline(name: str, seed: int = 0):
    if name not in TINY_PIPELINES:
        raise KeyError(f"unknown tiny pipeline {name!r}; known: {sorted(TINY_PIPELINES)}")
    return TINY_PIPELINES[name](seed=seed)


def tiny_model(name: str = "sd", seed: int = 0):
    """A tiny pipeline of ``name`` wrapped in its visalign family (``model.source`` names it for reports)."""
    from visalign.models import FAMILIES

    model = FAMILIES[FAMILY_OF[name]](build_tiny_pipeline(name, seed=seed))
    model.source = f"tiny-{name}"
    return model


def train_moves_only_lora(task) -> None:
    """Run the shared loop on ``task`` and assert it changed LoRA weights only (and some of them) and exported."""
    from trainers.base import Trainer

    denoiser = task.model.denoiser
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_" in n}
    Trainer(task).train()
    after = dict(denoiser.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items()), "a base weight changed"
    assert any(not torch.equal(after[n], v) for n, v in lora.items()), "no LoRA weight changed"
    assert (Path(task.config.output_dir) / "final" / "pytorch_lora_weights.safetensors").exists()


def write_image_pairs(folder, n: int, prompts: list[str], size: int = 32) -> Path:
    """``n`` random image pairs (prompts cycled) written as a preference dataset folder (``pairs.jsonl``)."""
    from visalign.data import PreferenceWriter

    writer = PreferenceWriter(folder)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        writer.append(prompts[i % len(prompts)], torch.rand(3, size, size, generator=g),
                      torch.rand(3, size, size, generator=g))  # fmt: skip
    return Path(folder)
