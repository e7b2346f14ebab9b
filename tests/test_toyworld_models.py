"""The shapes-world models: toy tokenizer, pretraining recipes (2-step smoke runs), the shipped models in
``assets/toyworld/`` (load offline, sample, stay inside the quality band), and ``visalign toy``.

toy-video (a ``WanPipeline``) has its own section: its training shortcuts equal Diffusers' computation, its frozen
text encoder keeps the direction words apart, a CLI smoke run, and the shipped model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from apps import toy
from visalign.models import load_model
from visalign.toyworld import caption_texts, judge_images, judge_videos, sampling_defaults, summarize
from visalign.toyworld.evaluate import clip_hard_negative_accuracy, eval_captions, hard_negatives
from visalign.toyworld.pretrain import (
    PretrainConfig,
    encode_prompt_trainable,
    lr_at,
    pretrain,
    tokenize,
)
from visalign.toyworld.pretrain_clip import multi_positive_nce
from visalign.toyworld.recipes import build_toy_flow, build_toy_sd, build_toy_video, load_toy_clip, toy_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toyworld"
SHIPPED = ("toy-sd", "toy-flow")
VIDEO_SIZE = {"height": 32, "width": 32, "num_frames": 8}
MAX_MODEL_BYTES = 10 * 2**20


# ----------------------------------------------------------------------------------------------- recipes
def test_toy_tokenizer_keeps_world_words_whole_and_reloads(tmp_path):
    from transformers import CLIPTokenizer

    tok = toy_tokenizer()
    assert len(tok) < 1000 and tok.model_max_length == 16
    captions = caption_texts() + caption_texts(video=True)
    for caption, ids in zip(captions, tok(captions).input_ids):
        assert len(ids) == len(caption.split()) + 2  # one token per word, plus BOS and EOS
    assert tok.convert_ids_to_tokens(tok("a zebra").input_ids)[2:4] == ["z", "e"]  # unknown words: bytes
    tok.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)("a cyan square").input_ids == tok("a cyan square").input_ids


@pytest.mark.parametrize("build", [build_toy_sd, build_toy_flow], ids=["toy-sd", "toy-flow"])
def test_trainable_prompt_encoding_equals_the_pipeline(build):
    from visalign.models import FAMILIES

    pipe = build(seed=0)
    family = "sd" if build is build_toy_sd else "sd3"
    model = FAMILIES[family](pipe)
    prompts = ["a red circle on the left", ""]
    expected = model.encode_prompt(prompts)
    got = encode_prompt_trainable(model, tokenize(pipe.tokenizer, prompts))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_multi_positive_nce_exact_value():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    truth = torch.tensor([[True, False, True], [False, False, False]])  # the second row has no positive
    p = torch.softmax(logits[0], dim=0)
    assert multi_positive_nce(logits, truth).item() == pytest.approx(-math.log(p[0] + p[2]))


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_hard_negatives_and_eval_captions():
    negs = hard_negatives("a red circle on the left")
    assert len(negs["color"]) == 5 and negs["shape"] == ["a red square on the left", "a red triangle on the left"]
    assert negs["position"] == ["a red circle on the right"] and hard_negatives("a red circle")["position"] == []
    held_out = eval_captions(20, 0, "held_out")
    assert sorted(held_out[:10]) == sorted(caption_texts("held_out")) and held_out[10:] == held_out[:10]


# ----------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """2-step pretraining runs of each recipe (the VAE stage included for toy-sd)."""
    root = tmp_path_factory.mktemp("toy-pretrain")
    small = dict(
        steps=2,
        batch_size=2,
        vae_steps=2,
        vae_batch_size=2,
        train_images=4,
        stats_images=4,
        check_images=4,
        sample_every=1,
        sample_steps=2,
        progress=False,
        log_every=1,
    )
    outs = {}
    outs["toy-sd"] = pretrain(PretrainConfig(model="toy-sd", out=str(root / "toy-sd"), **small))
    # toy-flow reuses toy-sd's VAE, as the shipped toy-flow does; narrower than shipped, with a stage saved at step 1
    outs["toy-flow"] = pretrain(PretrainConfig(model="toy-flow", out=str(root / "toy-flow"), vae=str(outs["toy-sd"]),
                                               flow_width=32, save_every=1, **small))  # fmt: skip
    # with spoilt-square negatives (toy-clip-corners' recipe)
    outs["toy-clip"] = pretrain(PretrainConfig(model="toy-clip", out=str(root / "toy-clip"), near_miss=1.0, **small))
    # the shipped toy-sd's recipe: toy-flow's text encoder frozen, v-prediction with zero terminal SNR
    outs["toy-sd-v"] = pretrain(PretrainConfig(model="toy-sd", out=str(root / "toy-sd-v"), vae=str(outs["toy-sd"]),
                                               text_encoder=str(outs["toy-flow"]), prediction="v_prediction",
                                               zero_snr=True, **small))  # fmt: skip
    return outs


@pytest.mark.parametrize("name", ["toy-sd", "toy-flow"])
def test_pretraining_smoke_writes_a_loadable_pipeline(smoke, name):
    from diffusers import DiffusionPipeline

    out = smoke[name]
    info = json.loads((out / "toyworld.json").read_text())
    assert info["model"] == name and info["recipe"]["steps"] == 2 and info["sampling"]["steps"] == 2
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,lr,seconds" and all(math.isfinite(float(r.split(",")[2])) for r in rows[1:])
    assert (out / "samples.png").is_file() and (out / "samples" / "step_000001.png").is_file()
    model = load_model(out)
    assert model.family == ("sd" if name == "toy-sd" else "sd3")
    sample = model.sample(
        ["a red circle"], steps=2, guidance=2.0, height=64, width=64, generator=torch.Generator().manual_seed(0)
    )
    assert sample.pixels.shape == (1, 3, 64, 64)
    # plain Diffusers loads it too (SD3 saved without T5 needs the absent components named, as Diffusers requires)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if name == "toy-flow" else {}
    pipe = DiffusionPipeline.from_pretrained(out, **extra)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_toy_flow_width_and_stages(smoke):
    """``--flow_width`` sets the SD3 transformer's width (heads of 16); ``--save_every`` saves loadable stages."""
    out = smoke["toy-flow"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    keys = ("num_attention_heads", "attention_head_dim", "caption_projection_dim")
    assert [config[k] for k in keys] == [2, 16, 32]
    info = json.loads((out / "toyworld.json").read_text())
    assert "--flow_width 32 --save_every 1" in info["command"] and list(info["stage_grid_oracle"]) == ["1"]
    stage = out / "stages" / "step_000001"
    assert json.loads((stage / "toyworld.json").read_text())["sampling"]["height"] == 64
    assert load_model(stage).family == "sd3"
    shipped = json.loads((ASSETS / "toy-flow" / "transformer" / "config.json").read_text())
    default = build_toy_flow(seed=0).transformer.config
    assert shipped["num_attention_heads"] == default.num_attention_heads == 4  # the default rebuilds the shipped one
    assert shipped["caption_projection_dim"] == default.caption_projection_dim


def test_frozen_text_encoder_and_zero_terminal_snr(smoke):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(smoke["toy-sd-v"])
    sched = pipe.scheduler.config

    def weights(module):
        return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}

    source, kept = weights(load_model(smoke["toy-flow"]).pipe.text_encoder), weights(pipe.text_encoder)
    assert kept and all(torch.equal(v, source[k]) for k, v in kept.items())  # frozen: exactly toy-flow's weights
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert (sched["prediction_type"], sched["rescale_betas_zero_snr"], sched["timestep_spacing"]) == (
        "v_prediction",
        True,
        "trailing",
    )
    model = load_model(smoke["toy-sd-v"])
    assert float(model.alphas_cumprod[-1]) == 0.0  # pure noise at t = T: nothing of x0 leaks into x_T
    x0, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    t = torch.tensor([999.0])
    torch.testing.assert_close(model.target(x0, noise, t), -x0)  # v = sqrt(a) eps - sqrt(1 - a) x0 with a = 0


