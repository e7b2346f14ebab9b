"""Two tiny timestep-segment experts (early / late) and their preference data, shared by the tests that need them."""

from __future__ import annotations

import torch

PROMPTS = ["a red circle on the left", "a blue square"]
INTERVALS = ["500:1000", "0:500"]  # early (high noise) then late


def write_pairs(path, seed):
    """Four random 32x32 pairs in the preference-data schema."""
    from visalign.data import PreferenceWriter

    writer = PreferenceWriter(path)
    g = torch.Generator().manual_seed(seed)
    for i in range(4):
        writer.append(PROMPTS[i % 2], torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g))
    return path


def segment_args(model_dir, data, out, **kw):
    """``TimestepSegmentConfig`` values: two experts, two steps each, on the tiny pipeline at 32 px."""
    values = dict(model=str(model_dir), data=list(data), intervals=list(INTERVALS), expert_names=["early", "late"],
                  output_dir=str(out), max_steps=2, batch_size=2, learning_rate=5e-2, lora_rank=4, resolution=32,
                  report_to="none", progress=False, cache_dir=str(out.parent / "cache"), lr_scheduler="constant",
                  checkpoint_every=1)  # fmt: skip
    values.update(kw)
    return values


def cli_args(values):
    """``--key value ...`` for ``visalign train``."""
    args = []
    for key, value in values.items():
        args += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return args
