"""A Flow-GRPO step written the way the reference training script (flow_grpo's ``train_sd3.py``) writes it, to time
visalign's GRPO against (``bench_grpo.py --modes "flow_grpo reference"``).

What it does as the reference does: the prompts are encoded by the pipeline's text encoders for every rollout; each
sampling step runs the transformer on ``[uncond; cond]`` concatenated and takes Flow-GRPO's SDE step with its
log-prob; the latents are decoded by the VAE; the update loops over micro-batches and, innermost, over the trained
steps (all but the last), recomputing the CFG forward, the log-prob of the stored next latent and, for the KL,
a second CFG forward with the LoRA disabled, one backward each, the optimizer stepping once per rollout. The step's
arithmetic is :func:`visalign.sde.flow_sde_step`, which ``tests/test_sde.py`` checks against Flow-GRPO's
``sde_step_with_logprob`` on the same tensors, so the two modes differ in the loop around it only.
"""

from __future__ import annotations

import torch

from visalign.advantages import group_advantages, ppo_clip_loss
from visalign.sde import flow_sde_step


def encode(pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[uncond; cond]`` prompt embeddings and pooled projections, encoded now (no cache)."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, device=device,
        negative_prompt=[""] * len(prompts),
    )  # fmt: skip
    return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])


def guided(transformer, x, t, embeds, pooled, guidance: float) -> torch.Tensor:
    out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=embeds,
                      pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def rollout(pipe, prompts: list[str], *, steps: int, guidance: float, resolution: int, noise_level: float, generator):
    """Sample with the SDE, keeping latents and log-probs; decode. Returns what the update needs."""
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    with torch.no_grad():
        embeds, pooled = encode(pipe, prompts, device)
        pipe.scheduler.set_timesteps(steps, device=device)
        sigmas = pipe.scheduler.sigmas.float()
        channels, factor = pipe.transformer.config.in_channels, pipe.vae_scale_factor
        shape = (len(prompts), channels, resolution // factor, resolution // factor)
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        latents, log_probs = [x], []
        for i in range(steps):
            t = (sigmas[i] * 1000).expand(len(prompts)).to(device)
            v = guided(pipe.transformer, x, t, embeds.to(dtype), pooled.to(dtype), guidance)
            out = flow_sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level=noise_level, sigma_max=sigmas[1],
                                generator=generator)  # fmt: skip
            x = out.prev_sample.to(dtype)
            latents.append(x)
            log_probs.append(out.log_prob)
        vae = pipe.vae
        pixels = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    trajectory, log_probs = torch.stack(latents, 1), torch.stack(log_probs, 1)
    return {"embeds": embeds, "pooled": pooled, "latents": trajectory, "log_probs": log_probs, "sigmas": sigmas,
            "pixels": pixels}  # fmt: skip


def update(model, optimizer, ro: dict, rewards: torch.Tensor, *, group: int, guidance: float, noise_level: float,
           beta_kl: float, clip_range: float, train_batch: int) -> None:  # fmt: skip
    """One pass over the rollout: micro-batches x trained steps, one backward each, one optimizer step."""
    pipe, n = model.pipe, rewards.shape[0]
    dtype = pipe.transformer.dtype
    adv = group_advantages(rewards, group_size=group, std="batch").clamp(-5, 5)
    sigmas, trained = ro["sigmas"], ro["log_probs"].shape[1] - 1
    micro = train_batch or n
    accumulation = (n // micro) * trained
    for start in range(0, n, micro):
        rows = torch.arange(start, start + micro)
        embeds = torch.cat([ro["embeds"][rows], ro["embeds"][n + rows]]).to(dtype)  # [uncond; cond] rows
        pooled = torch.cat([ro["pooled"][rows], ro["pooled"][n + rows]]).to(dtype)
        for i in range(trained):
            x, x_next = ro["latents"][rows, i], ro["latents"][rows, i + 1]
            t = (sigmas[i] * 1000).expand(len(rows)).to(x.device)
            v = guided(pipe.transformer, x, t, embeds, pooled, guidance)
            step = flow_sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level=noise_level, sigma_max=sigmas[1],
                                 prev_sample=x_next)  # fmt: skip
            losses, _ = ppo_clip_loss(step.log_prob, ro["log_probs"][rows, i], adv[rows], clip_range=clip_range)
            loss = losses.mean()
            if beta_kl > 0:
                with torch.no_grad(), model.lora_disabled():
                    v_ref = guided(pipe.transformer, x, t, embeds, pooled, guidance)
                    ref = flow_sde_step(v_ref, x, sigmas[i], sigmas[i + 1], noise_level=noise_level,
                                        sigma_max=sigmas[1], prev_sample=x_next)  # fmt: skip
                kl = ((step.mean - ref.mean) ** 2).flatten(1).mean(1) / (2 * step.noise_scale.flatten(1)[:, 0] ** 2)
                loss = loss + beta_kl * kl.mean()
            (loss / accumulation).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
