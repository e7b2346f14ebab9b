"""Seeded generation and evaluation of samples: grids, shapes-world oracle figures, a JSON report.

Every sample has its own seed, so a sample regenerates alone whatever the batch size, and two models compared on
the same (prompt, seed) list start from the same noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import save_json
from .errors import ConfigError

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def read_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``.jsonl`` prompt file, each a dict with a string ``prompt`` (other fields kept)."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}:{i}: each row needs a string field 'prompt'")
        rows.append(row)
    return rows


def is_prompt_file(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a prompt file (it exists, or looks like a path) rather than a literal prompt."""
    path = Path(spec)
    return path.is_file() or path.suffix.lower() in PROMPT_FILE_SUFFIXES or os.sep in str(spec)


def read_prompts(spec: str | os.PathLike) -> list[str]:
    """A prompt file (``.txt`` lines or ``.jsonl`` rows with ``prompt``) or a single literal prompt."""
    spec = str(spec)
    path = Path(spec)
    if not path.is_file():
        if is_prompt_file(spec):
            raise ConfigError(f"prompt file not found: {spec} (pass an existing .txt/.jsonl file or a prompt text)")
        if not spec.strip():
            raise ConfigError("the prompt is empty: pass a prompt text or a prompt file")
        return [spec]
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = [row["prompt"] for row in read_prompt_rows(path)]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def generate(
    model,
    prompts: list[str],
    seeds: list[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    **sample_kw,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Sample one output per ``(prompt, seed)``, in batches; yields ``(index, media)`` with media in [0, 1].

    ``sample_kw`` goes to :meth:`DiffusionModel.sample` (steps, guidance, negative_prompt, sde, ...).
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    height = height or model.default_resolution
    width = width or model.default_resolution
    bar = tqdm(total=len(prompts), desc="generating", unit="sample", disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        latents = torch.cat(
            [
                model.prepare_latents(1, height, width, num_frames, torch.Generator().manual_seed(s))
                for s in seeds[chunk]
            ]
        )
        gen = torch.Generator(device=model.device).manual_seed(seeds[chunk][0])
        out = model.sample(
            prompts[chunk],
            latents=latents,
            generator=gen,
            height=height,
            width=width,
            num_frames=num_frames,
            **sample_kw,
        )
        for offset, media in enumerate(out.pixels.float().cpu()):
            yield start + offset, media
        bar.update(len(out.pixels))
    bar.close()


def sample_all(model, prompts: list[str], seeds: list[int], **kw) -> torch.Tensor:
    """:func:`generate` collected into one tensor ``[N, ...]``."""
    return torch.stack([media for _, media in generate(model, prompts, seeds, **kw)])


def oracle_metrics(media: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Shapes-world oracle figures, flattened: ``oracle/held_in/strict_acc`` etc. (None values dropped)."""
    from .toyworld import judge_images, judge_videos, summarize
    from .toyworld.oracle import flatten_summary

    judge = judge_videos if media.ndim == 5 else judge_images
    return flatten_summary(summarize(judge(media, prompts)))


def evaluate_samples(
    model,
    prompts: str | list[str],
    out_dir: str | os.PathLike,
    *,
    n: int = 16,
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 0,
    oracle: bool = False,
    resolution: int | None = None,
    num_frames: int | None = None,
    batch_size: int = 8,
    scorers: dict | None = None,
) -> dict[str, float]:
    """Sample ``n`` outputs for the prompts (cycled) with seeds ``seed + i``; save a grid; oracle figures if asked;
    mean scores of ``scorers`` (name -> ``fn(media, prompts) -> [N]``) as ``reward/<name>``.

    Writes ``out_dir/samples.png`` (images; videos: their first frames) and ``out_dir/report.json``.
    """
    from .media import image_grid, save_image

    texts = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    texts = [texts[i % len(texts)] for i in range(n)]
    seeds = [seed + i for i in range(n)]
    media = sample_all(
        model,
        texts,
        seeds,
        steps=steps,
        guidance=guidance,
        height=resolution,
        width=resolution,
        num_frames=num_frames,
        batch_size=batch_size,
        progress=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = media[:, 0] if media.ndim == 5 else media
    save_image(image_grid(frames, nrow=min(8, len(frames))), out / "samples.png")
    results = oracle_metrics(media, texts) if oracle else {}
    for name, fn in (scorers or {}).items():
        results[f"reward/{name}"] = float(torch.as_tensor(fn(media, texts)).float().mean())
    save_json({"prompts": texts, "seeds": seeds, "results": results}, out / "report.json")
    return results


def thumbnails(media: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Pixel features for diversity and FD: ``[N, 3 * size * size]`` (videos: mean over frames)."""
    x = media.float().mean(1) if media.ndim == 5 else media.float()
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area").flatten(1)


def evaluate_variants(
    model,
    variants: dict[str, str | None],
    prompts: list[str],
    seeds: list[int],
    out_dir,
    *,
    scorers: dict | None = None,
    oracle: bool = False,
    base: str | None = None,
    reference: torch.Tensor | None = None,
    **sample_kw,
) -> dict:
    """Sample every variant on the same ``(prompt, seed)`` list and compare them.

    Args:
        variants: display name -> adapter name loaded on ``model`` (``None``: the base model).
        scorers: name -> ``fn(media, prompts) -> [N] scores`` (reward models).
        oracle: add shapes-world oracle figures.
        base: the variant the others' win rates are against (default: the first).
        reference: ``[M, 3, H, W]`` (or videos) reference data, e.g. real images: adds ``fd_to_reference``.

    Returns:
        ``{"variants": {name: {metric: value}}, "prompts", "seeds"}``; also writes ``report.json`` and
        ``grid.png`` (one row per variant, same seeds per column; videos: their first frames, and ``grid.mp4``
        playing the same grid) to ``out_dir``.
    """
    from .media import image_grid, save_image, save_video, video_grid
    from .metrics import frechet_distance, win_rate
    from .monitors import drift_report

    scorers = scorers or {}
    base = base or next(iter(variants))
    media, scores, report = {}, {}, {}
    reference_features = thumbnails(reference) if reference is not None else None
    for name, adapter in variants.items():
        model.set_adapters(adapter)
        media[name] = sample_all(model, prompts, seeds, **sample_kw)
        row = drift_report(media[name], prompts, reference_features=reference_features)
        scores[name] = {}
        for reward_name, fn in scorers.items():
            s = torch.as_tensor(fn(media[name], prompts)).float().cpu()
            scores[name][reward_name] = s
            row[f"reward/{reward_name}"] = float(s.mean())
        if oracle:
            from .toyworld import judge_images, judge_videos, summarize
            from .toyworld.oracle import flatten_summary

            verdicts = (judge_videos if media[name].ndim == 5 else judge_images)(media[name], prompts)
            scores[name]["oracle_strict"] = torch.tensor([float(v.strict) for v in verdicts])
            row.update(flatten_summary(summarize(verdicts)))
        report[name] = row
    for name in variants:
        if name == base:
            continue
        for key, s in scores[name].items():
            report[name][f"win_rate/{key}"] = win_rate(s, scores[base][key])["win_rate"]
        report[name]["fd_to_base"] = frechet_distance(thumbnails(media[name]), thumbnails(media[base]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ncol = min(len(prompts), 8)
    rows = [(m[:, 0] if m.ndim == 5 else m)[:ncol] for m in media.values()]
    save_image(image_grid(torch.cat(rows), nrow=ncol), out / "grid.png")
    if next(iter(media.values())).ndim == 5:  # videos: the same grid, playing
        save_video(video_grid(torch.cat([m[:ncol] for m in media.values()]), nrow=ncol), out / "grid.mp4")
    result = {"base": base, "variants": report, "prompts": prompts, "seeds": seeds,
              "sampling": model.resolve_sampling(**sample_kw)}  # fmt: skip
    save_json(result, out / "report.json")
    return result


def format_table(report: dict, keys: list[str] | None = None) -> str:
    """A plain-text table of variants (rows) by metrics (columns)."""
    variants = report["variants"]
    keys = keys or sorted({k for row in variants.values() for k in row})
    width = max(len(n) for n in variants) + 2
    cols = [max(len(k), 8) for k in keys]
    lines = [" " * width + "  ".join(f"{k:>{c}s}" for k, c in zip(keys, cols))]
    for name, row in variants.items():
        cells = [f"{row[k]:{c}.4f}" if isinstance(row.get(k), float) else f"{'-':>{c}s}" for k, c in zip(keys, cols)]
        lines.append(f"{name:{width}s}" + "  ".join(cells))
    return "\n".join(lines)
