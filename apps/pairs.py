"""``visalign pairs``: sample K per prompt, score with a reward, write best-vs-worst pairs and full rankings.

``--pairing best-worst`` (default) writes one pair per prompt group: its best against its worst candidate.
``--pairing spread`` writes up to K/2 disjoint pairs per group: the i-th best against the i-th worst, for every i
whose two scores differ by more than ``--min_margin`` (with a 0/1 reward such as ``oracle(score=position)``
that pairs every right candidate with a different wrong one).

Outputs in ``--out``: ``pairs.jsonl`` + ``media/`` (the preference-data schema ``visalign train diffusion-dpo``
reads), ``rankings.jsonl`` (every candidate with its seed and score, best first, for listwise losses) and
``config.yaml``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from visalign.config import field, save_config
from visalign.errors import ConfigError


@dataclass
class PairsConfig:
    model: str = field(help="pipeline to sample from: hub id or local folder")
    reward: str = field(help="reward spec that ranks the samples, e.g. 'clip(model=assets/toyworld/toy-clip)'")
    prompts: str = field(help="prompt text or file (.txt / .jsonl)")
    out: str = field(help="output dataset folder")
    per_prompt: int = field(4, help="samples per prompt (K >= 2)")
    repeats: int = field(1, help="passes over the prompt list (each with new seeds)")
    min_margin: float = field(0.0, help="skip a pair whose chosen - rejected score is below this")
    pairing: str = field("best-worst", help="best-worst (one pair per group) or spread (i-th best vs i-th worst)")
    lora: str | None = field(None, help="LoRA to sample with")
    seed: int = field(0, help="candidate k of prompt j in repeat r uses seed + (r * P + j) * K + k")
    steps: int | None = field(None, help="sampling steps (default: the model's toyworld.json, else the family's)")
    guidance: float | None = field(None, help="guidance scale (default: the model's toyworld.json, else the family's)")
    height: int | None = field(None, help="height in pixels")
    width: int | None = field(None, help="width in pixels")
    num_frames: int | None = field(None, help="frames per video")
    batch_size: int = field(16, help="samples per forward batch")
    device: str = field("auto", help="cpu, cuda or auto")
    dtype: str = field("fp32", help="fp32, fp16 or bf16")
    progress: bool = field(True, help="show a progress bar")

    def __post_init__(self):
        if self.per_prompt < 2:
            raise ConfigError(f"per_prompt must be >= 2 to make a pair, got {self.per_prompt}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown pairing {self.pairing!r}; choose one of {', '.join(PAIRINGS)}")


PAIRINGS = ("best-worst", "spread")


def make_pairs(
    model,
    score,
    prompts: list[str],
    out: str | os.PathLike,
    *,
    per_prompt: int,
    seed: int = 0,
    repeats: int = 1,
    min_margin: float = 0.0,
    pairing: str = "best-worst",
    batch_size: int = 16,
    progress: bool = True,
    **sample_kw,
) -> dict:
    """Sample, score (``score(media, prompts) -> [N]``) and write pairs and rankings; returns counts and stats."""
    import torch

    from visalign.data import PreferenceWriter
    from visalign.evaluation import generate
    from visalign.media import save_image, save_video

    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    out = Path(out)
    writer = PreferenceWriter(out)
    texts = [p for _ in range(repeats) for p in prompts for _ in range(per_prompt)]
    seeds = [seed + i for i in range(len(texts))]
    media = torch.stack(
        [m for _, m in generate(model, texts, seeds, batch_size=batch_size, progress=progress, **sample_kw)]
    )
    scores = torch.cat(
        [
            torch.as_tensor(score(media[i : i + batch_size], texts[i : i + batch_size])).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    )
    n_pairs, margins, rankings = 0, [], []
    for g in range(len(texts) // per_prompt):
        idx = list(range(g * per_prompt, (g + 1) * per_prompt))
        order = sorted(idx, key=lambda i: -float(scores[i]))
        files = []
        for rank, i in enumerate(order):
            stem = f"cand-{g:06d}-{rank}"
            path = (
                save_video(media[i], out / "media" / f"{stem}.mp4")
                if media.ndim == 5
                else save_image(media[i], out / "media" / f"{stem}.png")
            )
            files.append(str(path.relative_to(out)))
        rankings.append(
            {
                "prompt": texts[idx[0]],
                "candidates": files,
                "seeds": [seeds[i] for i in order],
                "scores": [float(scores[i]) for i in order],
            }
        )
        n_matches = 1 if pairing == "best-worst" else per_prompt // 2
        for best, worst in zip(order[:n_matches], reversed(order[-n_matches:])):
            margin = float(scores[best] - scores[worst])
            if margin < min_margin or margin == 0.0:
                continue
            writer.append(
                texts[best],
                media[best],
                media[worst],
                label=1.0,
                seed_chosen=seeds[best],
                seed_rejected=seeds[worst],
                score_chosen=float(scores[best]),
                score_rejected=float(scores[worst]),
            )
            n_pairs += 1
            margins.append(margin)
    tmp = out / ".rankings.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rankings))
    os.replace(tmp, out / "rankings.jsonl")
    sampling = model.resolve_sampling(**sample_kw)  # what every candidate was sampled with
    tmp = out / ".sampling.json.tmp"
    tmp.write_text(json.dumps(sampling, indent=2))
    os.replace(tmp, out / "sampling.json")
    return {
        "sampling": sampling,
        "pairs": n_pairs,
        "groups": len(rankings),
        "mean_margin": sum(margins) / max(len(margins), 1),
        "mean_score": float(scores.mean()),
    }


def run(cfg: PairsConfig) -> dict:
    import torch

    from apps.generate import resolve_device
    from reward_models import build_reward
    from visalign.evaluation import read_prompts
    from visalign.models import load_model
    from visalign.models.lora import lora_file

    prompts = read_prompts(cfg.prompts)
    if cfg.lora:
        lora_file(cfg.lora)  # a clear error before the model loads
    device = resolve_device(cfg.device)
    reward = build_reward(cfg.reward, device=device)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype)
    if cfg.lora:
        model.load_lora(cfg.lora)
    if Path(cfg.out, "pairs.jsonl").exists():
        raise ConfigError(f"{cfg.out} already holds pairs.jsonl; choose a new --out (pairs are never mixed)")
    save_config(cfg, cfg.out)

    def score(media, texts):
        with torch.no_grad():
            return reward(media.to(device), texts).scores

    stats = make_pairs(
        model,
        score,
        prompts,
        cfg.out,
        per_prompt=cfg.per_prompt,
        seed=cfg.seed,
        repeats=cfg.repeats,
        min_margin=cfg.min_margin,
        pairing=cfg.pairing,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        steps=cfg.steps,
        guidance=cfg.guidance,
        height=cfg.height,
        width=cfg.width,
        num_frames=cfg.num_frames,
    )
    print(
        f"wrote {stats['pairs']} pairs from {stats['groups']} groups to {cfg.out} "
        f"(mean chosen-rejected margin {stats['mean_margin']:.4g})"
    )
    return stats


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    run(parse_config(PairsConfig, argv, prog="visalign pairs", description=__doc__.splitlines()[0]))