def test_pretraining_smoke_toy_clip_loads_both_ways(smoke):
    import open_clip

    out = smoke["toy-clip"]
    model, tokenizer = load_toy_clip(out)
    open_clip.add_model_config(out / "toy-clip.json")
    again = open_clip.create_model("toy-clip", pretrained=str(out / "open_clip_model.safetensors")).eval()
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model.encode_image(images), again.encode_image(images))
    text = open_clip.get_tokenizer("toy-clip")(["a red circle"])
    assert text.shape == (1, 16) and torch.equal(text, tokenizer(["a red circle"]))
    report = json.loads((out / "toyworld.json").read_text())["hard_negative_accuracy"]
    assert report["all"]["n"] == 256 and 0 <= report["all"]["accuracy"] <= 1


def test_pretrain_refuses_a_non_empty_folder_and_bad_settings(tmp_path):
    from visalign.errors import ConfigError

    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        pretrain(PretrainConfig(model="toy-clip", out=str(tmp_path)))
    with pytest.raises(ConfigError, match="unknown model"):
        PretrainConfig(model="toy-gan", out=str(tmp_path))
    with pytest.raises(ConfigError, match="save_every"):
        PretrainConfig(model="toy-clip", out=str(tmp_path), save_every=100)
    with pytest.raises(ConfigError, match="flow_width shapes toy-flow only"):
        PretrainConfig(model="toy-sd", out=str(tmp_path), flow_width=128)
    with pytest.raises(ConfigError, match="flow_width must be a multiple of 16"):
        PretrainConfig(model="toy-flow", out=str(tmp_path), flow_width=50)
    with pytest.raises(ConfigError, match="video_patch must be 1, 2 or 4"):
        PretrainConfig(model="toy-video", out=str(tmp_path), video_patch=3)
    with pytest.raises(ConfigError, match="video_width must be a multiple of 16"):
        PretrainConfig(model="toy-video", out=str(tmp_path), video_width=40)
    with pytest.raises(ConfigError, match="toy-video only"):
        PretrainConfig(model="toy-flow", out=str(tmp_path), video_width=64)
    with pytest.raises(ConfigError, match="near_miss is a probability"):
        PretrainConfig(model="toy-clip", out=str(tmp_path), near_miss=2.0)
    with pytest.raises(ConfigError, match="drop it for toy-sd"):
        PretrainConfig(model="toy-sd", out=str(tmp_path), near_miss=0.5)


