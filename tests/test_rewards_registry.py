"""Registry, spec strings, normalisation wrappers, composites, the text-embedding cache and bad-input errors."""

from __future__ import annotations

import pytest
import torch

from reward_models import (
    Affine,
    CheckpointError,
    Composite,
    RewardInputError,
    RewardSpecError,
    UnknownRewardError,
    ZScore,
    build_random_reward,
    build_reward,
    list_rewards,
    parse_reward_spec,
    register_reward,
    reward_spec,
)
from reward_models.base import RewardSpec
from visalign.errors import VisalignError

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle", "a red circle"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def clip():
    return build_random_reward("clip")


@pytest.fixture(scope="module")
def aesthetic():
    return build_random_reward("aesthetic")


# ----------------------------------------------------------------------------------------------- registry
def test_builtins_are_registered_with_metadata():
    names = list_rewards()
    for name in (
        "clip",
        "hps-v2",
        "hps-v2.1",
        "pickscore",
        "aesthetic",
        "imagereward",
        "discriminator",
        "video",
        "temporal-consistency",
        "oracle",
    ):
        assert name in names
    assert reward_spec("aesthetic").needs_prompt is False
    assert reward_spec("oracle").differentiable is False
    assert reward_spec("temporal-consistency").modalities == ("video",)
    assert reward_spec("pickscore").nominal_range == (18.0, 24.0)
    assert not any(reward_spec(n).pairwise for n in names)


def test_unknown_reward_lists_the_registered_ones():
    with pytest.raises(UnknownRewardError) as e:
        build_reward("hps-v3")
    message = str(e.value)
    assert "'hps-v3'" in message and "did you mean 'hps-v2'" in message
    assert all(name in message for name in list_rewards())
    assert isinstance(e.value, VisalignError)


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(RewardSpecError, match=r"accepted options: .*checkpoint") as e:
        build_reward("hps-v2.1(ckpt=/x.pt)")
    assert "version" not in str(e.value).split("accepted options:")[1]  # fixed by the entry, not an option
    with pytest.raises(RewardSpecError, match="fixes"):
        build_reward("hps-v2(version=v2.1)")


def test_parse_spec_strings():
    terms = parse_reward_spec("hps-v2.1:1.0, clip(model=ViT-B-32,pretrained='/a,b(c).pt',hessel=true):0.5")
    assert [t.name for t in terms] == ["hps-v2.1", "clip"]
    assert [t.weight for t in terms] == [1.0, 0.5]
    assert terms[1].options == {"model": "ViT-B-32", "pretrained": "/a,b(c).pt", "hessel": True}
    (video,) = parse_reward_spec("video(reward=clip(hessel=true),frames=4,reduce=min)")
    assert video.options == {"reward": "clip(hessel=true)", "frames": 4, "reduce": "min"}
    (remote,) = parse_reward_spec("remote:http://127.0.0.1:8000")  # positional sugar: NAME:ARG
    assert remote.args == ["http://127.0.0.1:8000"] and remote.weight is None
    (remote,) = parse_reward_spec("remote(http://127.0.0.1:8000,timeout=2.5):-1")
    assert remote.args == ["http://127.0.0.1:8000"] and remote.options == {"timeout": 2.5} and remote.weight == -1
    (plain,) = parse_reward_spec("  oracle ")
    assert plain.name == "oracle" and plain.weight is None and plain.options == {} and plain.args == []


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty reward spec"),
        ("clip,,aesthetic", "empty term"),
        ("clip(model=x", "unclosed"),
        ("clip)", "unbalanced"),
        ("clip x", "unexpected"),
        ("clip(model=x):heavy", "expected ':WEIGHT'"),
        ("clip(1bad=x)", "bad option name"),
        ("clip(model=a,model=b)", "given twice"),
        ("clip(model='x)", "unclosed quote"),
        ("clip:", "empty weight"),
    ],
)
def test_malformed_specs_are_errors(spec, match):
    with pytest.raises(RewardSpecError, match=match):
        parse_reward_spec(spec)


def test_single_term_builds_the_reward_itself_and_options_pass_through():
    reward = build_random_reward("clip", hessel=True)
    assert reward.hessel and reward.spec.name == "clip" and not isinstance(reward, Composite)
    assert build_random_reward("clip(hessel=true)").hessel
    with pytest.raises(RewardSpecError, match="single-reward specs"):
        build_random_reward("clip,aesthetic", hessel=True)


