"""Pretraining recipes of the shipped shapes-world models, reproducible from a seed on a CPU.

Every recipe trains only on **held-in** captions (the renders of held-out combinations are never seen):

* ``toy-sd`` / ``toy-flow``: first the VAE (or reuse one with ``vae=``), on renders, with an L1 + MSE
  reconstruction loss and a tiny KL weight; its latent scale (and, for SD3, shift) are then set from the
  latents of 2,048 renders, as Stable Diffusion's ``scaling_factor`` was. Then the denoiser and the text
  encoder(s) are trained jointly from scratch (or the denoiser alone under a given frozen ``text_encoder=``, as the
  shipped toy-sd is) on a cache of 20,000 encoded renders with the family's own training view
  (:meth:`DiffusionModel.sample_timesteps` / ``add_noise`` / ``target`` / ``predict``): the DDPM epsilon or v loss
  with uniform timesteps for toy-sd, the rectified-flow velocity loss with logit-normal, shifted
  timesteps for toy-flow (which trains on T5's 256 zero tokens collapsed into one exact equivalent, see
  :class:`CollapsedZerosJointAttnProcessor`). Captions are dropped (replaced by ``""``) 10% of the time so
  classifier-free guidance works. AdamW, warm-up then cosine decay, gradient clipping at 1; the weights saved
  are an exponential moving average (EMA) of the trained ones.
* ``toy-video`` (:mod:`.pretrain_video`): the same two stages for a ``WanPipeline`` on 8-frame videos (its own
  ``AutoencoderKLWan``, then the transformer alone under a frozen random UMT5 encoder).
* ``toy-clip`` (:mod:`.pretrain_clip`): contrastive, with hard negatives. The caption set is small, so each
  image is scored against **every** held-in caption: all wrong-colour, wrong-shape and wrong-position
  captions are negatives in every batch. An image can match several captions (an object at the top left is
  "on the left", "on the top", and matches the caption without position), so the image-to-text loss is the
  multi-positive ``-log sum_{true c} softmax(s * cos)_c``; the text-to-image loss is the same over the batch's images.

Outputs (``out``): the model folder itself (a Diffusers pipeline, or the open_clip folder), ``losses.csv``
(step, loss, learning rate, seconds), ``samples/step_XXXXXX.png`` grids during training, ``samples.png``
at the end and ``toyworld.json`` (the resolved recipe, wall time, sampling defaults).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .captions import all_captions, caption_texts
from .oracle import judge_images, summarize
from .pretrain_config import PretrainConfig
from .recipes import (
    FLOW_WIDTH,
    LATENT_SIZE,
    VIDEO_PATCH,
    VIDEO_WIDTH,
    build_toy_flow,
    build_toy_sd,
    toy_vae,
)
from .render import IMAGE_SIZE, render_images

# captions shown in every sample grid: two rows of held-in, one row of held-out
GRID_CAPTIONS = (
    "a red circle",
    "a green square on the left",
    "a blue triangle on the top",
    "a yellow circle on the right",
    "a purple square on the bottom",
    "a cyan circle",
    "a red triangle on the bottom",
    "a green circle on the top",
    "a blue square",
    "a yellow triangle on the left",
    "a purple circle on the right",
    "a cyan triangle on the top",
    "a red square on the right",
    "a green triangle",
    "a blue circle on the bottom",
    "a yellow square on the top",
    "a purple triangle",
    "a purple triangle on the left",
    "a purple triangle on the bottom",
    "a purple triangle on the right",
    "a cyan square",
    "a cyan square on the top",
    "a cyan square on the right",
    "a cyan square on the bottom",
)


# ----------------------------------------------------------------------------------------------- helpers
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``peak / 10`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class EMA:
    """Exponential moving average of parameters (the weights a diffusion model ships with)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # short runs: the effective decay ramps up so early weights do not dominate
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the averaged weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], backup)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        torch._foreach_copy_([p.data for p in self.params], self.shadow)


