import math

import torch

from visalign.metrics import (
    brightness,
    color_entropy,
    drift_stats,
    frechet_distance,
    pairwise_diversity,
    saturation,
    win_rate,
)


def solid(rgb, n=1, size=4):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_saturation_and_brightness_exact():
    red, grey = solid((1.0, 0.0, 0.0)), solid((0.5, 0.5, 0.5))
    assert saturation(red).item() == 1.0 and saturation(grey).item() == 0.0
    assert saturation(solid((0.0, 0.0, 0.0))).item() == 0.0
    assert abs(saturation(solid((0.8, 0.4, 0.2))).item() - 0.75) < 1e-6  # (0.8 - 0.2) / 0.8
    assert abs(brightness(red).item() - 0.299) < 1e-6
    assert abs(brightness(grey).item() - 0.5) < 1e-6


def test_color_entropy_counts_colours():
    one = solid((1.0, 0.0, 0.0))
    assert color_entropy(one).item() == 0.0
    half = one.clone()
    half[:, :, :2] = 0.0  # half the pixels black: two equally likely colours = 1 bit
    assert abs(color_entropy(half).item() - 1.0) < 1e-6
    video = torch.stack([half, half], dim=1)  # [1, 2, 3, H, W]
    assert abs(color_entropy(video).item() - 1.0) < 1e-6


def test_frechet_distance_of_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) < 1e-8
    assert abs(frechet_distance(a, a + 2.0) - 12.0) < 1e-6  # |mu|^2 = 3 * 4, same covariance
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2  # covariance 4I: trace(I + 4I - 2*2I) = 3
    assert abs(frechet_distance(a, b) - 3.0) < 0.15


def test_diversity_and_win_rate():
    same = torch.ones(4, 8)
    assert abs(pairwise_diversity(same)) < 1e-12
    assert abs(pairwise_diversity(torch.eye(3)) - 1.0) < 1e-12
    wr = win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 1.0]))
    assert wr["win_rate"] == 0.625 and wr["n"] == 4
    assert abs(wr["win_rate_se"] - math.sqrt(0.625 * 0.375 / 4)) < 1e-12


def test_drift_stats_keys():
    stats = drift_stats(solid((1.0, 0.0, 0.0), n=2))
    assert stats == {"saturation": 1.0, "brightness": stats["brightness"], "color_entropy": 0.0}
