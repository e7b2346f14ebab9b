"""One contract test over every model family: load, sample, noise/target/predict, encode/decode, LoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import FAMILY_OF, TINY_PIPELINES, VIDEO

from visalign.models import FAMILIES, load_model

NAMES = list(TINY_PIPELINES)
PROMPTS = ["a red circle on the left", "a blue square"]


def media_kwargs(name):
    return {"height": 32, "width": 32, "num_frames": 5 if name in VIDEO else None}


def random_pixels(name, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 5, 3, 32, 32) if name in VIDEO else (batch, 3, 32, 32)
    return torch.rand(shape, generator=g)


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(tiny_pipeline_dir(name))
        return cache[name]

    return get


def training_inputs(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = model.encode(random_pixels(name, seed=seed), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = model.sample_timesteps(x0.shape[0], generator=g)
    return x0, noise, t, model.encode_prompt(PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_its_family_and_samples(loaded, name):
    model = loaded(name)
    assert type(model) is FAMILIES[FAMILY_OF[name]]
    out = model.sample(
        PROMPTS, steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0), **media_kwargs(name)
    )
    expected = (2, 5, 3, 32, 32) if name in VIDEO else (2, 3, 32, 32)
    assert tuple(out.pixels.shape) == expected
    assert out.pixels.dtype == torch.float32
    assert torch.isfinite(out.pixels).all() and out.pixels.min() >= 0 and out.pixels.max() <= 1
    assert len(out.timesteps) == 2
    again = model.sample(
        PROMPTS, steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0), **media_kwargs(name)
    )
    torch.testing.assert_close(out.pixels, again.pixels)


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_shapes(loaded, name):
    model = loaded(name)
    pixels = random_pixels(name)
    latents = model.encode(pixels)
    assert latents.shape[0] == 2 and latents.ndim == (5 if name in VIDEO else 4)
    decoded = model.decode(latents)
    assert decoded.shape == pixels.shape
    assert decoded.min() >= 0 and decoded.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_noise_target_predict_give_finite_error(loaded, name):
    model = loaded(name)
    x0, noise, t, cond = training_inputs(model, name)
    assert t.shape == (2,) and (t >= 0).all() and (t < model.num_train_timesteps + 1e-6).all()
    x_t = model.add_noise(x0, noise, t)
    assert x_t.shape == x0.shape and model.target(x0, noise, t).shape == x0.shape
    assert model.predict(x_t, t, cond).shape == x0.shape
    e = model.denoising_error(x0, noise, t, cond)
    assert e.shape == (2,) and e.dtype == torch.float32
    assert torch.isfinite(e).all() and (e > 0).all()


def test_every_registered_family_has_a_tiny_pipeline():
    assert set(FAMILIES) == set(FAMILY_OF.values())


@pytest.mark.parametrize("name", NAMES)
def test_lora_init_is_identity_and_disable_gives_base(tiny_pipeline_dir, name):
    model = load_model(tiny_pipeline_dir(name))
    x0, noise, t, cond = training_inputs(model, name)
    x_t = model.add_noise(x0, noise, t)
    base = model.predict(x_t, t, cond)
    params = model.add_lora(rank=4, alpha=8)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    trainable = {n for n, p in model.pipe.components[model.denoiser_name].named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(model.predict(x_t, t, cond), base)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    adapted = model.predict(x_t, t, cond)
    assert not torch.allclose(adapted, base)
    with model.lora_disabled():
        assert torch.equal(model.predict(x_t, t, cond), base)
    torch.testing.assert_close(model.predict(x_t, t, cond), adapted)


def with_trained_lora(tiny_pipeline_dir, name):
    """A tiny model with a LoRA moved off its identity init (alpha != rank, so a reload needs the saved metadata),
    its inputs ``(x_t, t, cond)`` and its prediction on them."""
    model = load_model(tiny_pipeline_dir(name))
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, noise, t, cond = training_inputs(model, name)
    x_t = model.add_noise(x0, noise, t)
    return model, (x_t, t, cond), model.predict(x_t, t, cond)


@pytest.mark.parametrize("name", NAMES)
def test_saved_lora_loads_in_plain_diffusers(tiny_pipeline_dir, tmp_path, name, capfd):
    from diffusers import DiffusionPipeline

    model, (x_t, t, cond), adapted = with_trained_lora(tiny_pipeline_dir, name)
    family = type(model)
    model.save_lora(tmp_path / "lora")

    import json

    index = json.loads((tiny_pipeline_dir(name) / "model_index.json").read_text())
    plain = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(name), **family.load_kwargs(index))
    plain.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(family(plain).predict(x_t, t, cond), adapted, rtol=1e-4, atol=1e-5)

    fresh = load_model(tiny_pipeline_dir(name))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_lora(tmp_path / "lora")
        fresh.load_lora(tmp_path / "lora", adapter_name="second")  # evaluate's second variant
        fresh.set_adapters("default")
    torch.testing.assert_close(fresh.predict(x_t, t, cond), adapted, rtol=1e-4, atol=1e-5)
    # a denoiser-only LoRA loads without Diffusers' "no text-encoder keys" notice or peft's multi-adapter warning
    assert "No LoRA keys" not in "".join(capfd.readouterr()) and not [w for w in caught if "peft_config" in str(w)]


@pytest.mark.parametrize("name", NAMES)
def test_fused_lora_predicts_like_the_adapter_with_no_peft_layers_left(tiny_pipeline_dir, name):
    """``fuse_lora`` (``visalign export --fuse``): base + LoRA folded into the weights, for every family."""
    model, (x_t, t, cond), adapted = with_trained_lora(tiny_pipeline_dir, name)
    model.fuse_lora()
    assert model.adapter_names == [] and not [n for n, _ in model.denoiser.named_parameters() if "lora_" in n]
    torch.testing.assert_close(model.predict(x_t, t, cond), adapted, rtol=1e-4, atol=1e-5)


def test_lora_targets_as_a_comma_separated_string(tiny_pipeline_dir):
    model = load_model(tiny_pipeline_dir("sd"))
    model.add_lora(rank=2, target_modules=" to_q, to_v ", adapter_name="from_string")
    model.add_lora(rank=2, target_modules=["to_q", "to_v"], adapter_name="from_list")
    config = model.denoiser.peft_config
    assert set(config["from_string"].target_modules) == set(config["from_list"].target_modules) == {"to_q", "to_v"}
