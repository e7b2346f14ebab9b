"""``visalign toy``: render the shapes world, pretrain its models, and measure them with the oracle.

``visalign toy render --out DIR --n N --seed S [--video]``: ground-truth renders + ``metadata.jsonl``.
``visalign toy pretrain --model toy-sd|toy-flow|toy-video|toy-clip --out DIR --seed S --steps N``: a model folder.
``visalign toy evaluate --model DIR [--lora L] --n N --seed S --out DIR``: ``report.json`` + ``grid.png`` (a video
model is judged by the video oracle on the video captions; its grid shows one video per row).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from visalign.config import field, parse_config, save_config
from visalign.errors import ConfigError


# ----------------------------------------------------------------------------------------------- render
@dataclass
class RenderConfig:
    """``visalign toy render``: exact shapes-world renders with their captions and scene metadata."""

    out: str = field(help="output folder")
    n: int = field(90, help="number of images (or videos); captions cycle through the split in a fixed order")
    seed: int = field(0, help="render seed; sample i uses numpy default_rng((seed, i))")
    video: bool = field(False, help="render 8-frame 32x32 videos (GIF) instead of 64x64 images (PNG)")
    split: str = field("all", help="captions to use: all, held_in or held_out")
    prompts: str | None = field(None, help="also write the caption splits as prompt files (.txt) into this folder")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.split not in ("all", "held_in", "held_out"):
            raise ConfigError(f"split must be all, held_in or held_out, got {self.split!r}")


def write_prompt_sets(directory: Path) -> list[Path]:
    """The caption splits as prompt files (one caption per line) that ``visalign generate`` reads."""
    from visalign.toyworld import caption_texts

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for video in (False, True):
        prefix = "video_" if video else ""
        for split in (None, "held_in", "held_out"):
            path = directory / f"{prefix}{split or 'captions'}.txt"
            path.write_text("\n".join(caption_texts(split, video=video)) + "\n")
            files.append(path)
    return files


def run_render(cfg: RenderConfig) -> Path:
    from visalign.media import save_image, save_video
    from visalign.toyworld import caption_texts, parse_caption, parse_video_caption, render_images, render_videos

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    split = None if cfg.split == "all" else cfg.split
    pool = caption_texts(split, video=cfg.video)
    captions = [pool[i % len(pool)] for i in range(cfg.n)]
    rows = []
    for start in range(0, cfg.n, 256):
        chunk = captions[start : start + 256]
        if cfg.video:
            media, scenes = render_videos(chunk, seed=cfg.seed, start=start)
        else:
            media, scenes = render_images(chunk, seed=cfg.seed, start=start)
        for k, (item, scene) in enumerate(zip(media, scenes)):
            index = start + k
            name = f"{index:05d}.{'gif' if cfg.video else 'png'}"
            if cfg.video:
                save_video(item, out / name)
                caption_split = parse_video_caption(scene.caption).split
            else:
                save_image(item, out / name)
                caption_split = parse_caption(scene.caption).split
            rows.append(
                {
                    "file": name,
                    "prompt": scene.caption,
                    "split": caption_split,
                    "seed": cfg.seed,
                    "index": index,
                    "scene": scene.to_dict(),
                }
            )
    _write_jsonl(out / "metadata.jsonl", rows)
    if cfg.prompts:
        write_prompt_sets(Path(cfg.prompts))
    save_config(cfg, out)
    print(f"wrote {len(rows)} {'videos' if cfg.video else 'images'} and metadata.jsonl to {out}")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- pretrain
def run_pretrain(cfg) -> Path:
    from visalign.toyworld.pretrain import pretrain

    out = pretrain(cfg)
    info = json.loads((out / "toyworld.json").read_text())
    print(f"pretrained {cfg.model} in {info['wall_time_s']:.0f} s -> {out}")
    return out


# ----------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateConfig:
    """``visalign toy evaluate``: sample held-in and held-out captions and judge them with the oracle."""

    model: str = field(
        help="a toy pipeline folder (toy-sd, toy-flow, toy-video, or any SD/SD3/Wan pipeline) or a toy-clip folder"
    )
    out: str = field(help="output folder for report.json and grid.png")
    lora: str | None = field(None, help="LoRA (Diffusers format) to apply to the pipeline")
    n: int = field(64, help="samples per split (held-in and held-out); toy-clip: renders in all")
    seed: int = field(0, help="seed of the caption order and of the samples (sample i uses seed + i)")
    steps: int | None = field(None, help="sampling steps (default: the model's toyworld.json, else the family's)")
    guidance: float | None = field(None, help="CFG scale (default: the model's toyworld.json, else the family's)")
    batch_size: int = field(32, help="samples per forward batch")
    device: str = field("auto", help="cpu, cuda, ... or auto")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def sample_and_judge(
    model,
    captions: list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance: float,
    batch_size: int = 32,
    height: int = 64,
    width: int = 64,
    num_frames: int | None = None,
    progress: bool = True,
):
    """Sample one image (or video) per (caption, seed) with :func:`apps.generate.generate`.

    Returns:
        ``(pixels, verdicts)``: ``[N, 3, H, W]`` and :func:`judge_images`'s verdicts, or for a video model
        ``[N, F, 3, H, W]`` (``F = num_frames``) and :func:`judge_videos`'s.
    """
    import torch

    from apps.generate import generate
    from visalign.toyworld import judge_images, judge_videos

    shape = (num_frames, 3, height, width) if model.is_video else (3, height, width)
    pixels = torch.empty(len(captions), *shape)
    for i, media in generate(
        model,
        captions,
        seeds,
        batch_size=batch_size,
        progress=progress,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        num_frames=num_frames,
    ):
        pixels[i] = media.float().cpu()
    return pixels, (judge_videos if model.is_video else judge_images)(pixels, captions)


def evaluate_diffusion(cfg: EvaluateConfig, model=None, progress: bool = True) -> dict:
    """Oracle figures of a pipeline on ``n`` held-in and ``n`` held-out captions; writes report and grid.

    Image models sample the image captions at 64x64 (or their ``toyworld.json``'s size); video models the video
    captions at their ``toyworld.json``'s size and frame count (the world's 8 frames of 32x32 by default).
    """
    from apps.generate import resolve_device
    from visalign.media import image_grid, save_image
    from visalign.models import load_model
    from visalign.toyworld import sampling_defaults, summarize
    from visalign.toyworld.evaluate import eval_captions
    from visalign.toyworld.render import VIDEO_FRAMES, VIDEO_SIZE

    defaults = sampling_defaults(cfg.model)
    if model is None:
        if cfg.lora:
            from visalign.models.lora import lora_file

            lora_file(cfg.lora)  # a clear error before the model loads
        model = load_model(cfg.model, device=resolve_device(cfg.device))
        if cfg.lora:
            model.load_lora(cfg.lora)
    steps = cfg.steps or defaults.get("steps") or model.default_steps
    guidance = cfg.guidance if cfg.guidance is not None else defaults.get("guidance", model.default_guidance)
    video = model.is_video
    size = VIDEO_SIZE if video else 64
    height, width = defaults.get("height", size), defaults.get("width", size)
    num_frames = defaults.get("num_frames", VIDEO_FRAMES) if video else None
    captions = eval_captions(cfg.n, cfg.seed, "held_in", video) + eval_captions(cfg.n, cfg.seed, "held_out", video)
    seeds = [cfg.seed + i for i in range(len(captions))]
    pixels, verdicts = sample_and_judge(
        model,
        captions,
        seeds,
        steps=steps,
        guidance=guidance,
        batch_size=cfg.batch_size,
        height=height,
        width=width,
        num_frames=num_frames,
        progress=progress,
    )
    summary = summarize(verdicts)
    report = {
        "model": cfg.model,
        "lora": cfg.lora,
        "family": model.family,
        "steps": steps,
        "guidance": guidance,
        **({"height": height, "width": width, "num_frames": num_frames} if video else {}),
        "seed": cfg.seed,
        "n_per_split": cfg.n,
        "summary": summary,
        "samples": [{"index": i, "seed": s, **v.to_dict()} for i, (s, v) in enumerate(zip(seeds, verdicts))],
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if video:  # one video per row, frames left to right: 16 held-in then 8 held-out
        shown = list(range(min(cfg.n, 16))) + list(range(cfg.n, cfg.n + min(cfg.n, 8)))
        save_image(image_grid(pixels[shown].flatten(0, 1), nrow=num_frames), out / "grid.png")
    else:
        shown = list(range(min(cfg.n, 64))) + list(range(cfg.n, cfg.n + min(cfg.n, 32)))
        save_image(image_grid(pixels[shown], nrow=16), out / "grid.png")
    return report


def evaluate_clip(cfg: EvaluateConfig) -> dict:
    """toy-clip's accuracy at ranking the true caption above its hard negatives; writes ``report.json``."""
    from visalign.toyworld.evaluate import clip_hard_negative_accuracy
    from visalign.toyworld.recipes import load_toy_clip

    model, tokenizer = load_toy_clip(cfg.model)
    report = {
        "model": cfg.model,
        "seed": cfg.seed,
        "n": cfg.n,
        "hard_negative_accuracy": clip_hard_negative_accuracy(model, tokenizer, n=cfg.n, seed=cfg.seed),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_evaluate(cfg: EvaluateConfig) -> dict:
    path = Path(cfg.model)
    if (path / "open_clip_config.json").is_file():
        if cfg.lora:
            raise ConfigError("--lora applies to diffusion pipelines, not to toy-clip")
        report = evaluate_clip(cfg)
        acc = {k: v["accuracy"] for k, v in report["hard_negative_accuracy"].items()}
        shown = ", ".join(f"{k.replace('_', '-')} {v:.3f}" for k, v in acc.items() if v is not None)
        print(f"toy-clip hard-negative accuracy: {shown} -> {cfg.out}/report.json")
        return report
    report = evaluate_diffusion(cfg)
    s = report["summary"]
    direction = (
        f"direction held-in {s['held_in']['direction_acc']:.3f}, held-out {s['held_out']['direction_acc']:.3f}; "
        if "direction_acc" in s["all"]
        else ""
    )
    print(
        f"object rate {s['all']['object_rate']:.3f}; {direction}strict held-in {s['held_in']['strict_acc']:.3f}, "
        f"held-out {s['held_out']['strict_acc']:.3f} -> {cfg.out}/report.json"
    )
    return report


# ----------------------------------------------------------------------------------------------- CLI
def _pretrain_config():
    from visalign.toyworld.pretrain import PretrainConfig

    return PretrainConfig


SUBCOMMANDS = {
    "render": (lambda: RenderConfig, run_render, "exact renders (images or videos) with metadata.jsonl"),
    "pretrain": (_pretrain_config, run_pretrain, "pretrain toy-sd, toy-flow, toy-video or toy-clip from a seed"),
    "evaluate": (lambda: EvaluateConfig, run_evaluate, "oracle figures of a model (or toy-clip's accuracy)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visalign toy",
        description="Build, pretrain and check the shapes world.",
        epilog="Run 'visalign toy SUBCOMMAND --help' for its options.",
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str]) -> None:
    argv = list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # --help, or argparse explains the missing/unknown subcommand
        return
    name, rest = argv[0], argv[1:]
    config_cls, run, help_text = SUBCOMMANDS[name]
    cfg = parse_config(config_cls(), rest, prog=f"visalign toy {name}", description=help_text)
    run(cfg)


__all__ = ["EvaluateConfig", "RenderConfig", "evaluate_diffusion", "main", "sample_and_judge"]