def test_register_a_new_reward():
    calls = []

    def load(scale: float = 1.0):
        calls.append(scale)
        return Affine(build_random_reward("aesthetic"), scale)

    spec = RewardSpec("test-scaled-aesthetic", needs_prompt=False)
    register_reward(spec, load, lambda size="tiny", scale=1.0: load(scale))
    try:
        assert "test-scaled-aesthetic" in list_rewards()
        reward = build_reward("test-scaled-aesthetic(scale=2)")
        assert calls == [2] and reward.scale == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward(spec, load)
    finally:
        from reward_models import registry

        registry._REGISTRY.pop("test-scaled-aesthetic")


# ----------------------------------------------------------------------------------------------- wrappers
def test_affine_and_zscore_math(aesthetic, images):
    raw = aesthetic(images).scores
    out = Affine(aesthetic, scale=-2.0, shift=3.0)(images)
    torch.testing.assert_close(out.scores, -2.0 * raw + 3.0)
    torch.testing.assert_close(out.components["raw"], raw)

    fixed = ZScore(aesthetic, mean=0.5, std=2.0)(images).scores
    torch.testing.assert_close(fixed, (raw - 0.5) / (2.0 + 1e-6))
    batch = ZScore(aesthetic)(images).scores
    torch.testing.assert_close(batch, (raw - raw.mean()) / (raw.std(correction=0) + 1e-6))
    calibrated = ZScore.calibrate(aesthetic, images)
    assert calibrated.mean == pytest.approx(float(raw.mean()))
    assert calibrated.std == pytest.approx(float(raw.std(correction=0)))

    unit = Affine.to_unit(build_random_reward("oracle"))
    assert unit.scale == 1.0 and unit.shift == 0.0  # oracle's nominal range is already [0, 1]
    with pytest.raises(RewardSpecError, match="both mean and std"):
        ZScore(aesthetic, mean=1.0)


def test_composite_weighted_sum_and_normalisations(clip, aesthetic, images):
    c = clip(images, PROMPTS).scores
    a = aesthetic(images).scores
    z = lambda x: (x - x.mean()) / (x.std(correction=0) + 1e-6)  # noqa: E731

    plain = build_random_reward("clip:2.0,aesthetic:-0.5")
    assert isinstance(plain, Composite) and plain.names == ["clip", "aesthetic"]
    assert plain.spec.needs_prompt and plain.spec.differentiable and plain.spec.modalities == ("image",)
    out = plain(images, PROMPTS)
    torch.testing.assert_close(out.scores, 2.0 * c - 0.5 * a)
    torch.testing.assert_close(out.components["clip"], c)
    torch.testing.assert_close(out.components["aesthetic"], a)

    before = build_random_reward("clip:2.0,aesthetic:-0.5", normalize="normalise-then-sum")(images, PROMPTS)
    torch.testing.assert_close(before.scores, 2.0 * z(c) - 0.5 * z(a))
    after = build_random_reward("clip:2.0,aesthetic:-0.5", normalize="sum-then-normalise")(images, PROMPTS)
    torch.testing.assert_close(after.scores, z(2.0 * c - 0.5 * a))
    fixed = build_random_reward("clip:2.0,aesthetic:-0.5", normalize="normalise-then-sum", stats={"clip": (0.1, 0.2)})
    torch.testing.assert_close(fixed(images, PROMPTS).scores, 2.0 * (c - 0.1) / (0.2 + 1e-6) - 0.5 * z(a))
    with pytest.raises(RewardSpecError, match="normalize must be one of"):
        build_random_reward("clip:1,aesthetic:1", normalize="rank")


def test_composite_of_the_same_reward_twice_gets_distinct_names(images):
    reward = build_random_reward("clip:1,clip(hessel=true):1")
    assert reward.names == ["clip", "clip(hessel=true)"]
    out = reward(images, PROMPTS)
    torch.testing.assert_close(out.scores, out.components["clip"] + out.components["clip(hessel=true)"])


def test_composite_valid_is_the_and_of_members(images):
    reward = build_random_reward("oracle:1,aesthetic:1")
    out = reward(images, PROMPTS[:3] + ["not a shapes-world caption"])
    assert out.valid.tolist() == [True, True, True, False]


def test_composite_gradient_flows(images):
    media = images.clone().requires_grad_(True)
    build_random_reward("clip:1,aesthetic:1", normalize="normalise-then-sum")(media, PROMPTS).scores.sum().backward()
    assert media.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- text cache
