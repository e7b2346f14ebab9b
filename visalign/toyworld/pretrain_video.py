"""Pretraining toy-video: a Diffusers ``WanPipeline`` on the shapes world's 8-frame 32x32 videos, from a seed.

Two stages, on **held-in** captions only (videos of held-out combinations are never rendered for training):

1. The ``AutoencoderKLWan`` (:func:`~.recipes.toy_video_vae`: 2x in space, none in time), on renders, with the image
   VAE's L1 + MSE loss and tiny KL weight (:func:`.pretrain.train_vae`), the object's pixels weighted 5x
   (:func:`object_weight`). It trains on whole clips through its
   encoder and decoder (:func:`vae_forward`), which equals Diffusers' chunked, cached ``encode`` / ``decode`` and is
   about twice as fast. Its per-channel ``latents_mean`` / ``latents_std`` (what ``WanPipeline`` un-normalises with)
   are then set from the latents of ``stats_images`` renders, and the oracle checks its reconstructions.
2. The ``WanTransformer3DModel`` alone, from scratch, on a cache of ``train_images`` encoded videos, with Wan's
   rectified-flow training view (:class:`~visalign.models.wan.WanModel`: logit-normal sigmas shifted by the
   scheduler's ``flow_shift``, velocity target). The UMT5 text encoder stays frozen at its random initialisation: a
   text encoder trained jointly collapsed toy-sd's position words, and random embeddings keep "left", "right",
   "up" and "down" apart. ``WanPipeline`` zero-pads prompt embeddings to 512 tokens; training attends to the real
   tokens plus a few zero tokens that stand exactly for all the padding (:class:`CollapsedPaddingWanAttnProcessor`).
   Captions are dropped 10% of the time (CFG), AdamW with warm-up and cosine decay, EMA weights saved, as in
   :mod:`.pretrain` (whose helpers this module shares).

Outputs in ``out`` as the image recipes: the pipeline, ``losses.csv``, ``samples/step_XXXXXX.png`` (one video per
row, frames left to right), ``samples.png``, and with ``save_every`` the EMA pipeline of intermediate stages in
``stages/step_XXXXXX/`` (each with a ``toyworld.json`` of its own), to pick a base model that leaves room to align.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .captions import BACKGROUND, caption_texts
from .oracle import judge_videos, summarize
from .pretrain import (
    EMA,
    LossLog,
    _eval_mode,
    _save_grid,
    _train_mode,
    _trainable,
    build_latent_cache,
    lr_at,
    optimizer_step,
    save_stage,
)
from .pretrain_config import PretrainConfig
from .recipes import VIDEO_LATENT_SIZE, build_toy_video, toy_video_vae
from .render import VIDEO_FRAMES, VIDEO_SIZE, render_videos

# captions of the sample grids and of the oracle printed at each stage: every held-in caption, then the held-out ones
GRID_CAPTIONS = tuple(caption_texts("held_in", video=True) + caption_texts("held_out", video=True))
# WanPipeline's default max_sequence_length: prompt embeddings are zero-padded to this many tokens
WAN_TEXT_TOKENS = 512
# VAE loss weight of object pixels (see object_weight)
OBJECT_WEIGHT = 5.0


def video_batch(rng: np.random.Generator, batch_size: int, seed: int, start: int) -> tuple[torch.Tensor, list]:
    """Renders ``[B, 8, 3, 32, 32]`` of ``batch_size`` random held-in video captions, and their scenes."""
    held_in = caption_texts("held_in", video=True)
    return render_videos([held_in[i] for i in rng.integers(0, len(held_in), batch_size)], seed=seed, start=start)


# ----------------------------------------------------------------------------------------------- VAE
def vae_forward(vae, video: torch.Tensor, generator: torch.Generator | None = None):
    """One whole-clip pass of an ``AutoencoderKLWan`` without temporal compression.

    Diffusers' ``encode`` / ``decode`` run the causal encoder on chunks of 1, 4, 4 ... frames and the decoder frame
    by frame, carrying the last two frames of every causal convolution in a cache; one call on the whole clip pads
    causally instead and computes the same (to float rounding, tested), about twice as fast to train.

    Args:
        video: ``[B, 3, F, H, W]`` in ``[-1, 1]``.

    Returns:
        ``(reconstruction [B, 3, F, H, W], posterior)``; the reconstruction is not clamped (Diffusers' ``decode``
        clamps to ``[-1, 1]``).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(video)))
    return vae.decoder(vae.post_quant_conv(posterior.sample(generator))), posterior


