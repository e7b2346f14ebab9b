"""Flow-matching families (SD3, FLUX): exact agreement with the Diffusers pipelines and schedulers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from visalign.diffusion import shift_sigmas
from visalign.models import load_model
from visalign.models.flux import latent_image_ids, pack_latents, unpack_latents

PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(tiny_pipeline_dir(name))
        return cache[name]

    return get


@pytest.mark.parametrize(
    "name, guidance",
    [("sd3", 4.0), ("sd3", 1.0), ("sd3-no-t5", 4.0), ("flux", 3.5)],
)
def test_ode_sampling_reproduces_the_pipeline(loaded, name, guidance):
    model = loaded(name)
    latents = model.prepare_latents(2, 32, 32, None, torch.Generator().manual_seed(0))
    ours = model.sample(PROMPTS, steps=3, guidance=guidance, latents=latents, height=32, width=32)
    pipe_latents = pack_latents(latents) if name == "flux" else latents  # FluxPipeline takes packed latents
    theirs = model.pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=guidance,
        latents=pipe_latents,
        output_type="pt",
        height=32,
        width=32,
    ).images
    torch.testing.assert_close(ours.pixels, theirs, rtol=1e-4, atol=1e-5)
    # the seam's initial noise is the pipeline's own draw for the same generator
    drawn = model.pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=32,
        width=32,
    ).images
    torch.testing.assert_close(drawn, theirs)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_add_noise_and_target_match_the_scheduler(loaded, name):
    model = loaded(name)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    # training grid (shifted for SD3, unshifted for FLUX) and the inference grid with FLUX's dynamic shift
    train = type(model.pipe.scheduler).from_config(model.pipe.scheduler.config)
    infer = model.inference_scheduler(5, x0)
    infer._begin_index = None  # look sigmas up by timestep, as in training
    for scheduler, t in ((train, train.timesteps[[10, 700]]), (infer, infer.timesteps[[0, 3]])):
        expected = scheduler.scale_noise(x0, t, noise)
        torch.testing.assert_close(model.add_noise(x0, noise, t), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.target(x0, noise, t), noise - x0)


@pytest.mark.parametrize("name, shift", [("sd3", 3.0), ("flux", 1.0)])
def test_training_timesteps_are_logit_normal_with_the_training_shift(loaded, name, shift):
    model = loaded(name)
    t = model.sample_timesteps(6, generator=torch.Generator().manual_seed(3))
    u = torch.sigmoid(torch.randn(6, generator=torch.Generator().manual_seed(3)))
    # FLUX shifts by resolution only at inference; its training timesteps are unshifted
    torch.testing.assert_close(t, shift_sigmas(u, shift) * 1000)
    assert t.dtype == torch.float32 and ((t > 0) & (t <= 1000)).all()


def test_flux_dynamic_shift_follows_the_image_size(loaded):
    model = loaded("flux")
    small = model.inference_scheduler(4, torch.zeros(1, 16, 4, 4))
    large = model.inference_scheduler(4, torch.zeros(1, 16, 64, 64))
    # mu grows with the token count, pushing the schedule to higher noise; the first sigma stays 1
    assert small.sigmas[0] == large.sigmas[0] == 1.0
    assert (large.sigmas[1:-1] > small.sigmas[1:-1]).all()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_sde_schedule_reads_the_inference_sigmas(loaded, name):
    model = loaded(name)
    scheduler = model.inference_scheduler(4, torch.zeros(1, 16, 4, 4))
    for i in range(4):
        s = model.sde_schedule(scheduler, i)
        assert s["sigma"] == scheduler.sigmas[i] and s["sigma_next"] == scheduler.sigmas[i + 1]
        assert s["sigma_max"] == scheduler.sigmas[1] and s["sigma"].dtype == torch.float32
        torch.testing.assert_close(s["sigma"] * 1000, scheduler.timesteps[i])
    assert model.sde_schedule(scheduler, 3)["sigma_next"] == 0


def test_flux_pack_unpack_match_the_pipeline_and_round_trip():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(x)
    assert tokens.shape == (2, 2 * 3, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 4, 6))
    assert torch.equal(unpack_latents(tokens, 4, 6), x)
    assert torch.equal(unpack_latents(tokens, 4, 6), FluxPipeline._unpack_latents(tokens, 4 * 8, 6 * 8, 8))
    assert torch.equal(latent_image_ids(2, 3), FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 3, 4))


def test_flux_guidance_is_embedded_not_a_cfg_batch(loaded):
    model = loaded("flux")
    batches = []
    hook = model.denoiser.register_forward_hook(
        lambda m, args, kwargs, out: batches.append(kwargs["guidance"]), with_kwargs=True
    )
    try:
        latents = model.prepare_latents(2, 32, 32, None, torch.Generator().manual_seed(0))
        low = model.sample(PROMPTS, steps=2, guidance=1.0, latents=latents, height=32, width=32, decode=False)
        high = model.sample(PROMPTS, steps=2, guidance=5.0, latents=latents, height=32, width=32, decode=False)
    finally:
        hook.remove()
    assert [g.tolist() for g in batches] == [[1.0, 1.0]] * 2 + [[5.0, 5.0]] * 2  # one forward of B per step
    assert not torch.allclose(low.latents, high.latents)
    # training: cond["guidance"] if given, else the default 3.5
    cond = model.encode_prompt(PROMPTS)
    x_t, t = latents, torch.tensor([500.0, 800.0])
    default = model.predict(x_t, t, cond)
    torch.testing.assert_close(default, model.predict(x_t, t, model.with_guidance(cond, 3.5)), rtol=0, atol=0)
    assert not torch.allclose(default, model.predict(x_t, t, model.with_guidance(cond, 1.0)))


def test_sd3_without_t5_encodes_clip_and_zero_pads_t5(loaded, tiny_pipeline_dir):
    from visalign.models.sd3 import SD3Model

    def kwargs_of(name):  # None also for the absent optional image encoder: harmless
        return SD3Model.load_kwargs(json.loads((tiny_pipeline_dir(name) / "model_index.json").read_text()))

    assert kwargs_of("sd3-no-t5")["text_encoder_3"] is None and kwargs_of("sd3-no-t5")["tokenizer_3"] is None
    assert "text_encoder_3" not in kwargs_of("sd3") and "tokenizer_3" not in kwargs_of("sd3")
    full, no_t5 = loaded("sd3"), loaded("sd3-no-t5")
    assert no_t5.pipe.text_encoder_3 is None
    a, b = full.encode_prompt(PROMPTS), no_t5.encode_prompt(PROMPTS)
    assert b["encoder_hidden_states"].shape == (2, 77 + 256, 32) and b["pooled_projections"].shape == (2, 32)
    # same CLIP weights in both tiny pipelines: the CLIP rows agree, the T5 rows are zeros without T5
    torch.testing.assert_close(b["encoder_hidden_states"][:, :77], a["encoder_hidden_states"][:, :77])
    torch.testing.assert_close(b["pooled_projections"], a["pooled_projections"])
    assert torch.equal(b["encoder_hidden_states"][:, 77:], torch.zeros(2, 256, 32))
    assert a["encoder_hidden_states"][:, 77:].abs().sum() > 0
    # CLIP-L and CLIP-G (16 + 16) fill T5's width of 32 exactly; prompts differ, so do their embeddings
    assert not torch.allclose(b["encoder_hidden_states"][0, :77], b["encoder_hidden_states"][1, :77])


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_encode_decode_use_the_vae_shift_and_scale(loaded, name):
    model = loaded(name)
    vae = model.vae
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = model.encode(pixels, generator=torch.Generator().manual_seed(1))
    raw = vae.encode(pixels * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, (raw - vae.config.shift_factor) * vae.config.scaling_factor)
    assert latents.shape == (2, 16, 4, 4)
    expected = (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(model.decode(latents), expected, rtol=1e-4, atol=1e-5)


def test_sizes_that_do_not_fit_the_latent_grid_are_rejected(loaded):
    from visalign.models import ModelError

    with pytest.raises(ModelError, match="multiples of 16"):
        loaded("flux").prepare_latents(1, 40, 32, None, None)
    with pytest.raises(ModelError, match="multiples of 16"):
        loaded("sd3").prepare_latents(1, 32, 24, None, None)


def test_sd3_default_size_is_the_pipelines(loaded):
    # StableDiffusion3Pipeline: transformer.config.sample_size * vae_scale_factor (1024 for SD3; the family's
    # fixed 1024 overflowed a small transformer's position embedding)
    model = loaded("sd3")
    pipe = model.pipe
    assert model.default_resolution == pipe.transformer.config.sample_size * pipe.vae_scale_factor < 1024
    out = model.sample(PROMPTS[:1], steps=2, generator=torch.Generator().manual_seed(0))
    assert out.pixels.shape[-2:] == (model.default_resolution, model.default_resolution)


needs_sde = pytest.mark.skipif(importlib.util.find_spec("visalign.sde") is None, reason="visalign.sde not written yet")


@needs_sde
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_sde_without_noise_is_ode_sampling_and_logprobs_are_finite(loaded, name):
    from visalign.samplers import get_sampler

    model = loaded(name)
    latents = model.prepare_latents(2, 32, 32, None, torch.Generator().manual_seed(0))
    kwargs = {"steps": 3, "guidance": 3.5, "latents": latents, "height": 32, "width": 32, "decode": False}
    ode = model.sample(PROMPTS, **kwargs)
    zero = model.sample(
        PROMPTS, sde=get_sampler("flow-sde", noise_level=0.0), generator=torch.Generator().manual_seed(0), **kwargs
    )
    torch.testing.assert_close(zero.latents, ode.latents, rtol=1e-4, atol=1e-5)
    noisy = model.sample(
        PROMPTS, sde=get_sampler("flow-sde", noise_level=0.7), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert noisy.log_probs.shape == (2, 3) and noisy.log_probs.dtype == torch.float32
    assert torch.isfinite(noisy.log_probs).all()
    assert not torch.allclose(noisy.latents, ode.latents)