def test_text_embeddings_are_cached_per_unique_prompt(images):
    reward = build_random_reward("clip")
    first = reward(images, PROMPTS).scores
    assert len(reward.text_cache) == 3 and reward.text_cache.misses == 3 and reward.text_cache.hits == 1
    again = reward(images, PROMPTS).scores
    assert reward.text_cache.misses == 3 and reward.text_cache.hits == 5
    torch.testing.assert_close(first, again)
    reward.to(torch.float64)  # moving or casting the reward empties the cache (entries are per device/dtype)
    assert len(reward.text_cache) == 0
    reward.text_cache.max_size = 2
    reward.to(torch.float32)(images, PROMPTS)
    assert len(reward.text_cache) == 2


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "media, match",
    [
        (torch.rand(2, 32, 32, 3), r"expected images \[B, 3, H, W\] or videos"),
        (torch.rand(2, 3, 32), "got shape"),
        (torch.rand(2, 1, 32, 32), "RGB"),
        (torch.rand(2, 3, 32, 32) * 2 - 1, r"must be in \[0, 1\].*\(x \+ 1\) / 2"),
        (torch.rand(2, 3, 32, 32) * 255, "divide by 255"),
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "media.float\\(\\) / 255"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_media_are_clear_errors(clip, media, match):
    with pytest.raises(RewardInputError, match=match):
        clip(media, PROMPTS[:2])


def test_prompt_errors(clip, aesthetic, images):
    with pytest.raises(RewardInputError, match="got 4 media but 3 prompts"):
        clip(images, PROMPTS[:3])
    with pytest.raises(RewardInputError, match="needs one prompt per sample"):
        clip(images)
    with pytest.raises(RewardInputError, match="list of strings"):
        clip(images, "a red circle")
    with pytest.raises(RewardInputError, match="prompt 1 is int"):
        clip(images[:2], ["a", 3])
    with pytest.raises(RewardInputError, match="got 4 media but 1 prompts"):
        aesthetic(images, ["x"])  # prompts are optional but, when given, must match
    assert aesthetic(images).scores.shape == (4,)


def test_video_given_to_an_image_reward_suggests_the_adapter(clip):
    with pytest.raises(RewardInputError, match=r"wrap it: video\(reward=clip\)"):
        clip(torch.rand(2, 4, 3, 32, 32), PROMPTS[:2])
    with pytest.raises(RewardInputError, match="scores videos, not images"):
        build_random_reward("temporal-consistency")(torch.rand(2, 3, 32, 32))


def test_empty_batch_gives_empty_scores(clip):
    out = clip(torch.rand(0, 3, 32, 32), [])
    assert out.scores.shape == (0,) and out.valid.shape == (0,)


@pytest.mark.parametrize(
    "spec, options, match",
    [
        ("hps-v2.1", {"checkpoint": "/nonexistent/HPS_v2.1_compressed.pt"}, "HPS v2.1 checkpoint not found"),
        ("hps-v2", {"checkpoint": "/nonexistent/folder"}, "HPS v2.0 checkpoint not found"),
        ("aesthetic", {"checkpoint": "./missing.pth"}, "aesthetic MLP not found"),
        ("imagereward", {"checkpoint": "/nonexistent/ImageReward.pt"}, "ImageReward checkpoint not found"),
        ("discriminator", {"head": "/nonexistent/head.safetensors"}, "discriminator head not found"),
        ("clip", {"model": "ViT-B-32", "pretrained": "/nonexistent/w.pt"}, "not a file and not a tag of"),
        ("clip", {"model": "/nonexistent/clip-folder"}, "not a local folder and not a hub id"),
        ("clip", {"model": "ViT-B-32", "pretrained": None}, "needs pretrained=TAG or a weights file"),
        ("clip", {"model": "ViT-Q-99"}, "not an open_clip model name"),
        ("pickscore", {"model": "./no/such/dir"}, "neither a local folder nor a hub id"),
    ],
)
def test_missing_checkpoint_paths_are_clear_errors(spec, options, match):
    with pytest.raises(CheckpointError, match=match):
        build_reward(spec, **options)


def test_missing_file_in_an_existing_folder_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no HPS_v2.1_compressed.pt"):
        build_reward("hps-v2.1", checkpoint=str(tmp_path))
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no weights file"):
        build_reward("clip", model=str(tmp_path))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read aesthetic MLP"):
        build_reward(f"aesthetic(checkpoint={bad})")


def test_batch_normalisation_ignores_invalid_members():
    from reward_models.compose import zscore

    x = torch.tensor([1.0, 3.0, float("nan")])
    out = zscore(x, None, None, 0.0, torch.tensor([True, True, False]))
    assert out[:2].tolist() == [-1.0, 1.0] and torch.isnan(out[2])
