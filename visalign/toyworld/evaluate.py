"""Measuring the shapes-world models: evaluation prompt sets and toy-clip's hard-negative accuracy.

Sampling a diffusion model for the oracle happens in ``apps/toy.py`` (through ``apps.generate.generate``);
this module holds what does not sample: which captions to evaluate on and how to score a CLIP model.
"""

from __future__ import annotations

import numpy as np
import torch

from .captions import COLORS, SHAPES, Caption, all_captions, caption_texts, parse_caption
from .render import render_images

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def eval_captions(n: int, seed: int, split: str, video: bool = False) -> list[str]:
    """``n`` captions of a split (video captions if ``video``), cycling through a seeded permutation (every
    caption before any repeats)."""
    captions = caption_texts(split, video=video)
    order = np.random.default_rng((seed, 11)).permutation(len(captions))
    return [captions[order[i % len(captions)]] for i in range(n)]


def hard_negatives(caption: Caption | str) -> dict[str, list[str]]:
    """Captions that are certainly false of an image drawn for ``caption``, by kind.

    ``color``: the 5 other colours; ``shape``: the 2 other shapes; ``position``: the opposite side (for captions
    that name a position; a perpendicular one may happen to hold, so it is not a negative).
    """
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    return {
        "color": [Caption(c, cap.shape, cap.position).text for c in COLORS if c != cap.color],
        "shape": [Caption(cap.color, s, cap.position).text for s in SHAPES if s != cap.shape],
        "position": [Caption(cap.color, cap.shape, OPPOSITE[cap.position]).text] if cap.position else [],
    }


@torch.no_grad()
def clip_similarity(model, tokenizer, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosine similarity ``[N, T]`` of toy-clip image and text embeddings (images ``[N, 3, 64, 64]`` in [0, 1])."""
    from .pretrain_clip import clip_normalize

    image_features = model.encode_image(clip_normalize(images), normalize=True)
    text_features = model.encode_text(tokenizer(texts), normalize=True)
    return image_features @ text_features.T


@torch.no_grad()
def clip_hard_negative_accuracy(model, tokenizer, n: int = 256, seed: int = 0) -> dict:
    """How often toy-clip ranks the true caption above every hard negative, on renders of all 90 captions.

    Returns:
        ``{split: {"n", "accuracy", "color", "shape", "position"}}`` for ``all``, ``held_in``, ``held_out``:
        ``accuracy`` needs the true caption above all its negatives; the others count one kind at a time.
    """
    captions = [c.text for c in all_captions()]
    captions = [captions[i % len(captions)] for i in range(n)]
    images, _ = render_images(captions, seed=seed)
    texts = sorted({t for c in captions for t in (c, *sum(hard_negatives(c).values(), []))})
    index = {t: i for i, t in enumerate(texts)}
    sims = clip_similarity(model, tokenizer, images, texts)
    rows = []
    for k, caption in enumerate(captions):
        true = sims[k, index[caption]]
        kinds = {
            kind: bool((true > sims[k, [index[t] for t in negs]]).all()) if negs else None
            for kind, negs in hard_negatives(caption).items()
        }
        rows.append((parse_caption(caption).split, all(v is not False for v in kinds.values()), kinds))
    report = {}
    for split in ("all", "held_in", "held_out"):
        sel = [r for r in rows if split == "all" or r[0] == split]
        entry = {"n": len(sel), "accuracy": float(np.mean([r[1] for r in sel])) if sel else None}
        for kind in ("color", "shape", "position"):
            values = [r[2][kind] for r in sel if r[2][kind] is not None]
            entry[kind] = float(np.mean(values)) if values else None
        report[split] = entry
    return report
