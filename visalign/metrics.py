"""Drift and diversity statistics of generated media, and paired win rates.

Reward hacking shows up as drift long before a gold metric drops (oversaturation, washed-out or dark images,
collapsing colour variety, samples that all look alike), so evaluations report these next to rewards. All
functions take media as float ``[N, 3, H, W]`` (videos ``[N, F, 3, H, W]`` are flattened over frames) in [0, 1].
"""

from __future__ import annotations

import math

import torch


def _images(media: torch.Tensor) -> torch.Tensor:
    return media.flatten(0, 1) if media.ndim == 5 else media


def saturation_map(media: torch.Tensor) -> torch.Tensor:
    """HSV saturation ``(max - min) / max`` of each pixel (0 where it is black): ``media`` without its channel axis."""
    x = media.float()
    mx, mn = x.amax(dim=-3), x.amin(dim=-3)
    return torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))


def saturation(media: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation per sample ``[N]`` (:func:`saturation_map` averaged; videos over frames too)."""
    s = saturation_map(media)
    return s.flatten(1).mean(1) if media.ndim == 4 else s.flatten(2).mean(2).mean(1)


def brightness(media: torch.Tensor) -> torch.Tensor:
    """Mean Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` per sample ``[N]``."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=media.device).view(3, 1, 1)
    luma = (media.float() * w).sum(dim=-3)
    return luma.flatten(1).mean(1)


def color_entropy(media: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Entropy (bits) of each sample's colour histogram with ``bins`` levels per channel, ``[N]``."""
    x = media.float()
    if x.ndim == 5:
        x = x.movedim(2, 1).flatten(2, 3)  # [N, 3, F*H, W]
    q = (x.clamp(0, 1) * (bins - 1)).round().long()
    codes = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    out = []
    for c in codes.flatten(1):
        p = torch.bincount(c, minlength=bins**3).float()
        p = p[p > 0] / p.sum()
        out.append(-(p * p.log2()).sum())
    return torch.stack(out)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` ``[N, D]`` and ``b`` ``[M, D]``
    (Heusel et al. 2017, Eq. 6): ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return max(0.0, float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a + s_b - 2 * cross)))  # >= 0 up to rounding


def pairwise_diversity(features: torch.Tensor) -> float:
    """Mean cosine distance between all pairs of samples' features ``[N, D]`` (0: identical samples)."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    n = f.shape[0]
    if n < 2:
        return 0.0
    sim = f @ f.T
    return float((1 - sim).sum() / (n * (n - 1)))


def drift_stats(media: torch.Tensor) -> dict[str, float]:
    """Means of saturation, brightness and colour entropy over a set of samples."""
    return {
        "saturation": float(saturation(media).mean()),
        "brightness": float(brightness(media).mean()),
        "color_entropy": float(color_entropy(media).mean()),
    }


def win_rate(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Paired win rate of ``a`` over ``b`` (same prompt and seed per index): wins + ties / 2, with its standard
    error ``sqrt(p (1 - p) / n)``."""
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    p = float(((a > b).double() + 0.5 * (a == b).double()).mean())
    n = a.numel()
    return {"win_rate": p, "win_rate_se": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}
