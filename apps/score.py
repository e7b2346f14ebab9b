"""``visalign score``: score a folder of images or videos with any reward spec; JSONL + CSV summary + histogram.

Media are read in file-name order. Prompts come from ``--prompts``: a ``.jsonl`` file with ``file`` and
``prompt`` fields (``metadata.jsonl`` written by ``visalign generate`` is one, and is used by default when the
media folder has it), a ``.jsonl`` with ``prompt`` only or a ``.txt`` (one per line, matched to files in
order), or a single prompt text for every file. Image rewards score videos frame by frame (``--frames``,
``--reduce``). Outputs beside ``--out``: ``NAME.jsonl`` (one row per file), ``NAME.summary.csv`` (count, mean,
std, quantiles of the score and of every component), ``NAME.hist.png`` and ``NAME.config.yaml``.
Scores are raw (see ``reward_models.compose`` for scaling).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visalign.config import field, save_config
from visalign.errors import ConfigError, VisalignError
from visalign.evaluation import is_prompt_file, read_prompt_rows, read_prompts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov")


@dataclass
class ScoreConfig:
    reward: str = field(help="reward spec: 'hps-v2.1', 'clip(model=ViT-B-32,pretrained=openai)', 'hps-v2.1:1,clip:.5'")
    out: str = field(help="output .jsonl of per-file scores (NAME.summary.csv, .hist.png, .config.yaml go beside it)")
    images: str | None = field(None, help="folder of images (png, jpg, webp, bmp)")
    videos: str | None = field(None, help="folder of videos (mp4, gif, webm, mov)")
    prompts: str | None = field(
        None, help="prompts: .jsonl (file + prompt, or prompt), .txt, or one text; default: FOLDER/metadata.jsonl"
    )
    batch_size: int = field(16, help="media per scoring batch")
    frames: int | None = field(None, help="frames sampled per video when an image reward scores videos (default: all)")
    reduce: Literal["mean", "min", "first"] = field("mean", help="how an image reward's frame scores combine")
    device: str = field("auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    dtype: Literal["fp32", "fp16", "bf16"] = field("fp32", help="reward weights dtype")
    bins: int = field(20, help="histogram bins")

    def __post_init__(self):
        if (self.images is None) == (self.videos is None):
            raise ConfigError("pass exactly one of --images DIR or --videos DIR")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {self.frames}")
        if self.bins < 1:
            raise ConfigError(f"bins must be >= 1, got {self.bins}")
        if Path(self.out).suffix.lower() != ".jsonl":
            raise ConfigError(f"--out must be a .jsonl file, got {self.out}")


def list_media(folder: str | os.PathLike, suffixes: tuple[str, ...]) -> list[Path]:
    """Media files of ``folder`` in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"media folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ConfigError(f"{folder} holds no media files ({', '.join(suffixes)})")
    return files


def read_prompts_for(files: list[Path], spec: str | None, needs_prompt: bool) -> list[str] | None:
    """One prompt per file (see the module docstring), or ``None`` when there are none and none are needed."""
    if spec is None:
        default = files[0].parent / "metadata.jsonl"
        if default.is_file():
            spec = str(default)
        elif needs_prompt:
            raise ConfigError("this reward needs prompts: pass --prompts (a .jsonl, a .txt or a prompt text)")
        else:
            return None
    path = Path(spec)
    if not path.is_file():
        if is_prompt_file(spec):
            raise ConfigError(f"prompt file not found: {spec}")
        return [spec] * len(files)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = read_prompt_rows(path)
        if rows and all("file" in r for r in rows):
            by_file = {Path(str(r["file"])).name: r["prompt"] for r in rows}
            missing = [f.name for f in files if f.name not in by_file]
            if missing:
                raise ConfigError(f"{path} has no prompt for {len(missing)} file(s), e.g. {missing[:3]}")
            return [by_file[f.name] for f in files]
        prompts = [r["prompt"] for r in rows]
    else:
        prompts = read_prompts(path)
    if len(prompts) != len(files):
        raise ConfigError(f"{path} holds {len(prompts)} prompts for {len(files)} media files; they must match")
    return prompts


def read_media(path: Path, video: bool):
    """``[3, H, W]`` (image) or ``[T, 3, H, W]`` (video) float in [0, 1]; a clear error for unreadable files."""
    import numpy as np
    import torch

    try:
        if video:
            from visalign.media import read_video

            return read_video(path)
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    except Exception as e:
        raise VisalignError(f"cannot read {'video' if video else 'image'} {path}: {e}") from e


