"""The shapes-world models: toy tokenizer, pretraining recipes (2-step smoke runs), the shipped models in
``assets/toyworld/`` (load offline, sample, stay inside the quality band), and ``visalign toy``."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
from visalign.toyworld.recipes import build_toy_flow, build_toy_sd, load_toy_clip, toy_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toyworld"
SHIPPED = ("toy-sd", "toy-flow")
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
    # toy-flow reuses toy-sd's VAE, as the shipped toy-flow does
    outs["toy-flow"] = pretrain(
        PretrainConfig(model="toy-flow", out=str(root / "toy-flow"), vae=str(outs["toy-sd"]), **small)
    )
    outs["toy-clip"] = pretrain(PretrainConfig(model="toy-clip", out=str(root / "toy-clip"), **small))
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
        "v_prediction", True, "trailing")
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


def test_pretrain_refuses_a_non_empty_folder(tmp_path):
    from visalign.errors import ConfigError

    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        pretrain(PretrainConfig(model="toy-clip", out=str(tmp_path)))
    with pytest.raises(ConfigError, match="unknown model"):
        PretrainConfig(model="toy-gan", out=str(tmp_path))


# ----------------------------------------------------------------------------------------------- shipped models
def folder_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in path.rglob(f"*{suffix}"))


@pytest.mark.parametrize("name", [*SHIPPED, "toy-clip"])
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


@pytest.mark.parametrize("name", SHIPPED)
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


def test_shipped_toy_clip_ranks_true_captions_above_hard_negatives():
    model, tokenizer = load_toy_clip(ASSETS / "toy-clip")
    report = clip_hard_negative_accuracy(model, tokenizer, n=90, seed=0)
    assert report["held_in"]["accuracy"] >= 0.95 and report["held_out"]["accuracy"] >= 0.7


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
