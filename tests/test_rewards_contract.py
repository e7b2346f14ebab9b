"""One contract over every registered reward, built at tiny size with random weights (the protocol of docs/design.md).

For each entry of ``list_rewards()``: scores of shape (B,), float32, finite where valid; the same scores at
batch size 1 and 8; weights dtype and device honoured (scores stay float32 on the media's device);
differentiable rewards pass a non-zero gradient to the pixels, the others declare ``differentiable=False``
and return no graph. A reward registered without a tiny random builder fails here.
"""

from __future__ import annotations

import pytest
import torch

from reward_models import RewardOutput, build_random_reward, list_rewards, reward_spec

B = 8
IMAGE_PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "a green triangle on the top",
    "a yellow circle on the right",
    "a purple square",
    "a cyan triangle on the bottom",
    "a red square on the top",
    "a blue circle",
]
VIDEO_PROMPTS = [
    "a red circle moving left",
    "a blue square moving up",
    "a green triangle moving right",
    "a yellow circle moving down",
    "a purple square moving left",
    "a cyan triangle moving up",
    "a red square moving right",
    "a blue circle moving down",
]


def _inputs(reward):
    gen = torch.Generator().manual_seed(0)
    # non-square and larger than the tiny models' 32 px input, so every resize/crop/pad path runs
    if "image" in reward.spec.modalities:
        return torch.rand(B, 3, 40, 52, generator=gen), IMAGE_PROMPTS
    return torch.rand(B, 4, 3, 40, 52, generator=gen), VIDEO_PROMPTS


@pytest.fixture(scope="module")
def rewards():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_random_reward(name, "tiny")
        return cache[name]

    return get


@pytest.mark.parametrize("name", list_rewards())
def test_output_shape_dtype_and_batch_invariance(name, rewards):
    reward = rewards(name)
    assert reward.spec.name == name or reward.spec.name.startswith(f"{name}(")
    media, prompts = _inputs(reward)
    out = reward(media, prompts)
    assert isinstance(out, RewardOutput)
    assert out.scores.shape == (B,) and out.scores.dtype == torch.float32
    assert out.valid.shape == (B,) and out.valid.dtype == torch.bool
    assert torch.isfinite(out.scores[out.valid]).all()
    assert not out.scores.requires_grad  # no graph unless the media require grad
    for value in out.components.values():
        assert value.shape == (B,)

    saved = reward.batch_size
    try:
        reward.batch_size = 1
        one = reward(media, prompts)
    finally:
        reward.batch_size = saved
    torch.testing.assert_close(one.scores, out.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward(media[3:4], prompts[3:4]).scores, out.scores[3:4], rtol=1e-4, atol=1e-5)
    assert torch.equal(one.valid, out.valid)


@pytest.mark.parametrize("name", list_rewards())
def test_dtype_and_device_are_honoured(name):
    reward = build_random_reward(name, "tiny", device="cpu", dtype="bf16")
    assert reward.device == torch.device("cpu") and reward.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in reward.parameters() if p.is_floating_point())
    media, prompts = _inputs(reward)
    low = reward(media, prompts)
    assert low.scores.dtype == torch.float32 and low.scores.device == media.device
    assert torch.isfinite(low.scores[low.valid]).all()

    reward = reward.to(torch.float64)
    assert reward.dtype == torch.float64
    high = reward(media, prompts).scores
    reward = reward.to(torch.float32)
    ref = reward(media, prompts).scores
    assert high.dtype == torch.float32
    torch.testing.assert_close(high, ref, rtol=1e-4, atol=1e-4)
    # bf16 weights give the same scores up to bf16 precision (relative to the spread of the scores)
    tol = 0.1 * float(ref.abs().max()) + 0.05
    assert (low.scores - ref).abs().max() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list_rewards())
def test_cuda_placement(name):
    reward = build_random_reward(name, "tiny", device="cuda", dtype="fp16")
    media, prompts = _inputs(reward)
    out = reward(media, prompts)  # CPU media: moved in, scores come back on the media's device
    assert out.scores.device.type == "cpu" and out.scores.dtype == torch.float32
    out = reward(media.cuda(), prompts)
    assert out.scores.device.type == "cuda"


@pytest.mark.parametrize("name", list_rewards())
def test_gradients_reach_pixels_or_are_declared_absent(name, rewards):
    reward = rewards(name)
    assert reward.spec.differentiable == reward_spec(name).differentiable or name == "video"
    media, prompts = _inputs(reward)
    media = media.clone().requires_grad_(True)
    out = reward(media, prompts)
    if reward.spec.differentiable:
        out.scores.sum().backward()
        assert media.grad is not None and media.grad.abs().sum() > 0
        assert all(p.grad is None for p in reward.parameters())  # the reward itself is frozen
    else:
        assert not out.scores.requires_grad