def test_toy_clip_near_misses_are_negatives_of_every_caption():
    """add_near_misses appends one twin per square (chance 1), none at chance 0, with no caption true of it; the
    loss then skips the twin's own row and counts it against its caption's true images."""
    from visalign.toyworld.captions import caption_texts
    from visalign.toyworld.pretrain_clip import add_near_misses, caption_truth, multi_positive_nce
    from visalign.toyworld.render import render_images

    captions = ["a red square", "a blue circle", "a green square on the left", "a yellow triangle"]
    images, scenes = render_images(captions, seed=0)
    held_in = caption_texts("held_in")
    truth = caption_truth(scenes, held_in)
    rng = np.random.default_rng(0)
    more, more_truth = add_near_misses(images, truth, scenes, 1.0, rng)
    assert more.shape[0] == 6 and torch.equal(more[:4], images)
    assert torch.equal(more_truth[:4], truth) and not more_truth[4:].any()
    assert add_near_misses(images, truth, scenes, 0.0, rng)[0] is images
    # "a red square" scoring its twin (row 4) as high as the exact square (row 0) costs log 2; without twins, ~0
    red = held_in.index("a red square")
    logits = torch.full((6, len(held_in)), -30.0)
    logits[0, red] = logits[4, red] = 5.0
    assert multi_positive_nce(logits.T[[red]], more_truth.T[[red]]).item() == pytest.approx(math.log(2))
    assert multi_positive_nce(logits[:4].T[[red]], truth.T[[red]]).item() == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------------------------- shipped models
def folder_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in path.rglob(f"*{suffix}"))


@pytest.mark.parametrize("name", [*SHIPPED, "toy-video", "toy-clip", "toy-clip-corners"])
def test_shipped_models_are_small(name):
    assert (ASSETS / name).is_dir(), f"{name} is missing from assets/toyworld"
    assert 0 < folder_bytes(ASSETS / name) <= MAX_MODEL_BYTES


@pytest.fixture(scope="module")
def shipped():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(ASSETS / name)
        return cache[name]

    return get


