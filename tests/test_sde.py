"""Exact-value tests of the stochastic steps of :mod:`visalign.sde` and the samplers of :mod:`visalign.samplers`."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence

from visalign.samplers import CPS, DanceSDE, DDIMEta, FlowSDE, Sampler, available_samplers, get_sampler
from visalign.sde import (
    StepOutput,
    cps_step,
    dance_sde_step,
    ddim_step,
    flow_sde_step,
    gaussian_log_prob,
    kl_to_reference,
)

SHAPE = (3, 4, 8, 8)

# Per-sample schedules; the first flow sample sits at sigma = 1, where Flow-SDE needs sigma_max.
FLOW_SCHEDULE = {
    "sigma": torch.tensor([1.0, 0.7, 0.3]),
    "sigma_next": torch.tensor([0.9, 0.5, 0.1]),
    "sigma_max": 0.9,
}
DDIM_SCHEDULE = {
    "alpha_prod_t": torch.tensor([0.05, 0.4, 0.8]),
    "alpha_prod_prev": torch.tensor([0.1, 0.6, 0.9]),
    "prediction_type": "epsilon",
}
SAMPLERS = [FlowSDE(), DanceSDE(), CPS(), DDIMEta(), DDIMEta(eta=0.5), FlowSDE(noise_level=1.3), CPS(noise_level=1.0)]


def schedule_for(sampler) -> dict:
    return dict(FLOW_SCHEDULE) if sampler.kind == "flow" else dict(DDIM_SCHEDULE)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sampler_id(sampler) -> str:
    return repr(sampler)


# ----------------------------------------------------------------------------- deterministic limits
def test_flow_sde_zero_noise_is_the_euler_step_exactly():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.6)
    out = flow_sde_step(v, x, sigma, sigma_next, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mean, x + v * (sigma_next - sigma))
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.equal(out.std, torch.zeros(3, 1, 1, 1))
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_flow_sde_mean_is_euler_plus_the_score_drift():
    # Flow-GRPO's SDE drift: v + s^2 / (2 sigma) (x + (1 - sigma) v), integrated over dt; s = a sqrt(sigma/(1-sigma)).
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    sigma, sigma_next, a = 0.7, 0.55, 0.7
    dt = sigma_next - sigma
    s = a * math.sqrt(sigma / (1 - sigma))
    out = flow_sde_step(v, x, sigma, sigma_next, noise_level=a, noise=torch.zeros(SHAPE))
    expected = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    torch.testing.assert_close(out.mean, expected)
    torch.testing.assert_close(out.noise_scale, torch.full((3, 1, 1, 1), s))
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), s * math.sqrt(-dt)))


def test_flow_sde_sigma_one_uses_sigma_max_and_requires_it():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    out = flow_sde_step(v, x, 1.0, 0.9, noise_level=0.7, sigma_max=0.95, noise=torch.zeros(SHAPE))
    s = 0.7 * math.sqrt(1.0 / (1 - 0.95))
    torch.testing.assert_close(out.noise_scale.flatten(), torch.full((3,), s))
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(v, x, 1.0, 0.9)
    # UniPC's flow sigmas (Wan's default scheduler) start just below 1: the same first step, not 1000x the noise
    below = flow_sde_step(v, x, 1.0 - 1e-6, 0.9, noise_level=0.7, sigma_max=0.95, noise=torch.zeros(SHAPE))
    torch.testing.assert_close(below.noise_scale, out.noise_scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(below.prev_sample, out.prev_sample, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(v, x, 1.0 - 1e-6, 0.9)


def test_flow_sde_step_is_flow_grpos_per_step_log_prob_on_the_same_tensors():
    """Port check: flow_grpo's ``sde_step_with_logprob`` arranges the step differently (a coefficient on the sample
    and one on the model output; the log-density written term by term with sigma = 1 mapped to sigma_max inside
    the std only); written that way here, it gives our mean, sample and per-sample log-prob on the same tensors."""
    v, x, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    sigma, sigma_next, a, sigma_max = FLOW_SCHEDULE["sigma"], FLOW_SCHEDULE["sigma_next"], 0.7, 0.9
    ours = flow_sde_step(v, x, sigma, sigma_next, noise_level=a, sigma_max=sigma_max, noise=eps)
    sig, dt = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
    std_dev_t = torch.sqrt(sig / (1 - torch.where(sig == 1, torch.tensor(sigma_max), sig))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sig) * dt) + v * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    prev = mean + std_dev_t * torch.sqrt(-dt) * eps
    log_prob = (
        -((prev.detach() - mean) ** 2) / (2 * (std_dev_t * torch.sqrt(-dt)) ** 2)
        - torch.log(std_dev_t * torch.sqrt(-dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.prev_sample, prev, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.log_prob, log_prob, rtol=1e-5, atol=1e-5)
    # the update re-scores the stored sample under the policy's new prediction: the same expression again
    v2 = v + 0.1 * randn(*SHAPE, seed=4)
    again = flow_sde_step(v2, x, sigma, sigma_next, noise_level=a, sigma_max=sigma_max, prev_sample=prev)
    mean2 = x * (1 + std_dev_t**2 / (2 * sig) * dt) + v2 * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    lp2 = (-((prev - mean2) ** 2) / (2 * (std_dev_t**2) * -dt) - torch.log(std_dev_t * torch.sqrt(-dt))).mean(
        dim=(1, 2, 3)
    ) - math.log(math.sqrt(2 * math.pi))
    torch.testing.assert_close(again.log_prob, lp2, rtol=1e-5, atol=1e-5)
    assert (again.log_prob - ours.log_prob).abs().min() > 1e-5  # the ratio moves with the prediction


def test_dance_sde_mean_and_std():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    sigma, sigma_next, eta = 0.6, 0.45, 0.3
    out = dance_sde_step(v, x, sigma, sigma_next, eta=eta, noise=torch.zeros(SHAPE))
    x0_hat = x - sigma * v
    # DanceGRPO: mean = x + dsigma v - eta^2/2 * score * dsigma, score = -(x - (1 - sigma) x0_hat) / sigma^2.
    expected = x + (sigma_next - sigma) * (v + 0.5 * eta**2 * (x - (1 - sigma) * x0_hat) / sigma**2)
    torch.testing.assert_close(out.mean, expected)
    torch.testing.assert_close(out.std.flatten(), torch.full((3,), eta * math.sqrt(sigma - sigma_next)))
    torch.testing.assert_close(out.noise_scale.flatten(), torch.full((3,), eta))
    euler = dance_sde_step(v, x, sigma, sigma_next, eta=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(euler.prev_sample, x + (sigma_next - sigma) * v)
    assert torch.equal(euler.log_prob, torch.zeros(3))


def test_cps_zero_noise_is_the_euler_step():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    out = cps_step(v, x, 0.8, 0.6, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.mean, x + (0.6 - 0.8) * v)
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.equal(out.std, torch.zeros(3, 1, 1, 1))
    assert torch.equal(out.log_prob, torch.zeros(3))


@pytest.mark.parametrize("noise_level", [0.3, 0.8, 1.0])
def test_cps_preserves_the_flow_coefficients(noise_level):
    # With the exact velocity, x' = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) eps + std z: the clean-sample
    # coefficient is (1 - sigma') and the total noise variance is sigma'^2 (Wang & Yu 2025).
    x0, eps, z = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    sigma, sigma_next = 0.7, 0.4
    x = (1 - sigma) * x0 + sigma * eps
    out = cps_step(eps - x0, x, sigma, sigma_next, noise_level=noise_level, noise=z)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    torch.testing.assert_close(out.std.flatten(), torch.full((3,), std))
    torch.testing.assert_close(out.mean, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * eps)
    torch.testing.assert_close(out.prev_sample, out.mean + std * z)


def test_cps_last_step_lands_on_the_clean_prediction():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    out = cps_step(v, x, 0.2, 0.0, noise_level=0.8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample, x - 0.2 * v)
    assert torch.equal(out.log_prob, torch.zeros(3))


# ----------------------------------------------------------------------------- DDIM against Diffusers
def _sd_ddim(prediction_type: str, set_alpha_to_one: bool) -> DDIMScheduler:
    # The scheduler config of SD1.5 (clip_sample=False, steps_offset=1).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        prediction_type=prediction_type,
    )


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(prediction_type, eta, set_alpha_to_one):
    scheduler = _sd_ddim(prediction_type, set_alpha_to_one)
    scheduler.set_timesteps(4)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for i, t in enumerate(scheduler.timesteps):
        model_output, x, z = randn(*SHAPE, seed=10 * i), randn(*SHAPE, seed=10 * i + 1), randn(*SHAPE, seed=10 * i + 2)
        prev_t = int(t) - stride
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        ours = ddim_step(
            model_output, x, alpha_prod_t, alpha_prod_prev, eta=eta, prediction_type=prediction_type, noise=z
        )
        if eta == 0:
            reference = scheduler.step(model_output, t, x, eta=0.0).prev_sample
            assert torch.equal(ours.prev_sample, reference)
            assert torch.equal(ours.mean, reference)
            assert torch.equal(ours.std, torch.zeros(3, 1, 1, 1))
            assert torch.equal(ours.log_prob, torch.zeros(3))
            continue
        mean = scheduler.step(model_output, t, x, eta=eta, variance_noise=torch.zeros(SHAPE)).prev_sample
        sampled = scheduler.step(model_output, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours.mean, mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.prev_sample, sampled, rtol=0, atol=1e-6)
        variance = scheduler._get_variance(t, prev_t)
        torch.testing.assert_close(ours.std.flatten(), (eta * variance**0.5).expand(3))


def test_ddim_zero_terminal_snr_first_step_is_finite():
    # CogVideoX-style schedules (rescale_betas_zero_snr) start at abar_t = 0: with v-prediction x0_hat = -v and,
    # at eta = 1, the direction term vanishes exactly, so x' = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) z.
    v, x, z = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    alpha_prev = torch.tensor(0.0259)
    out = ddim_step(v, x, torch.tensor(0.0), alpha_prev, eta=1.0, prediction_type="v_prediction", noise=z)
    torch.testing.assert_close(out.mean, alpha_prev.sqrt() * -v)
    torch.testing.assert_close(out.prev_sample, alpha_prev.sqrt() * -v + (1 - alpha_prev).sqrt() * z)
    assert torch.isfinite(out.log_prob).all()


def test_ddim_eta_zero_gradients_are_finite():
    model_output = randn(*SHAPE, seed=1).requires_grad_(True)
    out = ddim_step(model_output, randn(*SHAPE, seed=2), 0.3, 0.5, eta=0.0, prev_sample=randn(*SHAPE, seed=3))
    (out.log_prob.sum() + out.mean.sum()).backward()
    assert torch.isfinite(model_output.grad).all()
    assert torch.equal(out.log_prob, torch.zeros(3))


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("sampler", SAMPLERS, ids=sampler_id)
def test_log_prob_is_the_normal_log_density_mean_over_elements(sampler):
    out = sampler.step(
        randn(*SHAPE, seed=1),
        randn(*SHAPE, seed=2),
        generator=torch.Generator().manual_seed(3),
        **schedule_for(sampler),
    )
    expected = Normal(out.mean, out.std).log_prob(out.prev_sample).flatten(1).mean(dim=1)
    torch.testing.assert_close(out.log_prob, expected)
    torch.testing.assert_close(gaussian_log_prob(out.prev_sample, out.mean, out.std.flatten()), expected)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=sampler_id)
def test_prev_sample_given_back_reproduces_the_log_prob(sampler):
    model_output, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    schedule = schedule_for(sampler)
    rollout = sampler.step(model_output, x, generator=torch.Generator().manual_seed(3), **schedule)
    policy = model_output.clone().requires_grad_(True)
    again = sampler.step(policy, x, prev_sample=rollout.prev_sample, **schedule)
    assert torch.equal(again.log_prob, rollout.log_prob)
    assert torch.equal(again.prev_sample, rollout.prev_sample)
    # GRPO's ratio needs d logp / d model_output through the mean only: the sampled action is a constant,
    # so scoring a fresh sample and re-scoring the stored one give the same gradient.
    again.log_prob.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0
    fresh_policy = model_output.clone().requires_grad_(True)
    fresh = sampler.step(fresh_policy, x, generator=torch.Generator().manual_seed(3), **schedule)
    fresh.log_prob.sum().backward()
    torch.testing.assert_close(fresh_policy.grad, policy.grad)
    # ... and a bf16 copy of the stored sample scores like its fp32 value.
    bf16 = rollout.prev_sample.bfloat16()
    torch.testing.assert_close(
        sampler.step(model_output, x, prev_sample=bf16, **schedule).log_prob,
        sampler.step(model_output, x, prev_sample=bf16.float(), **schedule).log_prob,
        rtol=0,
        atol=0,
    )


def test_zero_std_scores_zero_and_keeps_gradients_finite():
    mean = randn(*SHAPE, seed=1).requires_grad_(True)
    std = torch.tensor([0.0, 0.5, 0.0]).reshape(3, 1, 1, 1)
    x = randn(*SHAPE, seed=2)
    log_prob = gaussian_log_prob(x, mean, std)
    assert log_prob[0] == 0 and log_prob[2] == 0
    torch.testing.assert_close(log_prob[1], Normal(mean[1], 0.5).log_prob(x[1]).mean())
    log_prob.sum().backward()
    assert torch.isfinite(mean.grad).all()
    assert mean.grad[0].abs().sum() == 0 and mean.grad[1].abs().sum() > 0


def test_kl_to_reference_is_the_gaussian_kl():
    mean, mean_ref = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    std = torch.tensor([0.2, 0.5, 1.5])
    kl = kl_to_reference(mean, mean_ref, std)
    s = std.reshape(3, 1, 1, 1).expand(SHAPE)
    expected = kl_divergence(Normal(mean, s), Normal(mean_ref, s)).flatten(1).mean(dim=1)
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(kl, ((mean - mean_ref) ** 2).flatten(1).mean(dim=1) / (2 * std**2))
    assert torch.equal(kl_to_reference(mean, mean, 0.3), torch.zeros(3))


# ----------------------------------------------------------------------------- dtypes, broadcasting, noise
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=sampler_id)
def test_outputs_are_fp32_and_computed_in_fp32(sampler, dtype):
    model_output, x = randn(*SHAPE, seed=1, dtype=dtype), randn(*SHAPE, seed=2, dtype=dtype)
    schedule = schedule_for(sampler)
    out = sampler.step(model_output, x, generator=torch.Generator().manual_seed(3), **schedule)
    for name in ("prev_sample", "log_prob", "mean", "std", "noise_scale"):
        assert getattr(out, name).dtype == torch.float32, name
    upcast = sampler.step(model_output.float(), x.float(), generator=torch.Generator().manual_seed(3), **schedule)
    assert torch.equal(out.prev_sample, upcast.prev_sample)
    assert torch.equal(out.log_prob, upcast.log_prob)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=sampler_id)
def test_per_sample_schedules_broadcast(sampler):
    model_output, x, z = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    schedule = schedule_for(sampler)
    batched = sampler.step(model_output, x, noise=z, **schedule)
    for i in range(SHAPE[0]):
        row = {k: (v[i] if isinstance(v, torch.Tensor) else v) for k, v in schedule.items()}  # 0-dim tensors
        row_float = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        for sched in (row, row_float):
            single = sampler.step(model_output[i : i + 1], x[i : i + 1], noise=z[i : i + 1], **sched)
            torch.testing.assert_close(single.prev_sample, batched.prev_sample[i : i + 1])
            torch.testing.assert_close(single.log_prob, batched.log_prob[i : i + 1])
            torch.testing.assert_close(single.std, batched.std[i : i + 1])


@pytest.mark.parametrize("sampler", SAMPLERS, ids=sampler_id)
def test_empirical_noise_matches_std(sampler):
    shape = (3, 4, 64, 64)  # 16k draws per sample: the std estimate is good to ~0.6%
    out = sampler.step(
        randn(*shape, seed=1),
        randn(*shape, seed=2),
        generator=torch.Generator().manual_seed(3),
        **schedule_for(sampler),
    )
    residual = (out.prev_sample - out.mean).flatten(1)
    std = out.std.flatten()
    assert (std > 0).all()
    torch.testing.assert_close(residual.std(dim=1), std, rtol=0.03, atol=0)
    assert (residual.mean(dim=1).abs() < 0.03 * std).all()


def test_generators_reproduce_and_per_sample_generators_match_single_draws():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    a = flow_sde_step(v, x, 0.7, 0.5, generator=torch.Generator().manual_seed(7))
    b = flow_sde_step(v, x, 0.7, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.prev_sample, b.prev_sample)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    batched = flow_sde_step(v, x, 0.7, 0.5, generator=gens)
    for i in range(3):
        single = flow_sde_step(v[i : i + 1], x[i : i + 1], 0.7, 0.5, generator=torch.Generator().manual_seed(i))
        assert torch.equal(batched.prev_sample[i : i + 1], single.prev_sample)


def test_bad_arguments_raise_clear_errors():
    v, x = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    with pytest.raises(ValueError, match="not both"):
        flow_sde_step(v, x, 0.7, 0.5, noise=torch.zeros(SHAPE), generator=torch.Generator())
    with pytest.raises(ValueError, match="not both"):
        flow_sde_step(v, x, 0.7, 0.5, noise=torch.zeros(SHAPE), prev_sample=x)
    with pytest.raises(ValueError, match="shape"):
        flow_sde_step(v[:2], x, 0.7, 0.5)
    with pytest.raises(ValueError, match=r"per-sample tensor of shape \[3\]"):
        flow_sde_step(v, x, torch.tensor([0.7, 0.6]), 0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(v, x, 0.3, 0.5, prediction_type="flow")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CPS(noise_level=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        get_sampler("flow-sde", noise_level=-0.1)


# ----------------------------------------------------------------------------- registry contract
def test_registry_names_and_unknown_name():
    assert available_samplers() == ["cps", "dance-sde", "ddim", "flow-sde"]
    with pytest.raises(ValueError, match="unknown sampler 'sde'.*cps, dance-sde, ddim, flow-sde"):
        get_sampler("sde")
    assert get_sampler("ddim", eta=0.5) == DDIMEta(eta=0.5)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 3, 4, 8, 8)], ids=["image", "video"])
@pytest.mark.parametrize("name", available_samplers())
def test_every_registered_sampler_returns_the_documented_shapes(name, shape):
    sampler = get_sampler(name)
    assert isinstance(sampler, Sampler) and sampler.name == name and sampler.kind in ("flow", "ddim")
    if sampler.kind == "flow":
        # What a flow family's sde_schedule returns: 0-dim tensors and sigma_max = sigmas[1].
        schedule = {"sigma": torch.tensor(1.0), "sigma_next": torch.tensor(0.8), "sigma_max": torch.tensor(0.95)}
    else:
        schedule = {
            "alpha_prod_t": torch.tensor(0.3),
            "alpha_prod_prev": torch.tensor(0.5),
            "prediction_type": "v_prediction",
        }
    out = sampler.step(
        randn(*shape, seed=1), randn(*shape, seed=2), generator=torch.Generator().manual_seed(0), **schedule
    )
    assert isinstance(out, StepOutput)
    batch, ones = shape[0], (1,) * (len(shape) - 1)
    assert out.prev_sample.shape == shape and out.mean.shape == shape
    assert out.log_prob.shape == (batch,)
    assert out.std.shape == (batch, *ones) and out.noise_scale.shape == (batch, *ones)
    assert out.std.flatten(1)[:, 0].shape == (batch,)  # what DiffusionModel.sample records per step
    for value in (out.prev_sample, out.log_prob, out.mean, out.std):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
