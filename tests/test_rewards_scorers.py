"""Behaviour of the scorers that are more than a forward pass: discriminator training and head files, the
video adapter's frame sampling and reductions, temporal consistency, and the shapes-world oracle."""

from __future__ import annotations

import pytest
import torch

from reward_models import RewardInputError, build_random_reward, build_reward
from reward_models.discriminator import DiscriminatorReward, load_discriminator, random_discriminator
from reward_models.encoders import FeatureEncoder
from reward_models.video import TemporalConsistencyReward, VideoReward, reduce_frames, sample_frame_indices


# ----------------------------------------------------------------------------------------------- discriminator
def _two_distributions(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    real = 0.6 + 0.4 * torch.rand(n, 3, 32, 32, generator=gen)  # bright
    fake = 0.4 * torch.rand(n, 3, 32, 32, generator=gen)  # dark
    return real, fake


def test_discriminator_fit_separates_real_from_fake_and_the_logit_is_the_reward():
    reward = random_discriminator("tiny")
    real, fake = _two_distributions()
    before = reward(real).scores.mean() - reward(fake).scores.mean()
    losses = reward.fit(real, fake, steps=150, lr=3e-3, batch_size=32)
    assert losses[-1] < 0.3 < losses[0]
    held_real, held_fake = _two_distributions(8, seed=1)
    after_real, after_fake = reward(held_real).scores, reward(held_fake).scores
    assert after_real.min() > after_fake.max()  # held-out samples are ranked right
    assert after_real.mean() - after_fake.mean() > before + 2
    assert not any(p.requires_grad for p in reward.parameters())  # frozen again after fitting
    with pytest.raises(RewardInputError, match=r"must be in \[0, 1\]"):
        reward.fit(real * 2, fake, steps=1)


def test_discriminator_head_save_and_load_round_trip(tmp_path):
    reward = random_discriminator("tiny", seed=1)
    real, fake = _two_distributions(8)
    reward.fit(real, fake, steps=5)
    path = reward.save_head(tmp_path / "head.safetensors")

    other = DiscriminatorReward(reward.encoder).load_head(path)
    torch.testing.assert_close(other(real).scores, reward(real).scores)

    # load_discriminator rebuilds encoder + head; the encoder is a saved transformers folder
    reward.encoder.model.save_pretrained(tmp_path / "encoder")
    loaded = build_reward("discriminator", head=str(path), encoder=str(tmp_path / "encoder"))
    torch.testing.assert_close(loaded(real).scores, reward(real).scores, rtol=1e-5, atol=1e-5)

    # the head records its encoder: with a named source, only the head file is needed
    reward.encoder.source = str(tmp_path / "encoder")
    path2 = reward.save_head(tmp_path / "head2.safetensors")
    torch.testing.assert_close(load_discriminator(str(path2))(real).scores, reward(real).scores, rtol=1e-5, atol=1e-5)


def test_discriminator_on_an_open_clip_encoder():
    reward = random_discriminator("tiny", kind="open_clip")
    assert reward.encoder.kind == "open_clip" and reward.head.feature_dim == reward.encoder.dim
    assert reward(torch.rand(3, 3, 40, 40)).scores.shape == (3,)


# ----------------------------------------------------------------------------------------------- video
def test_frame_sampling_is_uniform():
    assert sample_frame_indices(8, 4).tolist() == [0, 2, 5, 7]
    assert sample_frame_indices(8, 1).tolist() == [0]
    assert sample_frame_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    assert sample_frame_indices(3, 8).tolist() == [0, 1, 2]
    values = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 4.0]])
    assert reduce_frames(values, "mean").tolist() == [pytest.approx(2 / 3), pytest.approx(5 / 3)]
    assert reduce_frames(values, "min").tolist() == [-2.0, 0.5]
    assert reduce_frames(values, "first").tolist() == [1.0, 0.5]


