"""``visalign generate``: sample images or videos from a pipeline (optionally with a LoRA), with metadata.

Every sample has its own seed (``seed + index``), so any single output can be regenerated alone, whatever the
batch size. Outputs: ``OUT/00000.png`` (or ``.mp4``/``.gif``), ``OUT/metadata.jsonl``, ``OUT/config.yaml``.
With ``--experts MANIFEST`` (timestep-segment experts) the expert of each step's interval is switched on before
the step; ``--skip_stride K`` thins the steps above the lowest expert's interval (or ``--skip_above T``) to every
K-th one, and the metadata records the function evaluations per sample (``nfe``). ``--guide SPEC ...`` steers
every step toward higher reward (Flow-NRG, :mod:`visalign.guidance`) with ``--guide_weight`` per reward.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visalign.config import field, save_config
from visalign.errors import ConfigError
from visalign.evaluation import generate, read_prompts


@dataclass
class GenerateConfig:
    model: str = field(help="Diffusers pipeline: hub id or local folder (e.g. assets/toyworld/toy-sd)")
    prompts: str = field(help="a prompt, or a file: .txt (one per line) or .jsonl (a 'prompt' field per row)")
    out: str = field(help="output folder")
    lora: str | None = field(None, help="LoRA folder or .safetensors (Diffusers format) to apply")
    experts: str | None = field(None, help="timestep-segment experts: experts.json (or its folder), switched per step")
    skip_stride: int = field(1, help="with --experts: keep every K-th step above --skip_above (1: no skipping)")
    skip_above: float | None = field(None, help="timestep where skipping starts (default: top of the lowest interval)")
    guide: list[str] = field([], help="reward guidance (Flow-NRG): differentiable reward specs steering each step")
    guide_weight: list[float] = field([1.0], help="weight of each --guide reward (one for all, or one per reward)")
    guide_end: float = field(1.0, help="guide the first fraction of the steps only (1: every step)")
    seed: int = field(0, help="seed of the first sample; sample i uses seed + i")
    num_per_prompt: int = field(1, help="samples per prompt")
    steps: int | None = field(None, help="sampling steps (default: the model's toyworld.json, else the family's)")
    guidance: float | None = field(None, help="guidance scale (default: the model's toyworld.json, else the family's)")
    negative_prompt: str | None = field(None, help="negative prompt for classifier-free guidance")
    height: int | None = field(None, help="height in pixels (default: the family's)")
    width: int | None = field(None, help="width in pixels (default: the family's)")
    num_frames: int | None = field(None, help="frames per video (video families)")
    batch_size: int = field(4, help="samples per forward batch")
    video_format: Literal["mp4", "gif"] = field("mp4", help="container for videos")
    fps: int = field(8, help="frames per second of saved videos")
    device: str = field("auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    dtype: Literal["fp32", "fp16", "bf16"] = field("fp32", help="weights dtype")
    attention: Literal["sdpa", "xformers"] = field("sdpa", help="attention backend (xformers needs CUDA)")

    def __post_init__(self):
        if self.num_per_prompt < 1:
            raise ConfigError(f"num_per_prompt must be >= 1, got {self.num_per_prompt}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.lora and self.experts:
            raise ConfigError("pass --lora or --experts, not both")
        if self.guide and self.experts:
            raise ConfigError("pass --guide or --experts, not both")
        if self.skip_stride < 1:
            raise ConfigError(f"skip_stride must be >= 1, got {self.skip_stride}")
        if (self.skip_stride > 1 or self.skip_above is not None) and not self.experts:
            raise ConfigError("--skip_stride / --skip_above skip early steps of the experts' path: pass --experts")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{name} must be a positive multiple of 8, got {value}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return device


def guidance_rewards(specs: Sequence[str], weights: Sequence[float], device=None) -> list[tuple]:
    """``(label, reward, weight)`` triples from reward specs and one weight per spec (or one for all)."""
    from reward_models import build_reward
    from visalign.guidance import RewardGuidance

    if len(weights) not in (1, len(specs)):
        raise ConfigError(f"give one --guide_weight for all rewards or one per reward; got {len(weights)} for "
                          f"{len(specs)} rewards")  # fmt: skip
    weights = list(weights) * len(specs) if len(weights) == 1 else list(weights)
    out = []
    for spec, weight in zip(specs, weights):
        reward = build_reward(spec, device=device)
        out.append((spec, reward, float(weight)))
    RewardGuidance(out, [])  # differentiable rewards, numeric weights
    return out


def run(cfg: GenerateConfig) -> Path:
    from visalign.media import save_image, save_video
    from visalign.models import load_model
    from visalign.models.lora import lora_file

    prompts = read_prompts(cfg.prompts)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if cfg.lora:
        lora_file(cfg.lora)  # a clear error before the model loads
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype, attention=cfg.attention)
    if cfg.lora:
        model.load_lora(cfg.lora)
    if cfg.experts:
        from visalign.experts import ExpertsView, SwitchPlan, load_experts

        plan = SwitchPlan(stride=cfg.skip_stride, skip_above=cfg.skip_above)
        model = ExpertsView(model, load_experts(model, cfg.experts), {"experts": plan})
    if cfg.guide:
        from visalign.guidance import GuidedView

        model = GuidedView(model, guidance_rewards(cfg.guide, cfg.guide_weight, device), end=cfg.guide_end)
    expanded = [p for p in prompts for _ in range(cfg.num_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(expanded))]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rows = []
    sampling = model.resolve_sampling(steps=cfg.steps, guidance=cfg.guidance, height=cfg.height, width=cfg.width,
                                      num_frames=cfg.num_frames)  # fmt: skip
    suffix = cfg.video_format if model.is_video else "png"
    for i, media in generate(
        model,
        expanded,
        seeds,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        guidance=cfg.guidance,
        negative_prompt=cfg.negative_prompt,
        height=cfg.height,
        width=cfg.width,
        num_frames=cfg.num_frames,
    ):
        name = f"{i:05d}.{suffix}"
        if model.is_video:
            save_video(media, out / name, fps=cfg.fps)
        else:
            save_image(media, out / name)
        rows.append(
            {
                "file": name,
                "prompt": expanded[i],
                "seed": seeds[i],
                "model": cfg.model,
                "lora": cfg.lora,
                **(
                    {"experts": cfg.experts, "skip_stride": cfg.skip_stride, "nfe": nfe(model, cfg)}
                    if cfg.experts
                    else {}
                ),
                **(
                    {"guide": cfg.guide, "guide_weight": cfg.guide_weight, "guide_end": cfg.guide_end}
                    if cfg.guide
                    else {}
                ),  # fmt: skip
                **{k: v for k, v in sampling.items() if k != "set_explicitly"},
                "negative_prompt": cfg.negative_prompt,
                "family": model.family,
            }
        )
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "metadata.jsonl")
    print(f"wrote {len(rows)} {'videos' if model.is_video else 'images'} and metadata.jsonl to {out}")
    if cfg.experts and rows:
        steps = cfg.steps or model.default_steps
        print(f"experts: {rows[-1]['nfe']} function evaluations per sample ({model.steps_taken['experts']} of "
              f"{steps} steps)")  # fmt: skip
    return out


def nfe(view, cfg: GenerateConfig) -> int:
    """Denoiser evaluations per sample of the last batch an :class:`~visalign.experts.ExpertsView` sampled."""
    from visalign.experts import function_evaluations

    return function_evaluations(view.steps_taken["experts"], view, cfg.guidance)


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    cfg = parse_config(GenerateConfig, argv, prog="visalign generate", description=__doc__.splitlines()[0])
    run(cfg)


__all__ = ["GenerateConfig", "run", "main"]