# toy-sd's band runs by default; toy-flow's and toy-video's (15 s each, assets that rarely change) with -m slow
@pytest.mark.parametrize("name", ["toy-sd", pytest.param("toy-flow", marks=pytest.mark.slow)])
def test_shipped_model_stays_inside_the_quality_band(shipped, name):
    """Object rate >= 90% and strict held-in accuracy <= 85% (room to align) on 64 held-in captions, fixed seeds,
    at the model's guidance and 10 steps (the recorded default is 20; on these 64 the figures agree within 2
    points). The figures measured on 512 samples are in assets/toyworld/README.md."""
    model = shipped(name)
    sampling = sampling_defaults(ASSETS / name)
    captions = eval_captions(64, 0, "held_in")
    _, verdicts = toy.sample_and_judge(
        model, captions, list(range(64)), steps=10, guidance=sampling["guidance"], batch_size=64, progress=False
    )
    s = summarize(verdicts)["held_in"]
    assert s["object_rate"] >= 0.90, s
    assert s["strict_acc"] <= 0.85, s
    assert s["strict_acc"] >= 0.25, s  # and it did learn the world (random weights score ~0)


@pytest.mark.parametrize("name", ["toy-clip", "toy-clip-corners"])
def test_shipped_toy_clip_ranks_true_captions_above_hard_negatives(name):
    model, tokenizer = load_toy_clip(ASSETS / name)
    report = clip_hard_negative_accuracy(model, tokenizer, n=90, seed=0)
    assert report["held_in"]["accuracy"] >= 0.95 and report["held_out"]["accuracy"] >= 0.7


def test_shipped_toy_clip_corners_is_its_recipe():
    """toy-clip-corners is toy-clip's recipe with a spoilt twin for every square, 4,000 steps (toyworld.json)."""
    info = json.loads((ASSETS / "toy-clip-corners" / "toyworld.json").read_text())
    assert info["recipe"]["near_miss"] == 1.0 and info["recipe"]["steps"] == 4000
    assert "--near_miss 1" in info["command"]


def test_both_toy_clips_prefer_an_exact_square_to_its_spoilt_twin():
    """On exact renders the spoilt twin is easy: toy-clip prefers the square in 98 of 100, toy-clip-corners in all
    100 (what they differ on is a model's soft-edged samples, the slow test below)."""
    from reward_models import build_reward
    from visalign.toyworld.render import draw_near_miss, render_images, to_tensor

    captions = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "purple")] * 20
    images, scenes = render_images(captions, seed=12345)
    rng = np.random.default_rng(99)
    twins = to_tensor(np.stack([draw_near_miss(s, rng) for s in scenes]))
    wins = {}
    for name in ("toy-clip", "toy-clip-corners"):
        reward = build_reward(f"clip(model={ASSETS / name})")
        wins[name] = int((reward(images, captions).scores > reward(twins, captions).scores).sum())
    assert wins["toy-clip-corners"] == 100 and wins["toy-clip"] >= 95, wins


@pytest.mark.slow
def test_toy_clip_corners_sees_toy_flow_s_rounded_squares():
    """On 130 of toy-flow's square samples (20 steps, CFG 3), toy-clip-corners ranks the ones the oracle calls
    square above the rounded ones far more often than toy-clip does (AUC 0.73 against 0.57 when measured)."""
    from reward_models import build_reward

    model = load_model(ASSETS / "toy-flow")
    captions = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "purple")] * 26
    out = model.sample(captions, steps=20, guidance=3.0, height=64, width=64,
                       generator=torch.Generator().manual_seed(7))  # fmt: skip
    right = np.array([v.strict for v in judge_images(out.pixels, captions)])
    auc = {}
    for name in ("toy-clip", "toy-clip-corners"):
        s = build_reward(f"clip(model={ASSETS / name})")(out.pixels, captions).scores.numpy()
        auc[name] = (s[right][:, None] > s[~right][None, :]).mean()
    assert 10 <= right.sum() <= 120, right.sum()
    assert auc["toy-clip-corners"] >= 0.68 and auc["toy-clip-corners"] >= auc["toy-clip"] + 0.1, auc