@pytest.mark.parametrize("reduce", ["mean", "min", "first"])
def test_video_adapter_equals_per_frame_scores(reduce):
    image_reward = build_random_reward("clip")
    video = VideoReward(image_reward, frames=3, reduce=reduce)
    media = torch.rand(2, 7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle moving left", "a blue square moving up"]
    out = video(media, prompts)
    idx = [0, 3, 6]
    per_frame = torch.stack([image_reward(media[:, i], prompts).scores for i in idx], dim=1)
    torch.testing.assert_close(out.scores, reduce_frames(per_frame, reduce))
    assert video.spec.name == "video(clip)" and video.spec.modalities == ("video",)
    with pytest.raises(RewardInputError, match="scores videos, not images"):
        video(media[:, 0], prompts)


def test_video_spec_string_wraps_a_registered_reward():
    video = build_random_reward("video(reward=clip(hessel=true),frames=2,reduce=min)")
    assert isinstance(video, VideoReward) and video.reward.hessel and video.frames == 2 and video.reduce == "min"
    out = video(torch.rand(2, 5, 3, 32, 32), ["a", "b"])
    assert "cosine" in out.components and (out.scores >= 0).all()


def test_temporal_consistency():
    reward = TemporalConsistencyReward(FeatureEncoder.random("dinov2", "tiny"))
    still = torch.rand(1, 1, 3, 32, 32).expand(2, 6, 3, 32, 32)
    torch.testing.assert_close(reward(still).scores, torch.ones(2))
    flicker = torch.rand(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (reward(flicker).scores < 1 - 1e-4).all()
    # the mean of consecutive-frame cosines, nothing else
    f = torch.nn.functional.normalize(reward.encoder(flicker.flatten(0, 1)).float(), dim=-1).view(2, 6, -1)
    torch.testing.assert_close(reward(flicker).scores, (f[:, 1:] * f[:, :-1]).sum(-1).mean(1))


# ----------------------------------------------------------------------------------------------- oracle
def test_oracle_on_rendered_images_and_videos():
    from visalign.toyworld import judge_images, render_images, render_videos

    captions = ["a red circle", "a blue square on the left", "a green triangle on the top"]
    images, _ = render_images(captions, seed=0)
    oracle = build_reward("oracle")
    out = oracle(images, captions)
    assert out.scores.tolist() == [1.0, 1.0, 1.0] and out.valid.all()
    assert torch.isnan(out.components["position_ok"][0]) and out.components["position_ok"][1] == 1.0

    wrong = ["a red square", "a blue square on the right", "hello world"]
    out = oracle(images, wrong)
    assert out.scores.tolist() == [0.0, 0.0, 0.0] and out.valid.tolist() == [True, True, False]
    partial = build_reward("oracle(score=partial)")(images, wrong)
    assert partial.scores.tolist() == [0.5, pytest.approx(2 / 3), 0.0]
    # one attribute alone: right shape / wrong position; a caption naming no position is not judged
    shape = build_reward("oracle(score=shape)")(images, wrong)
    assert shape.scores.tolist() == [0.0, 1.0, 0.0] and shape.valid.tolist() == [True, True, False]
    position = build_reward("oracle(score=position)")(images, wrong)
    assert position.scores.tolist() == [0.0, 0.0, 0.0] and position.valid.tolist() == [False, True, False]
    assert build_reward("oracle(score=position)")(images, captions).scores.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one of color, shape, position"):
        build_reward("oracle(score=size)")

    vcaps = ["a red circle moving left", "a cyan triangle moving down"]
    videos, _ = render_videos(vcaps, seed=0)
    out = oracle(videos, vcaps)
    assert out.scores.tolist() == [1.0, 1.0] and set(out.components) >= {"direction_ok", "consistent"}
    assert oracle(videos, ["a red circle moving right", "a cyan triangle moving down"]).scores.tolist() == [0.0, 1.0]
    direction = build_reward("oracle(score=direction)")
    assert direction(videos, ["a red circle moving right", "a red triangle moving down"]).scores.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="applies to images only"):
        build_reward("oracle(score=position)")(videos, vcaps)
    # dense: fractions of frames (colour, shape credit, both) and the displacement over the 6 px threshold
    dense = build_reward("oracle(score=dense)")
    assert dense(videos, vcaps).scores.tolist() == [1.0, 1.0]
    assert dense(videos, ["a red circle moving right", "a green triangle moving down"]).scores.tolist() == [0.75, 0.5]
    half = videos.clone()
    half[:, 1:5] = torch.tensor([240, 240, 240]).view(3, 1, 1) / 255  # four of eight frames lose the object
    assert dense(half, vcaps).scores.tolist() == [0.625, 0.625]
    assert dense(images, captions).scores.tolist() == [1.0, 1.0, 1.0]
    from visalign.toyworld.oracle import shape_credit

    circle_fill = judge_images(images[:1], ["a red circle"])[0].fill_ratio
    assert circle_fill == pytest.approx(0.785, abs=0.01)  # pi/4: 0.115 under the square band, credit about 0.2
    circle_as_square = (1 + shape_credit(circle_fill, "square")) / 2
    assert 0.6 < circle_as_square < 0.7
    assert dense(images, wrong).scores.tolist() == [pytest.approx(circle_as_square), pytest.approx(2 / 3), 0.0]
    # a narrower credit: the circle drawn for "a red square" (0.115 under the band) earns no shape credit at 0.05
    narrow = build_reward("oracle(score=dense, shape_width=0.05)")
    assert narrow(images, wrong).scores.tolist()[0] == pytest.approx(0.5)
    assert narrow(images, captions).scores.tolist() == [1.0, 1.0, 1.0]
    from reward_models.oracle import OracleReward
    from visalign.toyworld.oracle import SHAPE_CREDIT_WIDTH

    assert OracleReward().shape_width == SHAPE_CREDIT_WIDTH
    with pytest.raises(ValueError, match="shape_width must be > 0"):
        build_reward("oracle(score=dense, shape_width=0)")


def test_shape_credit_grows_toward_the_named_band():
    from visalign.toyworld.oracle import shape_credit

    assert shape_credit(0.95, "square") == 1.0 and shape_credit(0.80, "square") == pytest.approx(1 / 3)
    assert shape_credit(0.85, "square") == pytest.approx(2 / 3) and shape_credit(0.70, "square") == 0.0
    assert shape_credit(0.80, "circle") == 1.0 and shape_credit(0.95, "circle") == pytest.approx(2 / 3)
    assert shape_credit(0.65, "triangle") == pytest.approx(0.8) and shape_credit(None, "circle") == 0.0
    # a rendered square shrunk by rounding its corners: its image credit falls but stays above zero
    from visalign.toyworld import judge_images

    img = torch.full((1, 3, 64, 64), 240 / 255)
    img[:, :, 20:44, 20:44] = torch.tensor([220, 40, 40]).view(1, 3, 1, 1) / 255
    for dy, dx in [(0, 0), (0, 1), (1, 0), (0, 22), (0, 23), (1, 23), (22, 0), (23, 0), (23, 1)]:
        img[:, :, 20 + dy, 20 + dx] = 240 / 255  # three corners clipped a little: still a square
    assert judge_images(img, ["a red square"])[0].shape_ok
    assert build_reward("oracle(score=dense)")(img, ["a red square"]).scores.item() == 1.0
    round_ = img.clone()
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    corner = (
        ((yy - 31.5).abs() > 2)
        & ((xx - 31.5).abs() > 2)
        & (((yy - 31.5).abs() - 2) ** 2 + ((xx - 31.5).abs() - 2) ** 2 > 100)
    )
    round_[:, :, corner & (yy >= 20) & (yy < 44) & (xx >= 20) & (xx < 44)] = 240 / 255
    fill = judge_images(round_, ["a red square"])[0].fill_ratio
    assert 0.75 < fill < 0.9
    score = build_reward("oracle(score=dense)")(round_, ["a red square"]).scores.item()
    assert score == pytest.approx((1 + shape_credit(fill, "square")) / 2) and 0.5 < score < 1.0