class LossLog:
    """``losses.csv`` (step, loss, lr, seconds) written as training goes."""

    def __init__(self, path: Path, stage: str):
        self.path = path
        self.stage = stage
        self.start = time.perf_counter()
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["stage", "step", "loss", "lr", "seconds"])

    def write(self, step: int, loss: float, lr: float) -> None:
        self.writer.writerow([self.stage, step, f"{loss:.6f}", f"{lr:.3e}", f"{time.perf_counter() - self.start:.1f}"])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def held_in_batch(rng: np.random.Generator, batch_size: int, seed: int, start: int) -> tuple[torch.Tensor, list]:
    """Renders of ``batch_size`` random held-in captions (pretraining never sees held-out combinations)."""
    held_in = caption_texts("held_in")
    captions = [held_in[i] for i in rng.integers(0, len(held_in), batch_size)]
    images, scenes = render_images(captions, seed=seed, start=start)
    return images, scenes


def _trainable(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    params = []
    for module in modules:
        module.requires_grad_(True)
        module.train()
        params += list(module.parameters())
    return params


# ----------------------------------------------------------------------------------------------- VAE
def train_vae(cfg: PretrainConfig, out: Path, seed: int):
    """Train the toy ``AutoencoderKL`` on held-in renders; returns it (eval mode) without latent scaling set."""
    vae = toy_vae(seed)
    params = _trainable([vae])
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng((seed, 1))
    log = LossLog(out / "losses.csv", "vae")
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not cfg.progress)
    gen = torch.Generator().manual_seed(seed)
    for step in bar:
        lr = lr_at(step, cfg.vae_steps, cfg.vae_lr, min(cfg.warmup, cfg.vae_steps // 10 + 1))
        for group in opt.param_groups:
            group["lr"] = lr
        images, _ = held_in_batch(rng, cfg.vae_batch_size, seed + 1_000_003, step * cfg.vae_batch_size)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        # L1 keeps edges sharp, MSE the colours. The KL only regularises: SD weighs it 1e-6 against a loss summed
        # over pixels; this loss is a mean over 12,288 values, hence 1e-8 (more would grow the posterior noise)
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-8 * posterior.kl().mean()
        optimizer_step(loss, opt, params, None, step, lr, cfg, log, bar, last=cfg.vae_steps - 1)
    log.close()
    vae.requires_grad_(False)
    vae.eval()
    return vae


@torch.no_grad()
def latent_statistics(vae, seed: int, n: int) -> tuple[float, float]:
    """Mean and std of the VAE's posterior means over ``n`` held-in renders (for scaling/shift factors)."""
    rng = np.random.default_rng((seed, 2))
    latents = []
    for start in range(0, n, 256):
        images, _ = held_in_batch(rng, min(256, n - start), seed + 2_000_003, start)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mean)
    z = torch.cat(latents)
    return float(z.mean()), float(z.std())


def load_vae(path: str | os.PathLike):
    """A trained VAE from a pipeline folder (its ``vae/``) or a VAE folder."""
    from diffusers import AutoencoderKL

    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--vae {path}: no VAE there (expected a pipeline folder with vae/ or a VAE folder)")
    return AutoencoderKL.from_pretrained(folder).eval()


def load_text_encoder(path: str | os.PathLike):
    """A trained CLIP text encoder (frozen) from a pipeline folder (its ``text_encoder/``) or an encoder folder."""
    from transformers import CLIPTextModel

    path = Path(path)
    folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--text_encoder {path}: no text encoder there (a pipeline folder with text_encoder/)")
    return CLIPTextModel.from_pretrained(folder).eval().requires_grad_(False)


@torch.no_grad()
def vae_reconstruction_report(vae, seed: int, n: int) -> dict:
    """The oracle on VAE reconstructions of renders of every caption (the ceiling any sampler can reach)."""
    captions = [c.text for c in all_captions()]
    captions = [captions[i % len(captions)] for i in range(n)]
    images, _ = render_images(captions, seed=seed + 3_000_017)
    recon = vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample
    return summarize(judge_images((recon / 2 + 0.5).clamp(0, 1), captions))


# ----------------------------------------------------------------------------------------------- diffusion
def encode_prompt_trainable(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Text conditioning with gradients, exactly as the family's ``encode_prompt`` computes it (no CFG).

    ``DiffusionModel.encode_prompt`` runs under ``no_grad`` (the text encoders are frozen when aligning);
    pretraining trains them, so this mirrors the pipelines' ``encode_prompt`` on token ids.

    Args:
        model: a wrapped toy-sd (``StableDiffusion``) or toy-flow (``SD3Model``).
        input_ids: ``[B, 16]`` ids from the toy tokenizer (``padding="max_length"``).
    """
    pipe = model.pipe
    if model.family == "sd":
        # StableDiffusionPipeline.encode_prompt with clip_skip=None: the last hidden state
        return {"encoder_hidden_states": pipe.text_encoder(input_ids)[0]}
    # StableDiffusion3Pipeline.encode_prompt: penultimate states of both CLIPs, concatenated, zero-padded to the
    # joint width, then T5's place (zeros without T5); pooled = both projections concatenated
    hidden, pooled = [], []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        out = encoder(input_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    joint = pipe.transformer.config.joint_attention_dim
    clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
    t5 = torch.zeros(clip.shape[0], model.max_sequence_length, joint, dtype=clip.dtype, device=clip.device)
    return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}


class CollapsedZerosJointAttnProcessor:
    """Diffusers' ``JointAttnProcessor2_0`` where the last context token stands for ``repeats`` identical ones.

    Without T5, SD3 appends ``max_sequence_length`` (256) zero vectors to the CLIP states. They are identical
    through every block (every context operation but attention is per token, and they attend identically), so
    ``m`` copies of one key contribute ``m exp(s) v = exp(s + log m) v`` to the softmax: one copy with a
    ``log m`` logit bias computes exactly the same image tokens. Pretraining toy-flow this way runs on 81
    instead of 336 tokens (about 4x faster); sampling and every other user keep the plain processor.
    """

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        batch_size, image_tokens = hidden_states.shape[:2]

        def heads(x):
            return x.view(batch_size, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query, key, value = (torch.cat(p, dim=2) for p in ((query, c_query), (key, c_key), (value, c_value)))
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[..., -1] = self.log_repeats
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch_size, -1, query.shape[1] * query.shape[-1]).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


@contextlib.contextmanager
def collapsed_t5_zeros(model):
    """Within the block, toy-flow's transformer takes the CLIP states plus ONE zero token standing for T5's
    ``max_sequence_length`` zeros (see :class:`CollapsedZerosJointAttnProcessor`); restores the plain processor."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model.denoiser.set_attn_processor(CollapsedZerosJointAttnProcessor(model.max_sequence_length))
    try:
        yield
    finally:
        model.denoiser.set_attn_processor(JointAttnProcessor2_0())


def collapse_t5_zeros(cond: dict[str, torch.Tensor], clip_tokens: int) -> dict[str, torch.Tensor]:
    """Keep the CLIP states and one of T5's zero tokens (for :func:`collapsed_t5_zeros`)."""
    return {**cond, "encoder_hidden_states": cond["encoder_hidden_states"][:, : clip_tokens + 1]}


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def build_latent_cache(
    model, n: int, seed: int, batch: int = 256, renders=held_in_batch
) -> tuple[torch.Tensor, list[str]]:
    """Encode ``n`` held-in renders with the family's ``encode`` (a posterior sample, as its training scripts).

    ``renders(rng, size, seed, start) -> (media, scenes)`` draws them: images by default (videos for toy-video).
    """
    rng = np.random.default_rng((seed, 3))
    gen = torch.Generator().manual_seed(seed + 3)
    latents, captions = [], []
    for start in range(0, n, batch):
        images, scenes = renders(rng, min(batch, n - start), seed + 4_000_037, start)
        latents.append(model.encode(images, generator=gen).float())
        captions += [s.caption for s in scenes]
    return torch.cat(latents), captions


@torch.no_grad()
def sample_grid(model, captions: list[str], steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, dict]:
    """Sample one image per caption (sample ``i`` from seed ``seed + i``); returns ``(pixels, oracle summary)``."""
    latents = torch.cat(
        [
            model.prepare_latents(1, IMAGE_SIZE, IMAGE_SIZE, None, torch.Generator().manual_seed(seed + i))
            for i in range(len(captions))
        ]
    )
    out = model.sample(
        list(captions),
        steps=steps,
        guidance=guidance,
        latents=latents,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=torch.Generator().manual_seed(seed),
    )
    return out.pixels, summarize(judge_images(out.pixels, list(captions)))


def _save_grid(pixels: torch.Tensor, path: Path, nrow: int = 8) -> None:
    from ..media import image_grid, save_image

    save_image(image_grid(pixels, nrow=nrow), path)


def optimizer_step(loss, opt, params, ema, step: int, lr: float, cfg, log, bar, last: int | None = None) -> None:
    """One step of the pretraining loops (VAE and denoiser): backward, clip at 1, AdamW, EMA (when given), and the
    loss log every ``log_every`` and at step ``last`` (default: the denoiser's last step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if ema is not None:
        ema.update(step)
    if step % cfg.log_every == 0 or step == (cfg.steps - 1 if last is None else last):
        log.write(step, loss.item(), lr)
        bar.set_postfix(loss=f"{loss.item():.4f}")


def train_diffusion(cfg: PretrainConfig, out: Path) -> dict:
    """Pretrain toy-sd or toy-flow into ``out``; returns the summary written to ``toyworld.json``."""
    from ..models.sd import StableDiffusion
    from ..models.sd3 import SD3Model

    started = time.perf_counter()
    seed = cfg.seed
    if cfg.vae is not None:
        vae = load_vae(cfg.vae)
        vae_source = str(cfg.vae)
    else:
        vae = train_vae(cfg, out, seed)
        vae_source = "trained"
    vae_seconds = time.perf_counter() - started
    mean, std = latent_statistics(vae, seed, cfg.stats_images)
    is_flow = cfg.model == "toy-flow"
    if is_flow:
        # SD3-style VAE config: latents = (z - shift) * scale
        vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
        pipe = build_toy_flow(seed, vae=vae, width=cfg.flow_width)
        model = SD3Model(pipe)
        trainable = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    else:
        # SD pipelines only scale (no shift): the scale is taken around zero, as SD's 0.18215 was
        rms = math.sqrt(std**2 + mean**2)
        vae.register_to_config(scaling_factor=1.0 / rms, shift_factor=None)
        text_encoder = load_text_encoder(cfg.text_encoder) if cfg.text_encoder else None
        pipe = build_toy_sd(seed, vae, cfg.prediction, cfg.zero_snr, text_encoder)
        model = StableDiffusion(pipe)
        trainable = [pipe.unet] + ([] if text_encoder is not None else [pipe.text_encoder])
    model.default_resolution = IMAGE_SIZE
    vae_report = vae_reconstruction_report(model.vae, seed, cfg.check_images) if cfg.check_images else None
    cache, captions = build_latent_cache(model, cfg.train_images, seed)
    ids = tokenize(pipe.tokenizer, captions)
    empty_ids = tokenize(pipe.tokenizer, [""])
    params = _trainable(trainable)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(seed + 5)
    log = LossLog(out / "losses.csv", cfg.model)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    stages = {}
    bar = tqdm(range(cfg.steps), desc=cfg.model, disable=not cfg.progress)
    for step in bar:
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(cache), (cfg.batch_size,), generator=gen)
        x0 = cache[index]
        batch_ids = ids[index].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        batch_ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = model.sample_timesteps(cfg.batch_size, generator=gen)
        cond = encode_prompt_trainable(model, batch_ids)
        if is_flow:
            with collapsed_t5_zeros(model):
                pred = model.predict(model.add_noise(x0, noise, t), t, collapse_t5_zeros(cond, ids.shape[1]))
        else:
            pred = model.predict(model.add_noise(x0, noise, t), t, cond)
        loss = (pred.float() - model.target(x0, noise, t).float()).pow(2).mean()
        optimizer_step(loss, opt, params, ema, step, lr, cfg, log, bar)
        done = step + 1
        grid_now = cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps
        save_now = cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps
        if grid_now or save_now:
            with ema.applied() if ema is not None else contextlib.nullcontext():
                _eval_mode(trainable)
                pixels, summary = sample_grid(model, list(GRID_CAPTIONS), cfg.sample_steps, cfg.guidance, seed)
                if save_now:
                    save_stage(pipe, out / "stages" / f"step_{done:06d}", cfg, done, summary, image_sampling(cfg))
                _train_mode(trainable)
            stages[done] = summary
            _save_grid(pixels, out / "samples" / f"step_{done:06d}.png")
            grid = summary["all"]
            tqdm.write(f"step {done}: grid strict {grid['strict_acc']:.2f}, object {grid['object_rate']:.2f}")
    log.close()
    if ema is not None:
        ema.copy_to_params()
    for module in trainable:
        module.requires_grad_(False)
    _eval_mode(trainable)
    pixels, summary = sample_grid(model, list(GRID_CAPTIONS), cfg.sample_steps, cfg.guidance, seed)
    _save_grid(pixels, out / "samples.png")
    pipe.save_pretrained(out, safe_serialization=True)
    return {
        "vae": vae_source,
        "vae_seconds": round(vae_seconds, 1),
        "vae_reconstruction_oracle": vae_report,
        "latent_mean": mean,
        "latent_std": std,
        "stage_grid_oracle": stages,
        "final_grid_oracle": summary,
    }


def image_sampling(cfg: PretrainConfig) -> dict:
    """The sampling defaults recorded for an image model (``toyworld.json``'s ``"sampling"``)."""
    return {"steps": cfg.sample_steps, "guidance": cfg.guidance, "height": IMAGE_SIZE, "width": IMAGE_SIZE}


def save_stage(pipe, folder: Path, cfg: PretrainConfig, step: int, summary: dict, sampling: dict) -> None:
    """Save the pipeline (EMA weights applied) as a loadable stage with a ``toyworld.json`` of its own."""
    pipe.save_pretrained(folder, safe_serialization=True)
    info = {
        "model": cfg.model,
        "stage_step": step,
        "of_steps": cfg.steps,
        "sampling": sampling,
        "recipe": asdict(cfg),
        "grid_oracle": summary,
    }
    (folder / "toyworld.json").write_text(json.dumps(info, indent=2) + "\n")


def _eval_mode(modules):
    for m in modules:
        m.eval()


def _train_mode(modules):
    for m in modules:
        m.train()


# ----------------------------------------------------------------------------------------------- entry point
def pretrain(cfg: PretrainConfig) -> Path:
    """Run a recipe; writes the model folder, ``losses.csv``, sample grids and ``toyworld.json`` into ``cfg.out``."""
    from ..config import save_config

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    save_config(cfg, out, name="pretrain_config.yaml")
    started = time.perf_counter()
    if cfg.model == "toy-clip":
        from .pretrain_clip import train_clip

        details = train_clip(cfg, out)
    elif cfg.model == "toy-video":
        from .pretrain_video import train_video

        details = train_video(cfg, out)  # its "sampling" and "latent_size" replace the image ones below
    else:
        details = train_diffusion(cfg, out)
    info = {
        "model": cfg.model,
        "recipe": asdict(cfg),
        "command": f"visalign toy pretrain --model {cfg.model} --out {cfg.out} --seed {cfg.seed} --steps {cfg.steps}"
        + (f" --vae {cfg.vae}" if cfg.vae else "")
        + (f" --text_encoder {cfg.text_encoder}" if cfg.text_encoder else "")
        + (f" --prediction {cfg.prediction}" if cfg.prediction != "epsilon" else "")
        + (" --zero_snr" if cfg.zero_snr else "")
        + (f" --video_patch {cfg.video_patch}" if cfg.video_patch != VIDEO_PATCH else "")
        + (f" --video_width {cfg.video_width}" if cfg.video_width != VIDEO_WIDTH else "")
        + (f" --flow_width {cfg.flow_width}" if cfg.flow_width != FLOW_WIDTH else "")
        + (f" --near_miss {cfg.near_miss:g}" if cfg.near_miss else "")
        + (f" --save_every {cfg.save_every}" if cfg.save_every else "")
        + (f" --threads {cfg.threads}" if cfg.threads else ""),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "sampling": image_sampling(cfg) if cfg.model != "toy-clip" else None,
        "latent_size": LATENT_SIZE if cfg.model != "toy-clip" else None,
        **details,
    }
    (out / "toyworld.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