def test_reference_renders_pass_the_oracle():
    from PIL import Image

    from visalign.media import read_video
    from visalign.toyworld.render import to_tensor

    for kind in ("images", "videos"):
        folder = ASSETS / "reference" / kind
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows]
        if kind == "images":
            import numpy as np

            media = to_tensor(np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows]))
            summary = summarize(judge_images(media, prompts))
        else:
            media = torch.stack([read_video(folder / r["file"]) for r in rows])
            summary = summarize(judge_videos(media, prompts))
        assert summary["all"]["strict_acc"] == 1.0 and summary["held_out"]["n"] > 0
    for split, count in (("captions", 90), ("held_in", 80), ("held_out", 10), ("video_captions", 72)):
        assert len((ASSETS / "prompts" / f"{split}.txt").read_text().splitlines()) == count


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_render_and_evaluate(tmp_path, capsys):
    toy.main(["render", "--out", str(tmp_path / "r"), "--n", "5", "--seed", "1", "--split", "held_out"])
    rows = [json.loads(line) for line in (tmp_path / "r" / "metadata.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["held_out"] * 5 and (tmp_path / "r" / "00004.png").is_file()
    toy.main(
        [
            "evaluate",
            "--model",
            str(ASSETS / "toy-sd"),
            "--out",
            str(tmp_path / "e"),
            "--n",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
        ]
    )
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["summary"]["held_in"]["n"] == 2 and report["summary"]["held_out"]["n"] == 2
    assert len(report["samples"]) == 4 and (tmp_path / "e" / "grid.png").is_file()
    assert "object rate" in capsys.readouterr().out
    toy.main(["evaluate", "--model", str(ASSETS / "toy-clip"), "--out", str(tmp_path / "c"), "--n", "8"])
    assert json.loads((tmp_path / "c" / "report.json").read_text())["hard_negative_accuracy"]["all"]["n"] == 8


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        toy.main(["--help"])
    assert e.value.code == 0 and "visalign toy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        toy.main(["evaluate", "--help"])
    assert e.value.code == 0 and "--lora" in capsys.readouterr().out


def test_collapsed_t5_zeros_equal_the_full_sequence():
    """Training toy-flow on one zero token with a log(256) key bias computes exactly the 256-zero forward."""
    from visalign.models import FAMILIES
    from visalign.toyworld.pretrain import collapse_t5_zeros, collapsed_t5_zeros

    model = FAMILIES["sd3"](build_toy_flow(seed=0))
    cond = model.encode_prompt(["a red circle on the left", "a cyan square"])
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([300.0, 900.0])
    full = model.predict(x_t, t, cond)
    with collapsed_t5_zeros(model):
        collapsed = model.predict(x_t, t, collapse_t5_zeros(cond, 16))
    assert cond["encoder_hidden_states"].shape[1] == 16 + 256
    torch.testing.assert_close(collapsed, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.predict(x_t, t, cond), full, rtol=0, atol=0)  # the plain processor is back


# ----------------------------------------------------------------------------------------------- toy-video
@pytest.fixture(scope="module")
def video_pipe():
    """A randomly initialised toy-video with its weights perturbed (zero-initialised outputs would hide bugs)."""
    pipe = build_toy_video(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pipe


def test_toy_video_architecture_options_reach_the_transformer():
    """``--video_patch`` / ``--video_width`` set Wan's patch and width (heads of 16, FFN twice as wide)."""
    config = build_toy_video(seed=0, patch=2, width=64).transformer.config
    assert list(config.patch_size) == [1, 2, 2]
    assert (config.num_attention_heads, config.attention_head_dim, config.ffn_dim) == (4, 16, 128)
    default = build_toy_video(seed=0).transformer.config
    assert list(default.patch_size) == [1, 4, 4] and default.num_attention_heads * default.attention_head_dim == 128
    shipped = json.loads((ASSETS / "toy-video" / "transformer" / "config.json").read_text())
    same = ("patch_size", "num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers")
    assert {k: shipped[k] for k in same} == {k: list(default[k]) if k == "patch_size" else default[k] for k in same}


def test_toy_video_training_shortcuts_equal_diffusers(video_pipe):
    """Whole-clip VAE passes equal Diffusers' chunked encode/decode; the collapsed prompt padding (7 tokens with a
    key bias) equals attending to WanPipeline's 512 zero-padded tokens."""
    from visalign.models.wan import WanModel
    from visalign.toyworld.pretrain_video import collapsed_padding, compact_prompt_embeds, vae_forward

    model = WanModel(video_pipe)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 8, 32, 32, generator=g) * 2 - 1
    recon, posterior = vae_forward(model.vae, video, torch.Generator().manual_seed(2))
    diffusers_mean = model.vae.encode(torch.cat([video, video[:, :, -1:]], 2)).latent_dist.mean[:, :, :8]
    torch.testing.assert_close(posterior.mean, diffusers_mean, rtol=1e-4, atol=1e-4)
    z = posterior.sample(torch.Generator().manual_seed(2))  # the latent vae_forward decoded
    torch.testing.assert_close(recon.clamp(-1, 1), model.vae.decode(z).sample, rtol=1e-4, atol=1e-4)

    prompts = ["a red circle moving left", "", "a cyan square moving up"]
    cond = model.encode_prompt(prompts)
    embeds, bias = compact_prompt_embeds(model, prompts)
    assert embeds.shape == (3, 7, 32) and cond["prompt_embeds"].shape == (3, 512, 32)
    assert bias[0, -1] == pytest.approx(math.log(512 - 6)) and bias[1, 1] == pytest.approx(math.log(511 / 6))
    x_t, t = torch.randn(3, 4, 8, 16, 16, generator=g), torch.tensor([100.0, 500.0, 900.0])
    full = model.predict(x_t, t, cond)
    with collapsed_padding(model.denoiser) as processor:
        processor.bias = bias[:, None, None, :]
        collapsed = model.predict(x_t, t, {"prompt_embeds": embeds})
    torch.testing.assert_close(collapsed, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.predict(x_t, t, cond), full, rtol=0, atol=0)  # Diffusers' processor is back


def direction_token_distances(pipe) -> tuple[float, float]:
    """For "a red circle moving {left,right,up,down}": the smallest distance between the text encoder's outputs at
    the direction word, and their mean norm."""
    from visalign.models.wan import WanModel

    model = WanModel(pipe)
    embeds = model.encode_prompt([f"a red circle moving {d}" for d in ("left", "right", "up", "down")])
    at_word = embeds["prompt_embeds"][:, 4]
    distances = torch.cdist(at_word, at_word)
    return float(distances[~torch.eye(4, dtype=torch.bool)].min()), float(at_word.norm(dim=-1).mean())


def test_toy_video_text_encoder_keeps_directions_apart(video_pipe):
    """The frozen random UMT5 encoder separates the direction words about as far as unrelated random vectors
    (sqrt(2) x their norm): the collapse that made toy-sd ignore position words cannot happen."""
    closest, norm = direction_token_distances(video_pipe)
    assert closest > 0.8 * norm, (closest, norm)


@pytest.fixture(scope="module")
def video_smoke(tmp_path_factory):
    """A 3-step toy-video pretraining run from the CLI (VAE stage included), with a stage saved at step 2."""
    out = tmp_path_factory.mktemp("toy-video") / "run"
    toy.main(["pretrain", "--model", "toy-video", "--out", str(out), "--seed", "0", "--steps", "3",
              "--batch_size", "2", "--vae_steps", "2", "--vae_batch_size", "2", "--train_images", "4",
              "--stats_images", "4", "--check_images", "4", "--sample_every", "2", "--save_every", "2",
              "--sample_steps", "2", "--log_every", "1", "--progress", "false"])  # fmt: skip
    return out


@pytest.mark.slow  # 40 s on 2 cores; the shared pretraining loop runs by default in the toy-sd/toy-flow smoke
def test_toy_video_pretraining_smoke_writes_a_loadable_pipeline(video_smoke):
    from diffusers import AutoencoderKLWan, WanPipeline

    out = video_smoke
    info = json.loads((out / "toyworld.json").read_text())
    assert info["model"] == "toy-video" and info["recipe"]["steps"] == 3
    assert info["command"].startswith("visalign toy pretrain --model toy-video --out ")
    assert info["sampling"] == {"steps": 2, "guidance": 3.0, **VIDEO_SIZE}
    assert info["vae_reconstruction_oracle"]["all"]["n"] == 4 and len(info["latents_mean"]) == 4
    stages = [r.split(",")[0] for r in (out / "losses.csv").read_text().splitlines()[1:]]
    assert stages == ["vae", "vae", "toy-video", "toy-video", "toy-video"]
    assert (out / "samples.png").is_file() and (out / "samples" / "step_000002.png").is_file()
    stage = out / "stages" / "step_000002"
    assert json.loads((stage / "toyworld.json").read_text())["stage_step"] == 2
    vae = AutoencoderKLWan.from_pretrained(out / "vae")
    assert vae.config.latents_mean == info["latents_mean"] and vae.config.scale_factor_temporal == 1
    # the VAE was trained and its statistics set; the text encoder is exactly the seed's random one (frozen)
    fresh = build_toy_video(seed=0)
    assert not torch.equal(vae.quant_conv.weight, fresh.vae.quant_conv.weight)
    saved = WanPipeline.from_pretrained(out)
    for key, value in fresh.text_encoder.state_dict().items():
        torch.testing.assert_close(saved.text_encoder.state_dict()[key], value, rtol=0, atol=0)
    for folder in (out, stage):
        model = load_model(folder)
        assert model.family == "wan"
        video = model.sample(["a red circle moving left"], steps=2, guidance=3.0, **VIDEO_SIZE).pixels
        assert video.shape == (1, 8, 3, 32, 32)


def test_toy_video_vae_reuse_needs_a_wan_vae():
    from visalign.errors import ConfigError
    from visalign.toyworld.pretrain_video import load_video_vae

    assert load_video_vae(ASSETS / "toy-video").config.scale_factor_temporal == 1
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        load_video_vae(ASSETS / "toy-sd")  # an image AutoencoderKL


def test_shipped_toy_video_loads_and_samples_videos(shipped):
    """load_model and plain Diffusers both load it; samples are [N, 8, 3, 32, 32] in [0, 1] (plain WanPipeline
    returns 9 frames for num_frames=8: with temporal factor 1 it 'rounds' every count up by one)."""
    from diffusers import WanPipeline

    folder = ASSETS / "toy-video"
    model = shipped("toy-video")
    sampling = sampling_defaults(folder)
    assert {k: sampling[k] for k in VIDEO_SIZE} == VIDEO_SIZE
    out = model.sample(["a red circle moving left", "a cyan square moving up"], steps=4, guidance=3.0,
                       generator=torch.Generator().manual_seed(0), **VIDEO_SIZE)  # fmt: skip
    assert out.pixels.shape == (2, 8, 3, 32, 32) and out.latents.shape == (2, 4, 8, 16, 16)
    assert 0 <= out.pixels.min() and out.pixels.max() <= 1 and out.pixels.std() > 0.05
    pipe = WanPipeline.from_pretrained(folder)
    frames = pipe("a red circle moving left", num_inference_steps=2, output_type="pt", **VIDEO_SIZE).frames
    assert frames.shape == (1, 9, 3, 32, 32)
    info = json.loads((folder / "toyworld.json").read_text())
    assert info["vae_reconstruction_oracle"]["all"]["strict_acc"] >= 0.95


@pytest.mark.slow
def test_shipped_toy_video_stays_inside_the_quality_band(shipped):
    """On 32 held-in captions (fixed seeds, 10 steps, the recorded guidance): objects in >= 90% of the videos and
    strict accuracy <= 85% (room to align), but the world was learned. n=128 per split: assets/toyworld/README.md."""
    model = shipped("toy-video")
    captions = eval_captions(32, 0, "held_in", video=True)
    _, verdicts = toy.sample_and_judge(model, captions, list(range(32)), steps=10,
                                       guidance=sampling_defaults(ASSETS / "toy-video")["guidance"], batch_size=32,
                                       progress=False, **VIDEO_SIZE)  # fmt: skip
    s = summarize(verdicts)["held_in"]
    assert s["object_rate"] >= 0.90, s
    assert s["strict_acc"] <= 0.85, s
    assert s["strict_acc"] >= 0.25 and s["direction_acc"] >= 0.4, s


def test_cli_evaluate_a_video_model(tmp_path, capsys):
    toy.main(["evaluate", "--model", str(ASSETS / "toy-video"), "--out", str(tmp_path / "e"), "--n", "2",
              "--steps", "2", "--device", "cpu"])  # fmt: skip
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["family"] == "wan" and report["num_frames"] == 8
    held_in = report["summary"]["held_in"]
    assert held_in["n"] == 2 and "direction_acc" in held_in and "consistency" in held_in
    assert all(" moving " in s["caption"] for s in report["samples"]) and len(report["samples"]) == 4
    assert len(report["samples"][0]["colors"]) == 8 and (tmp_path / "e" / "grid.png").is_file()
    assert "direction held-in" in capsys.readouterr().out