def batches(files: list[Path], batch_size: int, video: bool):
    """Yield ``(indices, media)``: consecutive files of the same shape stacked, at most ``batch_size``."""
    import torch

    idx, items = [], []
    for i, f in enumerate(files):
        m = read_media(f, video)
        if items and (m.shape != items[0].shape or len(items) == batch_size):
            yield idx, torch.stack(items)
            idx, items = [], []
        idx.append(i)
        items.append(m)
    if items:
        yield idx, torch.stack(items)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summarize(values: dict[str, list[float]], valid: list[bool]) -> list[dict]:
    """Per metric: ``n``, ``n_valid`` and mean/std/min/quantiles/max over valid, finite values."""
    import numpy as np

    rows = []
    for name, vals in values.items():
        arr = np.array([v for v, ok in zip(vals, valid) if ok and v is not None and math.isfinite(v)], dtype=float)
        row = {"metric": name, "n": len(vals), "n_valid": int(arr.size)}
        stats = ("mean", "std", "min", "p25", "median", "p75", "max")
        if arr.size:
            q = np.quantile(arr, [0.25, 0.5, 0.75])
            row.update(zip(stats, [arr.mean(), arr.std(), arr.min(), q[0], q[1], q[2], arr.max()]))
        else:
            row.update(dict.fromkeys(stats))
        rows.append(row)
    return rows


def draw_histogram(values: list[float], path: Path, title: str, bins: int = 20) -> Path:
    """A histogram PNG drawn with PIL (matplotlib is not a dependency)."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), title[:90], fill="black")
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    x0, y0, x1, y1 = margin, margin, width - margin // 2, height - margin
    draw.line([(x0, y1), (x1, y1)], fill="black")
    draw.line([(x0, y0), (x0, y1)], fill="black")
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(arr, bins=bins, range=(lo, hi))
        bar = (x1 - x0) / bins
        for k, c in enumerate(counts):
            top = y1 - (y1 - y0) * c / max(counts.max(), 1)
            draw.rectangle([x0 + k * bar + 1, top, x0 + (k + 1) * bar - 1, y1], fill=(70, 110, 190))
        draw.text((x0, y1 + 6), f"{edges[0]:.4g}", fill="black")
        draw.text((x1 - 60, y1 + 6), f"{edges[-1]:.4g}", fill="black")
        draw.text((x0 - 45, y0), str(int(counts.max())), fill="black")
        draw.text((x0 + 200, y1 + 22), f"n={arr.size}  mean={arr.mean():.4g}  std={arr.std():.4g}", fill="black")
    else:
        draw.text((x0 + 10, (y0 + y1) // 2), "no valid scores", fill="black")
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cfg: ScoreConfig) -> Path:
    """Score every file; write the JSONL, the CSV summary, the histogram and the config. Returns the JSONL."""
    import torch
    from tqdm.auto import tqdm

    from apps.generate import resolve_device
    from reward_models import build_reward
    from reward_models.video import VideoReward

    video = cfg.videos is not None
    files = list_media(cfg.videos if video else cfg.images, VIDEO_SUFFIXES if video else IMAGE_SUFFIXES)
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a .jsonl file path")
    reward = build_reward(cfg.reward, device=resolve_device(cfg.device), dtype=cfg.dtype)
    if video and "video" not in reward.spec.modalities:
        reward = VideoReward(reward, cfg.frames, cfg.reduce)
        print(f"scoring videos with image reward {cfg.reward}: {cfg.frames or 'all'} frames, {cfg.reduce}")
    reward.batch_size = cfg.batch_size
    prompts = read_prompts_for(files, cfg.prompts, reward.spec.needs_prompt)

    rows: list[dict] = [{} for _ in files]
    bar = tqdm(total=len(files), desc="scoring", unit="file")
    for idx, media in batches(files, cfg.batch_size, video):
        with torch.no_grad():
            res = reward(media, None if prompts is None else [prompts[i] for i in idx])
        for j, i in enumerate(idx):
            rows[i] = {
                "file": files[i].name,
                "prompt": None if prompts is None else prompts[i],
                "score": _finite(float(res.scores[j])),
                "valid": bool(res.valid[j]),
                "components": {k: _finite(float(v[j])) for k, v in res.components.items()},
            }
        bar.update(len(idx))
    bar.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    valid = [r["valid"] for r in rows]
    values = {"score": [r["score"] for r in rows]}
    for name in rows[0]["components"]:
        values[name] = [r["components"][name] for r in rows]
    summary = summarize(values, valid)
    stem = out.with_suffix("")
    tmp = stem.with_name(f".{stem.name}.summary.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    os.replace(tmp, stem.with_name(f"{stem.name}.summary.csv"))
    scores = [s for s, ok in zip(values["score"], valid) if ok]
    draw_histogram(scores, stem.with_name(f"{stem.name}.hist.png"), f"{cfg.reward}: scores", cfg.bins)
    save_config(cfg, out.parent, name=f"{stem.name}.config.yaml")
    head = summary[0]
    mean = "n/a" if head["mean"] is None else f"{head['mean']:.4g}"
    print(f"scored {len(rows)} files ({head['n_valid']} valid), mean {mean}: {out}")
    return out


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    cfg = parse_config(ScoreConfig, argv, prog="visalign score", description=__doc__.splitlines()[0])
    run(cfg)
