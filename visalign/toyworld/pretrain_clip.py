"""toy-clip pretraining: an open_clip model learns the shapes world contrastively, every held-in caption a candidate.

Each rendered image is scored against all 80 held-in captions at once (the true ones, its hard negatives: other
colours, shapes, positions, and captions that are also true, e.g. without the position), and each caption against
the batch's images; :func:`multi_positive_nce` handles several true captions per image. Run through
:func:`visalign.toyworld.pretrain.pretrain` (``visalign toy pretrain --model toy-clip``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .captions import caption_texts, parse_caption
from .oracle import position_holds
from .pretrain import GRID_CAPTIONS, LossLog, _save_grid, _trainable, held_in_batch, lr_at
from .pretrain_config import PretrainConfig
from .recipes import build_toy_clip, save_toy_clip
from .render import draw_near_miss, render_images, to_tensor


def caption_truth(scenes: list, captions: list[str]) -> torch.Tensor:
    """``[N, C]`` bool: caption ``c`` is true of scene ``n`` (colour, shape and any named position hold)."""
    parsed = [parse_caption(c) for c in captions]
    return torch.tensor(
        [
            [
                c.color == s.color
                and c.shape == s.shape
                and (c.position is None or position_holds(c.position, s.cx, s.cy))
                for c in parsed
            ]
            for s in scenes
        ]
    )


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 64, 64]`` in ``[0, 1]`` to toy-clip's input (OpenAI mean/std; already 64 px)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def multi_positive_nce(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``mean_rows(-log sum_{j true} softmax(logits)_j)``; rows without a true entry are skipped.

    Args:
        logits: ``[N, M]``; truth: ``[N, M]`` bool.
    """
    keep = truth.any(dim=1)
    logits, truth = logits[keep], truth[keep]
    log_p = logits.log_softmax(dim=1)
    return -(log_p.masked_fill(~truth, float("-inf")).logsumexp(dim=1)).mean()


def add_near_misses(images, truth, scenes, chance: float, rng: np.random.Generator):
    """Append a near-miss twin (:func:`~visalign.toyworld.render.draw_near_miss`) of each square scene with
    probability ``chance``: same colour, size and place, no caption true of it. It enters the loss only as a
    negative of the captions' rows, next to its exact twin, so "square" learns sharp, straight corners."""
    twins = [draw_near_miss(s, rng) for s in scenes if s.shape == "square" and rng.random() < chance]
    if not twins:
        return images, truth
    images = torch.cat([images, to_tensor(np.stack(twins))])
    return images, torch.cat([truth, truth.new_zeros(len(twins), truth.shape[1])])


def train_clip(cfg: PretrainConfig, out: Path) -> dict:
    """Pretrain toy-clip into ``out``; returns the summary written to ``toyworld.json``."""
    from .evaluate import clip_hard_negative_accuracy

    model, tokenizer = build_toy_clip(cfg.seed)
    held_in = caption_texts("held_in")
    text_ids = tokenizer(held_in)
    params = _trainable([model])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    rng = np.random.default_rng((cfg.seed, 6))
    log = LossLog(out / "losses.csv", cfg.model)
    bar = tqdm(range(cfg.steps), desc=cfg.model, disable=not cfg.progress)
    for step in bar:
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        images, scenes = held_in_batch(rng, cfg.batch_size, cfg.seed + 6_000_011, step * cfg.batch_size)
        truth = caption_truth(scenes, held_in)
        if cfg.near_miss > 0:
            images, truth = add_near_misses(images, truth, scenes, cfg.near_miss, rng)
        image_features = model.encode_image(clip_normalize(images), normalize=True)
        text_features = model.encode_text(text_ids, normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # image -> every held-in caption (all hard negatives), and caption -> the batch's images
        loss = 0.5 * (multi_positive_nce(logits, truth) + multi_positive_nce(logits.T, truth.T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # as CLIP: the temperature is clamped at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.write(step, loss.item(), lr)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    log.close()
    model.requires_grad_(False)
    model.eval()
    save_toy_clip(model, out)
    report = clip_hard_negative_accuracy(model, tokenizer, n=256, seed=cfg.seed + 7)
    images, _ = render_images(list(GRID_CAPTIONS), seed=cfg.seed)
    _save_grid(images, out / "samples.png")
    return {"hard_negative_accuracy": report}
