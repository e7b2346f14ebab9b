"""The UNet families (sd: SD1.5 epsilon / SD2 v-prediction; sdxl): exact agreement with Diffusers.

Sampling must reproduce the plain pipeline image for image, the training view must equal
``DDPMScheduler``'s forward process and velocity, SDXL's micro-conditioning must equal the pipeline's,
and DDIM-eta sampling must reduce to DDIM at ``eta = 0``.
"""

from __future__ import annotations

import pytest
import torch

from visalign.models import load_model
from visalign.models.base import ModelError
from visalign.models.sd import StableDiffusion, StableDiffusionXL

NAMES = ["sd", "sd-v", "sdxl"]
PROMPTS = ["a red circle on the left", "a blue square"]
SIZE = {"height": 32, "width": 32}


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(tiny_pipeline_dir(name))
        return cache[name]

    return get


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
@pytest.mark.parametrize("name", NAMES)
def test_ode_sample_reproduces_the_pipeline(loaded, name, negative_prompt):
    # Same seed, no latents given: also checks the initial noise and its init_noise_sigma (Euler for sdxl)
    # and, for sdxl without a negative prompt, the zeroed unconditional branch.
    model = loaded(name)
    ours = model.sample(PROMPTS, steps=3, guidance=4.0, negative_prompt=negative_prompt, generator=gen(), **SIZE)
    negs = None if negative_prompt is None else [negative_prompt] * len(PROMPTS)
    theirs = model.pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=4.0,
        negative_prompt=negs,
        generator=gen(),
        output_type="pt",
        **SIZE,
    ).images
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.9  # not saturated, so the comparison means something
    torch.testing.assert_close(ours.pixels, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_given_latents_are_unit_noise_as_in_the_pipeline(loaded, name):
    # Both scale given latents by the inference scheduler's init_noise_sigma (> 1 for sdxl's Euler grid).
    model = loaded(name)
    latents = torch.randn(2, 4, 16, 16, generator=gen(1))
    ours = model.sample(PROMPTS, steps=3, guidance=1.0, latents=latents, **SIZE)
    theirs = model.pipe(PROMPTS, num_inference_steps=3, guidance_scale=1.0, latents=latents, output_type="pt", **SIZE)
    torch.testing.assert_close(ours.pixels, theirs.images, rtol=1e-5, atol=1e-5)


def test_family_and_prediction_type(loaded):
    assert type(loaded("sd")) is StableDiffusion and loaded("sd").prediction_type == "epsilon"
    assert type(loaded("sd-v")) is StableDiffusion and loaded("sd-v").prediction_type == "v_prediction"
    assert type(loaded("sdxl")) is StableDiffusionXL and loaded("sdxl").prediction_type == "epsilon"
    # unet sample_size 16 x vae factor 2, as the pipeline's default height
    assert loaded("sdxl").default_resolution == 32


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_and_target_equal_ddpm_scheduler(loaded, name):
    from diffusers import DDPMScheduler

    model = loaded(name)
    ddpm = DDPMScheduler.from_config(model.pipe.scheduler.config)
    x0, noise = torch.randn(3, 4, 16, 16, generator=gen(2)), torch.randn(3, 4, 16, 16, generator=gen(3))
    t = model.sample_timesteps(3, generator=gen(4))
    assert t.dtype == torch.float32 and torch.equal(t, t.round()) and (t >= 0).all() and (t < 1000).all()
    torch.testing.assert_close(model.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t.long()))
    expected = ddpm.get_velocity(x0, noise, t.long()) if name == "sd-v" else noise
    torch.testing.assert_close(model.target(x0, noise, t), expected)


def test_sample_timesteps_cover_the_range(loaded):
    t = loaded("sd").sample_timesteps(20000, generator=gen())
    assert t.min() == 0 and t.max() == 999


@pytest.mark.parametrize("name", NAMES)
def test_encode_scales_the_vae_posterior_sample(loaded, name):
    model = loaded(name)
    pixels = torch.rand(2, 3, 32, 32, generator=gen(5))
    latents = model.encode(pixels, generator=gen(6))
    posterior = model.vae.encode(pixels * 2 - 1).latent_dist
    torch.testing.assert_close(latents, posterior.sample(gen(6)) * model.vae.config.scaling_factor)
    assert latents.shape == (2, 4, 16, 16)


def test_sdxl_time_ids_equal_the_pipeline(loaded):
    model = loaded("sdxl")
    pipe = model.pipe
    expected = pipe._get_add_time_ids(
        (32, 32),
        (0, 0),
        (32, 32),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(model.time_ids(2, (32, 32)), expected.repeat(2, 1))
    # predict's default comes from the latent size
    x_t = torch.randn(2, 4, 16, 16)
    cond = model.encode_prompt(PROMPTS)
    assert torch.equal(model.added_cond_kwargs(x_t, cond)["time_ids"], expected.repeat(2, 1))
    # real crop coordinates from a data loader take precedence
    t = torch.tensor([500.0, 20.0])
    base = model.predict(x_t, t, cond)
    torch.testing.assert_close(model.predict(x_t, t, {**cond, "time_ids": expected.repeat(2, 1)}), base)
    cropped = model.time_ids(2, (40, 48), (4, 8), (32, 32))
    assert cropped[0].tolist() == [40, 48, 4, 8, 32, 32]
    assert not torch.allclose(model.predict(x_t, t, {**cond, "time_ids": cropped}), base)


def test_sdxl_cond_shapes_and_pooled_embeds(loaded):
    model = loaded("sdxl")
    cond = model.encode_prompt(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "text_embeds"}
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # two encoders' 32-d states concatenated
    assert cond["text_embeds"].shape == (2, model.pipe.text_encoder_2.config.projection_dim)
    _, _, pooled, _ = model.pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["text_embeds"], pooled)


