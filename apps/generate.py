"""``visalign generate``: sample images or videos from a pipeline (optionally with a LoRA), with metadata.

Every sample has its own seed (``seed + index``), so any single output can be regenerated alone, whatever the
batch size. Outputs: ``OUT/00000.png`` (or ``.mp4``/``.gif``), ``OUT/metadata.jsonl``, ``OUT/config.yaml``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visalign.config import field, save_config
from visalign.errors import ConfigError, VisalignError

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class GenerateConfig:
    model: str = field(help="Diffusers pipeline: hub id or local folder (e.g. assets/toyworld/toy-sd)")
    prompts: str = field(help="a prompt, or a file: .txt (one per line) or .jsonl (a 'prompt' field per row)")
    out: str = field(help="output folder")
    lora: str | None = field(None, help="LoRA folder or .safetensors (Diffusers format) to apply")
    seed: int = field(0, help="seed of the first sample; sample i uses seed + i")
    num_per_prompt: int = field(1, help="samples per prompt")
    steps: int | None = field(None, help="sampling steps (default: the family's)")
    guidance: float | None = field(None, help="classifier-free guidance scale (default: the family's)")
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
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{name} must be a positive multiple of 8, got {value}")


def read_prompts(spec: str) -> list[str]:
    """A prompt file (``.txt`` lines or ``.jsonl`` rows with ``prompt``) or a single literal prompt."""
    path = Path(spec)
    looks_like_file = path.suffix.lower() in PROMPT_FILE_SUFFIXES or os.sep in spec
    if not path.is_file():
        if looks_like_file:
            raise ConfigError(f"prompt file not found: {spec} (pass an existing .txt/.jsonl file or a prompt text)")
        if not spec.strip():
            raise ConfigError("--prompts is empty: pass a prompt text or a prompt file")
        return [spec]
    prompts = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{path}:{i}: each row needs a string field 'prompt'")
            prompts.append(row["prompt"])
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return device


def generate(model, prompts: list[str], seeds: list[int], *, batch_size: int = 4, progress: bool = True, **kw):
    """Sample one output per (prompt, seed) pair, in batches; yields ``(index, media)`` with media in [0,1]."""
    import torch
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    bar = tqdm(total=len(prompts), desc="generating", unit="sample", disable=not progress)
    height = kw.pop("height", None) or model.default_resolution
    width = kw.pop("width", None) or model.default_resolution
    num_frames = kw.pop("num_frames", None)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        latents = torch.cat(
            [
                model.prepare_latents(1, height, width, num_frames, torch.Generator().manual_seed(s))
                for s in seeds[chunk]
            ]
        )
        gen = torch.Generator(device=model.device).manual_seed(seeds[chunk][0])
        with torch.no_grad():
            out = model.sample(
                prompts[chunk], latents=latents, generator=gen, height=height, width=width, num_frames=num_frames, **kw
            )
        for offset, media in enumerate(out.pixels):
            yield start + offset, media
        bar.update(len(out.pixels))
    bar.close()


def run(cfg: GenerateConfig) -> Path:
    from visalign.media import save_image, save_video
    from visalign.models import load_model

    prompts = read_prompts(cfg.prompts)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    model = load_model(cfg.model, device=resolve_device(cfg.device), dtype=cfg.dtype, attention=cfg.attention)
    if cfg.lora:
        model.load_lora(cfg.lora)
    expanded = [p for p in prompts for _ in range(cfg.num_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(expanded))]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rows = []
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
                "steps": cfg.steps or model.default_steps,
                "guidance": model.default_guidance if cfg.guidance is None else cfg.guidance,
                "negative_prompt": cfg.negative_prompt,
                "family": model.family,
            }
        )
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "metadata.jsonl")
    print(f"wrote {len(rows)} {'videos' if model.is_video else 'images'} and metadata.jsonl to {out}")
    return out


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    cfg = parse_config(GenerateConfig, argv, prog="visalign generate", description=__doc__.splitlines()[0])
    run(cfg)


__all__ = ["GenerateConfig", "generate", "read_prompts", "run", "main", "VisalignError"]
