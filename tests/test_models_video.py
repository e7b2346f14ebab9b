"""Family-specific checks of the video families: Wan (flow matching) and CogVideoX (v-prediction).

The shared contract (load, sample, LoRA) is in test_models_contract.py; here: our sampling loop reproduces the
Diffusers pipelines, the latent normalisation and layouts, and the exact noising/target/schedule values.
"""

from __future__ import annotations

import pytest
import torch
from tiny.video import build_cogvideox, build_wan

from visalign.diffusion import sample_flow_sigmas
from visalign.models import ModelError
from visalign.models.cogvideox import CogVideoXModel
from visalign.models.wan import WanModel

PROMPTS = ["a red circle moving left", "a blue square"]
SIZE = {"num_frames": 5, "height": 32, "width": 32}


# name -> (builder, family class, extra pipeline call kwargs)
def build_wan_expand_timesteps():
    """Wan 2.2 TI2V-style text-to-video: one timestep per latent token."""
    pipe = build_wan()
    pipe.register_to_config(expand_timesteps=True)
    return pipe


def build_wan_euler():
    """Wan with the other scheduler its pipeline accepts (as in Diffusers' tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_wan()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return pipe


VARIANTS = {
    "wan": (build_wan, WanModel, {}),
    "wan-euler": (build_wan_euler, WanModel, {}),
    "wan-2.2-expand-timesteps": (build_wan_expand_timesteps, WanModel, {}),
    "cogvideox": (build_cogvideox, CogVideoXModel, {"max_sequence_length": 16}),
    "cogvideox-sincos": (lambda: build_cogvideox(rotary=False), CogVideoXModel, {"max_sequence_length": 16}),
    "cogvideox-dpm": (lambda: build_cogvideox(scheduler="dpm"), CogVideoXModel, {"max_sequence_length": 16}),
    "cogvideox-1.5": (lambda: build_cogvideox(patch_size_t=2), CogVideoXModel, {"max_sequence_length": 16}),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_video(batch=2, seed=0):
    return torch.rand((batch, 5, 3, 32, 32), generator=gen(seed))


@pytest.fixture(scope="module")
def wan():
    return WanModel(build_wan())


@pytest.fixture(scope="module")
def cog():
    return CogVideoXModel(build_cogvideox())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ode_sampling_reproduces_the_diffusers_pipeline(name):
    build, family, call_kwargs = VARIANTS[name]
    model = family(build())
    latents = model.prepare_latents(2, 32, 32, 5, gen(1))
    ours = model.sample(PROMPTS, steps=3, guidance=4.0, latents=latents.clone(), generator=gen(2), **SIZE)
    common = dict(num_inference_steps=3, guidance_scale=4.0, **SIZE, **call_kwargs)
    theirs = model.pipe(PROMPTS, latents=latents.clone(), generator=gen(2), output_type="latent", **common).frames
    torch.testing.assert_close(ours.latents.float(), theirs.float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours.latents, latents)  # the loop did move the latents
    pixels = model.pipe(PROMPTS, latents=latents.clone(), generator=gen(2), output_type="pt", **common).frames
    assert ours.pixels.shape == pixels.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(ours.pixels, pixels, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_bf16_sampling_keeps_the_pipelines_dtypes(name):
    """Wan keeps float32 latents and a bf16 velocity; CogVideoX keeps bf16 latents and upcasts v (as Diffusers)."""
    build, family, call_kwargs = VARIANTS[name]
    model = family(build(), dtype=torch.bfloat16)
    latents = model.prepare_latents(2, 32, 32, 5, gen(1))
    assert latents.dtype == (torch.float32 if name == "wan" else torch.bfloat16)
    ours = model.sample(PROMPTS, steps=3, guidance=4.0, latents=latents.clone(), decode=False, **SIZE)
    theirs = model.pipe(
        PROMPTS,
        latents=latents.clone(),
        num_inference_steps=3,
        guidance_scale=4.0,
        output_type="latent",
        **SIZE,
        **call_kwargs,
    ).frames
    assert ours.latents.dtype == theirs.dtype == latents.dtype
    # float32 arithmetic where the pipeline rounds to bf16 would differ by ~1e-2 here
    torch.testing.assert_close(ours.latents.float(), theirs.float(), rtol=0, atol=2e-3)


def test_wan_latent_layout_and_per_channel_normalisation(wan):
    pixels = random_video()
    latents = wan.encode(pixels, generator=gen(3))
    assert latents.shape == (2, 4, 2, 4, 4) and latents.dtype == torch.float32  # [B, C, F', h, w]
    video = pixels.permute(0, 2, 1, 3, 4) * 2 - 1
    raw = wan.vae.encode(video).latent_dist.sample(generator=gen(3))
    mean = torch.tensor([0.1, -0.2, 0.3, -0.05]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.8, 2.0, 1.2]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # decode undoes the normalisation: it equals decoding the raw VAE sample
    expected = ((wan.vae.decode(raw).sample + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    decoded = wan.decode(latents)
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("patch_size_t", [None, 2])
def test_cogvideox_latent_layout_and_scaling(patch_size_t):
    model = CogVideoXModel(build_cogvideox(patch_size_t=patch_size_t))
    pixels = random_video()
    latents = model.encode(pixels, generator=gen(3))
    raw = model.vae.encode(pixels.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.sample(generator=gen(3))
    expected = (raw * 1.15258426).permute(0, 2, 1, 3, 4)  # [B, F', C, h, w], 3 latent frames
    if patch_size_t:  # front-padded with a copy of the first frame to an even length, as CogVideo fine-tuning
        expected = torch.cat([expected[:, :1], expected], dim=1)
    assert latents.shape == (2, 3 + (patch_size_t is not None), 4, 4, 4)
    torch.testing.assert_close(latents, expected)
    decoded = model.decode(latents)
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, ((model.vae.decode(raw).sample + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4))


def test_wan_add_noise_target_and_timesteps_exact(wan):
    x0 = torch.full((2, 4, 2, 4, 4), 2.0)
    noise = torch.full_like(x0, -1.0)
    t = torch.tensor([250.0, 750.0])
    x_t = wan.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t[0], torch.full_like(x0[0], 0.75 * 2 - 0.25))
    torch.testing.assert_close(x_t[1], torch.full_like(x0[1], 0.25 * 2 - 0.75))
    torch.testing.assert_close(wan.target(x0, noise, t), torch.full_like(x0, -3.0))
    # t = 1000 * sigma, sigma logit-normal with the scheduler's flow shift (3.0 in the tiny Wan)
    t = wan.sample_timesteps(64, generator=gen(4))
    expected = sample_flow_sigmas(64, scheme="logit_normal", shift=3.0, generator=gen(4)) * 1000
    assert t.dtype == torch.float32 and t.shape == (64,)
    torch.testing.assert_close(t, expected)


def test_cogvideox_uses_the_shifted_schedule_and_v_target(cog):
    from diffusers import DDIMScheduler

    scheduler = cog.pipe.scheduler
    plain = DDIMScheduler.from_config(scheduler.config)  # the same betas without the SNR shift
    assert not torch.allclose(scheduler.alphas_cumprod.double(), plain.alphas_cumprod.double())
    g = gen(5)
    x0, noise = torch.randn((2, 3, 4, 4, 4), generator=g), torch.randn((2, 3, 4, 4, 4), generator=g)
    t = cog.sample_timesteps(2, generator=g)
    assert t.dtype == torch.float32 and torch.equal(t, t.round()) and (t >= 0).all() and (t < 1000).all()
    torch.testing.assert_close(cog.target(x0, noise, t), scheduler.get_velocity(x0, noise, t.long()))
    torch.testing.assert_close(cog.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t.long()))


def test_wan_sde_schedule_reads_the_inference_sigmas(wan):
    scheduler = wan.inference_scheduler(4, torch.zeros(1))
    for i in range(4):
        s = wan.sde_schedule(scheduler, i)
        assert s["sigma"] == scheduler.sigmas[i] and s["sigma_next"] == scheduler.sigmas[i + 1]
        assert s["sigma_max"] == scheduler.sigmas[1] and s["sigma"] > s["sigma_next"]
        # the model sees t = sigma * 1000 (UniPC truncates it to an integer)
        assert abs(float(scheduler.timesteps[i]) - 1000 * float(s["sigma"])) < 1
    assert wan.sde_schedule(scheduler, 3)["sigma_next"] == 0


def test_wan_flow_sde_first_step_is_not_blown_up(wan):
    """UniPC's first sigma is just below 1: Flow-SDE's first step keeps the Flow-GRPO noise scale
    ``a sqrt(sigma / (1 - sigma_max))``, and a small noise level stays close to the ODE sampler."""
    from visalign.samplers import FlowSDE

    scheduler = wan.inference_scheduler(4, torch.zeros(1))
    first = wan.sde_schedule(scheduler, 0)
    assert 0.999 < float(first["sigma"]) < 1  # the case the cap exists for
    x = torch.randn((1, 4, 2, 4, 4), generator=gen(7))
    step = FlowSDE(0.7).step(torch.zeros_like(x), x, **first, noise=torch.zeros_like(x))
    expected = 0.7 * (float(first["sigma"]) / (1 - float(first["sigma_max"]))) ** 0.5
    assert float(step.noise_scale.flatten()[0]) == pytest.approx(expected, rel=1e-5)
    kw = dict(steps=4, guidance=1.0, height=16, width=16, num_frames=5, record_trajectory=True)
    latents = wan.prepare_latents(1, 16, 16, 5, gen(8))
    ode = wan.sample(["a cat"], latents=latents.clone(), sde=[FlowSDE(0.0)] * 4, generator=gen(9), **kw)
    sde = wan.sample(["a cat"], latents=latents.clone(), sde=[FlowSDE(0.05)] * 4, generator=gen(9), **kw)
    assert (sde.trajectory - ode.trajectory).abs().max() < 0.5  # was ~100 with 1 - sigma in the denominator


def test_cogvideox_sde_schedule_gives_the_schedulers_ddim_step(cog):
    """The deterministic DDIM update built from sde_schedule equals CogVideoXDDIMScheduler.step at every step."""
    scheduler = cog.inference_scheduler(3, torch.zeros(1))
    g = gen(6)
    x, v = torch.randn((1, 3, 4, 4, 4), generator=g), torch.randn((1, 3, 4, 4, 4), generator=g)
    for i, t in enumerate(scheduler.timesteps):
        s = cog.sde_schedule(scheduler, i)
        assert s["prediction_type"] == "v_prediction"
        a, a_prev = s["alpha_prod_t"], s["alpha_prod_prev"]
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        eps = a.sqrt() * v + (1 - a).sqrt() * x
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, expected)
    assert cog.sde_schedule(scheduler, 2)["alpha_prod_prev"] == 1.0  # set_alpha_to_one at the last step


def test_bad_sizes_and_unsupported_pipelines_raise_clear_errors(wan, cog):
    from diffusers import UniPCMultistepScheduler

    with pytest.raises(ModelError, match="4k \\+ 1"):
        wan.prepare_latents(1, 32, 32, 6, None)
    with pytest.raises(ModelError, match="divisible"):
        wan.prepare_latents(1, 40, 32, 5, None)
    with pytest.raises(ModelError, match="divisible"):
        cog.prepare_latents(1, 32, 36, 5, None)
    with pytest.raises(ModelError, match=r"\[B, F, 3, H, W\]"):
        wan.encode(torch.rand(2, 3, 32, 32))
    pipe = build_wan()
    pipe.register_modules(transformer_2=pipe.transformer)
    pipe.register_to_config(boundary_ratio=0.9)
    with pytest.raises(ModelError, match="two-expert"):
        WanModel(pipe)
    pipe = build_wan()
    pipe.scheduler = UniPCMultistepScheduler()  # a DDPM grid would silently mis-sample a velocity model
    with pytest.raises(ModelError, match="flow-matching scheduler"):
        WanModel(pipe)


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_stochastic_sampling_returns_finite_log_probs(name):
    from visalign.samplers import get_sampler

    build, family, _ = VARIANTS[name]
    model = family(build())
    sampler = get_sampler("flow-sde" if model.is_flow else "ddim")
    out = model.sample(PROMPTS, steps=3, guidance=4.0, generator=gen(7), sde=sampler, **SIZE)
    assert out.log_probs.shape == (2, 3) and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()
    assert out.pixels.shape == (2, 5, 3, 32, 32) and torch.isfinite(out.pixels).all()


def test_cogvideox_ddim_sampler_without_noise_is_the_ode_path(cog):
    from visalign.samplers import get_sampler

    latents = cog.prepare_latents(2, 32, 32, 5, gen(8))
    kwargs = dict(steps=3, guidance=4.0, latents=latents, decode=False, **SIZE)
    ode = cog.sample(PROMPTS, **kwargs)
    sde = cog.sample(PROMPTS, sde=get_sampler("ddim", eta=0.0), generator=gen(9), **kwargs)
    torch.testing.assert_close(sde.latents, ode.latents, rtol=1e-4, atol=1e-5)


def test_wan_without_temporal_compression_takes_any_frame_count():
    """A Wan VAE with ``scale_factor_temporal=1`` (the shapes world's toy-video): 8 frames give 8 latent frames.

    The released layout still needs 4k + 1 frames. Diffusers' encoder reads frames in chunks of 1 + 4 + 4 ... and
    would drop frames 5-7 of 8; ``encode`` pads with copies of the last frame and drops their latents, which the
    causal convolutions make exact: the 8 latents do not depend on what follows.
    """
    from visalign.toyworld.recipes import build_toy_video

    model = WanModel(build_toy_video(seed=0))
    assert model.pipe.vae_scale_factor_temporal == 1 and model.pipe.vae_scale_factor_spatial == 2
    for frames in (8, 6, 1):
        assert model.prepare_latents(1, 32, 32, frames, gen(0)).shape == (1, 4, frames, 16, 16)
    pixels = torch.rand((2, 9, 3, 32, 32), generator=gen(1))
    eight = model.encode(pixels[:, :8], generator=gen(2))
    assert eight.shape == (2, 4, 8, 16, 16)
    nine = model.encode(pixels, generator=gen(2))
    torch.testing.assert_close(eight, nine[:, :, :8], rtol=1e-4, atol=1e-5)
    assert model.decode(eight).shape == (2, 8, 3, 32, 32)
    with pytest.raises(ModelError, match="4k \\+ 1"):
        WanModel(build_wan()).prepare_latents(1, 32, 32, 8, None)  # the released layout: 4x in time