def test_sdxl_negative_cond_follows_force_zeros_for_empty_prompt(loaded):
    model = loaded("sdxl")
    assert model.pipe.config.force_zeros_for_empty_prompt
    cond = {**model.encode_prompt(PROMPTS), "time_ids": model.time_ids(2, (40, 48), (4, 8), (32, 32))}
    zeros = model.negative_cond(cond)
    assert not zeros["encoder_hidden_states"].any() and not zeros["text_embeds"].any()
    assert torch.equal(zeros["time_ids"], cond["time_ids"])  # the pipeline shares add_time_ids
    # an explicit empty negative prompt is encoded, not zeroed (as in the pipeline)
    empty = model.negative_cond(cond, "")
    assert empty["text_embeds"].abs().sum() > 0 and torch.equal(empty["time_ids"], cond["time_ids"])
    torch.testing.assert_close(empty["text_embeds"], model.encode_prompt(["", ""])["text_embeds"])


def test_sd_negative_cond_encodes_the_empty_prompt(loaded):
    model = loaded("sd")
    cond = model.encode_prompt(PROMPTS)
    torch.testing.assert_close(
        model.negative_cond(cond)["encoder_hidden_states"], model.encode_prompt(["", ""])["encoder_hidden_states"]
    )
    with pytest.raises(ModelError, match="negative prompts"):
        model.negative_cond(cond, ["a", "b", "c"])


def test_sdxl_fp16_upcasts_the_vae_and_restores_it(tiny_pipeline_dir):
    model = load_model(tiny_pipeline_dir("sdxl"), dtype="fp16")
    assert model.upcast_vae
    latents = torch.randn(1, 4, 16, 16, generator=gen(7)).half()
    pixels = model.decode(latents)
    assert model.vae.dtype == torch.float16 and pixels.dtype == torch.float32
    model.vae.float()
    expected = (model.vae.decode(latents.float() / model.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pixels, expected)
    assert model.encode(torch.rand(1, 3, 32, 32)).dtype == torch.float16


def test_prepare_latents_checks_the_size(loaded):
    with pytest.raises(ModelError, match="multiples of 2"):
        loaded("sd").prepare_latents(1, 33, 32, None, gen())


@pytest.mark.parametrize("name", NAMES)
def test_ddim_eta0_sampler_equals_ddim_ode(tiny_pipeline_dir, name):
    from diffusers import DDIMScheduler

    from visalign.samplers import get_sampler

    model = load_model(tiny_pipeline_dir(name))
    latents = torch.randn(2, 4, 16, 16, generator=gen(8))
    sde = model.sample(PROMPTS, steps=3, guidance=3.0, latents=latents, sde=get_sampler("ddim", eta=0.0), **SIZE)
    assert torch.equal(sde.log_probs, torch.zeros(2, 3))
    # sdxl ships Euler, whose config has no clip_sample: DDIM would default to clipping x0
    model.pipe.scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config, clip_sample=False)
    ode = model.sample(PROMPTS, steps=3, guidance=3.0, latents=latents, **SIZE)
    torch.testing.assert_close(sde.timesteps, ode.timesteps)
    torch.testing.assert_close(sde.latents, ode.latents, rtol=1e-5, atol=1e-5)
    # the last step goes to final_alpha_cumprod, as DDIMScheduler.step
    sched = model.inference_scheduler(3, latents, get_sampler("ddim"))
    last = model.sde_schedule(sched, 2)
    assert last["alpha_prod_prev"] == sched.final_alpha_cumprod
    assert last["prediction_type"] == model.prediction_type


@pytest.mark.parametrize("name", ["sd-v", "sdxl"])
def test_ddim_eta1_returns_finite_log_probs(loaded, name):
    from visalign.samplers import get_sampler

    model = loaded(name)
    out = model.sample(PROMPTS, steps=3, guidance=3.0, generator=gen(), sde=get_sampler("ddim", eta=1.0), **SIZE)
    assert out.log_probs.shape == (2, 3) and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()
    # the tiny sdxl's Euler config has no set_alpha_to_one, so its DDIM grid ends at abar = 1 (std 0)
    assert out.stds.shape == (2, 3) and (out.stds[:, :-1] > 0).all()
    again = model.sample(PROMPTS, steps=3, guidance=3.0, generator=gen(), sde=get_sampler("ddim", eta=1.0), **SIZE)
    torch.testing.assert_close(out.pixels, again.pixels)
