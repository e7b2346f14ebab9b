"""The ``stats`` reward: exact values on constructed images and videos, the sign, a penalty inside a composite,
gradients, and a clear error for an unknown statistic."""

import pytest
import torch

from reward_models import build_reward

GREY = (240 / 255, 240 / 255, 240 / 255)


def canvas(rgb, n=1, size=8):
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_brightness_and_saturation_exact():
    red = canvas((1.0, 0.0, 0.0))
    grey = canvas(GREY)
    images = torch.cat([red, grey])
    assert build_reward("stats")(images).scores.tolist() == pytest.approx([0.299, 240 / 255], abs=1e-6)
    sat = build_reward("stats(stat=saturation)")(images).scores
    assert sat.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    half = images.clone()
    half[0, :, :, :4] = torch.tensor(GREY).view(3, 1, 1)  # half the red canvas greyed: half the saturation
    assert build_reward("stats(stat=saturation)")(half).scores[0] == pytest.approx(0.5, abs=1e-6)
    entropy = build_reward("stats(stat=colour_entropy)")(half).scores
    assert entropy.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)  # two colours in equal parts: one bit


def test_sign_penalty_in_a_composite_and_videos():
    red, grey = canvas((1.0, 0.0, 0.0)), canvas(GREY)
    images = torch.cat([red, grey])
    dark = build_reward("stats(stat=brightness,sign=-1)")(images).scores
    assert dark.tolist() == pytest.approx([-0.299, -240 / 255], abs=1e-6)
    mixed = build_reward("stats,stats(stat=saturation):-0.5")(images)
    assert mixed.scores.tolist() == pytest.approx([0.299 - 0.5, 240 / 255], abs=1e-6)
    video = torch.stack([images, images.flip(0)], dim=0)  # [2 videos, 2 frames, 3, H, W]
    scores = build_reward("stats")(video).scores
    assert scores.tolist() == pytest.approx([(0.299 + 240 / 255) / 2] * 2, abs=1e-6)


def test_gradient_and_bad_stat():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    build_reward("stats")(x).scores.sum().backward()
    weights = torch.tensor([0.299, 0.587, 0.114]) / 64
    assert torch.allclose(x.grad, weights.view(1, 3, 1, 1).expand_as(x))
    with pytest.raises(Exception, match="stat must be one of brightness, saturation, color_entropy"):
        build_reward("stats(stat=contrast)")