def object_weight(video: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight ``[B, 1, F, H, W]``: ``OBJECT_WEIGHT`` on the object and a 1-pixel ring around it, else 1.

    Objects of 8-14 px are 6-19% of a frame, yet they are all the oracle reads: with a plain mean the background
    dominated the loss, and after 1,500 steps the decoder's blurred edges still moved the median colour and the fill
    ratio (64% strict on reconstructions). The ring also penalises colour leaking into the background.

    Args:
        video: ``[B, 3, F, H, W]`` renders in ``[-1, 1]``.
    """
    background = torch.tensor(BACKGROUND, dtype=video.dtype).view(1, 3, 1, 1, 1) / 255 * 2 - 1
    mask = ((video - background).abs().amax(dim=1, keepdim=True) > 0.1).to(video.dtype)
    ring = torch.nn.functional.max_pool3d(mask, kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))
    return 1 + (OBJECT_WEIGHT - 1) * ring


def train_video_vae(cfg: PretrainConfig, out: Path, seed: int):
    """Train the toy ``AutoencoderKLWan`` on held-in video renders; returns it in eval mode (statistics not set)."""
    vae = toy_video_vae(seed)
    params = _trainable([vae])
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng((seed, 1))
    gen = torch.Generator().manual_seed(seed)
    log = LossLog(out / "losses.csv", "vae")
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not cfg.progress)
    for step in bar:
        lr = lr_at(step, cfg.vae_steps, cfg.vae_lr, min(cfg.warmup, cfg.vae_steps // 10 + 1))
        for group in opt.param_groups:
            group["lr"] = lr
        videos, _ = video_batch(rng, cfg.vae_batch_size, seed + 1_000_003, step * cfg.vae_batch_size)
        x = videos.permute(0, 2, 1, 3, 4) * 2 - 1
        recon, posterior = vae_forward(vae, x, gen)
        weight = object_weight(x)
        # the image VAE's loss (see pretrain.train_vae), weighted; Diffusers' KL sums over dims 1-3 (C, F, H of a
        # video), the mean then runs over the batch and W
        error = recon - x
        loss = (weight * error.abs()).mean() + (weight * error.pow(2)).mean() + 1e-8 * posterior.kl().mean()
        optimizer_step(loss, opt, params, None, step, lr, cfg, log, bar, last=cfg.vae_steps - 1)
    log.close()
    return vae.requires_grad_(False).eval()


@torch.no_grad()
def video_latent_statistics(vae, seed: int, n: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of ``n`` held-in renders (``latents_mean`` / ``_std``)."""
    rng = np.random.default_rng((seed, 2))
    latents = []
    for start in range(0, n, 64):
        videos, _ = video_batch(rng, min(64, n - start), seed + 2_000_003, start)
        latents.append(vae_forward(vae, videos.permute(0, 2, 1, 3, 4) * 2 - 1)[1].mean)
    z = torch.cat(latents).transpose(0, 1).flatten(1)  # [C, everything else]
    return z.mean(dim=1).tolist(), z.std(dim=1).tolist()


def load_video_vae(path: str | os.PathLike):
    """A trained ``AutoencoderKLWan`` from a pipeline folder (its ``vae/``) or a VAE folder."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--vae {path}: no VAE there (expected a toy-video pipeline folder with vae/, or a VAE)")
    if json.loads((folder / "config.json").read_text()).get("_class_name") != "AutoencoderKLWan":
        raise ConfigError(f"--vae {path}: toy-video needs an AutoencoderKLWan (e.g. another toy-video's vae/)")
    return AutoencoderKLWan.from_pretrained(folder).eval().requires_grad_(False)


@torch.no_grad()
def video_vae_report(model, seed: int, n: int) -> dict:
    """The oracle on reconstructions (``model.encode`` then ``model.decode``) of renders of all 72 video captions."""
    captions = caption_texts(video=True)
    captions = [captions[i % len(captions)] for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    recon = torch.cat(
        [
            model.decode(model.encode(render_videos(captions[s : s + 64], seed=seed + 3_000_017, start=s)[0], gen))
            for s in range(0, n, 64)
        ]
    )
    return summarize(judge_videos(recon, captions))


# ----------------------------------------------------------------------------------------------- text
class CollapsedPaddingWanAttnProcessor:
    """Diffusers' ``WanAttnProcessor`` for cross-attention where zero tokens stand for all of the prompt padding.

    ``WanPipeline`` zero-pads every prompt embedding to 512 tokens. The padding tokens are identical through the
    transformer (its text projection and key/value projections act per token), so ``m`` of them add
    ``m exp(s) v = exp(s + log m) v`` to the softmax: ``k`` zero tokens with a key bias of ``log(m / k)`` each give
    the same attention output. Training then attends to 7 tokens instead of 512 (about 1.5x faster a step).

    Set ``bias`` (``[B, 1, 1, K]`` float, see :func:`compact_prompt_embeds`) before each forward.
    """

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


@contextlib.contextmanager
def collapsed_padding(transformer):
    """Within the block every cross-attention of ``transformer`` uses one shared
    :class:`CollapsedPaddingWanAttnProcessor` (yielded); restores Diffusers' processor after."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    processor = CollapsedPaddingWanAttnProcessor()
    for block in transformer.blocks:
        block.attn2.set_processor(processor)
    try:
        yield processor
    finally:
        for block in transformer.blocks:
            block.attn2.set_processor(WanAttnProcessor())


@torch.no_grad()
def compact_prompt_embeds(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings cut to ``K`` = (longest prompt + 1) tokens, and the key bias standing for the cut padding.

    Returns:
        ``(embeds [N, K, D], bias [N, K])``: ``embeds`` are the first ``K`` tokens of ``model.encode_prompt``
        (zeros after each prompt's own tokens); ``bias`` is 0 on a prompt's tokens and ``log((512 - L) / (K - L))``
        on each of its ``K - L`` zero tokens (``L``: its token count).
    """
    tokenizer = model.pipe.tokenizer
    lengths = torch.tensor([len(ids) for ids in tokenizer(list(prompts)).input_ids])
    full = model.encode_prompt(list(prompts))["prompt_embeds"].float()
    if full.shape[1] != WAN_TEXT_TOKENS:
        raise ConfigError(f"expected prompt embeddings of {WAN_TEXT_TOKENS} tokens, got {full.shape[1]}")
    k = int(lengths.max()) + 1
    zeros = torch.arange(k)[None, :] >= lengths[:, None]
    bias = torch.where(zeros, torch.log((WAN_TEXT_TOKENS - lengths) / (k - lengths)).float()[:, None], 0.0)
    return full[:, :k], bias


# ----------------------------------------------------------------------------------------------- diffusion
@torch.no_grad()
def sample_video_grid(model, captions: list[str], steps: int, guidance: float, seed: int):
    """One video per caption (video ``i`` from seed ``seed + i``): ``(videos [N, 8, 3, 32, 32], oracle summary)``."""
    from ..evaluation import sample_all

    videos = sample_all(
        model,
        list(captions),
        [seed + i for i in range(len(captions))],
        batch_size=64,
        progress=False,
        steps=steps,
        guidance=guidance,
        height=VIDEO_SIZE,
        width=VIDEO_SIZE,
        num_frames=VIDEO_FRAMES,
    )
    return videos, summarize(judge_videos(videos, list(captions)))


def save_video_grid(videos: torch.Tensor, path: Path) -> None:
    """A PNG with one video ``[F, 3, H, W]`` per row, frames left to right."""
    _save_grid(videos.flatten(0, 1), path, nrow=videos.shape[1])


def sampling_defaults(cfg: PretrainConfig) -> dict:
    """The ``sampling`` block of toy-video's ``toyworld.json``."""
    return {
        "steps": cfg.sample_steps,
        "guidance": cfg.guidance,
        "height": VIDEO_SIZE,
        "width": VIDEO_SIZE,
        "num_frames": VIDEO_FRAMES,
    }


def _short(summary: dict) -> str:
    s = summary["held_in"]
    return (
        f"held-in object {s['object_rate']:.2f} colour {s['color_acc']:.2f} shape {s['shape_acc']:.2f} "
        f"direction {s['direction_acc']:.2f} strict {s['strict_acc']:.2f}"
    )


def train_video(cfg: PretrainConfig, out: Path) -> dict:
    """Pretrain toy-video into ``out``; returns the details written to ``toyworld.json``."""
    from ..models.wan import WanModel

    started = time.perf_counter()
    seed = cfg.seed
    if cfg.vae is not None:
        vae, vae_source = load_video_vae(cfg.vae), str(cfg.vae)
    else:
        vae, vae_source = train_video_vae(cfg, out, seed), "trained"
    vae_seconds = time.perf_counter() - started
    mean, std = video_latent_statistics(vae, seed, cfg.stats_images)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    pipe = build_toy_video(seed, vae=vae, patch=cfg.video_patch, width=cfg.video_width)
    model = WanModel(pipe)
    vae_report = video_vae_report(model, seed, cfg.check_images) if cfg.check_images else None
    if vae_report is not None:
        tqdm.write(f"VAE reconstructions: strict {vae_report['all']['strict_acc']:.3f} (n={cfg.check_images})")
    cache, captions = build_latent_cache(model, cfg.train_images, seed, batch=64, renders=video_batch)
    prompts = sorted(set(captions)) + [""]
    embeds, bias = compact_prompt_embeds(model, prompts)
    prompt_index = torch.tensor([prompts.index(c) for c in captions])
    transformer = pipe.transformer
    params = _trainable([transformer])
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
        batch_prompts = prompt_index[index].clone()
        batch_prompts[torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout] = len(prompts) - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = model.sample_timesteps(cfg.batch_size, generator=gen)
        with collapsed_padding(transformer) as processor:
            processor.bias = bias[batch_prompts][:, None, None, :]
            pred = model.predict(model.add_noise(x0, noise, t), t, {"prompt_embeds": embeds[batch_prompts]})
        loss = (pred.float() - model.target(x0, noise, t).float()).pow(2).mean()
        optimizer_step(loss, opt, params, ema, step, lr, cfg, log, bar)
        done = step + 1
        grid_now = cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps
        save_now = cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps
        if grid_now or save_now:
            with ema.applied() if ema is not None else contextlib.nullcontext():
                _eval_mode([transformer])
                videos, summary = sample_video_grid(model, list(GRID_CAPTIONS), cfg.sample_steps, cfg.guidance, seed)
                if save_now:
                    save_stage(pipe, out / "stages" / f"step_{done:06d}", cfg, done, summary, sampling_defaults(cfg))
                _train_mode([transformer])
            stages[done] = summary
            save_video_grid(videos[:16], out / "samples" / f"step_{done:06d}.png")
            tqdm.write(f"step {done}: grid ({len(GRID_CAPTIONS)} videos) {_short(summary)}")
    log.close()
    if ema is not None:
        ema.copy_to_params()
    transformer.requires_grad_(False)
    _eval_mode([transformer])
    videos, summary = sample_video_grid(model, list(GRID_CAPTIONS), cfg.sample_steps, cfg.guidance, seed)
    save_video_grid(videos[:16], out / "samples.png")
    pipe.save_pretrained(out, safe_serialization=True)
    return {
        "sampling": sampling_defaults(cfg),
        "latent_size": VIDEO_LATENT_SIZE,
        "latent_frames": VIDEO_FRAMES,
        "vae": vae_source,
        "vae_seconds": round(vae_seconds, 1),
        "vae_reconstruction_oracle": vae_report,
        "latents_mean": mean,
        "latents_std": std,
        "stage_grid_oracle": stages,
        "final_grid_oracle": summary,
    }


__all__ = [
    "CollapsedPaddingWanAttnProcessor",
    "collapsed_padding",
    "compact_prompt_embeds",
    "load_video_vae",
    "train_video",
    "vae_forward",
]
