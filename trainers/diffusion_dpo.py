"""Diffusion-DPO (and Flow-DPO) on any model family, with any pairwise loss of :mod:`visalign.losses`.

Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference Optimization", Eq. 14: winner and loser
share the noise and the timestep; ``e`` is each sample's mean squared denoising error under the policy and
(no-grad) the reference; the log-ratio is ``r = -1/2 (e_theta - e_ref)`` and the default loss is
``-log sigma(beta (r_w - r_l))`` with ``beta = 5000`` for epsilon-prediction UNets. Flow families (SD3, FLUX,
Wan) get Flow-DPO from the same code: the family supplies the velocity target.

Departures from the paper and the reference script, and why:

* ``e`` is a *mean* over latent elements with the 1/2 inside the log-ratio (the diffusers SD1.5 example uses
  beta = 2500 without the 1/2: the same strength). SimpleTuner sums over elements, so its beta is not comparable.
* LoRA by default (the paper fine-tunes fully): the reference is the same network with the adapter disabled, no
  second copy. ``full_finetune`` keeps a frozen copy, optionally offloaded to the CPU.
* Pairs are encoded once (VAE latents and text conditioning) and cached on disk, not re-encoded every step.
* Any pairwise loss (ipo, robust, hinge, ...) or a weighted mix works; ``soft`` reads soft labels from the data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from trainers.base import LORA_FORMAT_HELP, TrainConfig, export_lora_format, resolve_device, write_model_card
from trainers.speed import ATTENTION_HELP, SpeedOptions, apply_speed_options
from visalign import losses
from visalign.config import field
from visalign.distributed import gather_with_grad
from visalign.errors import ConfigError
from visalign.models import cat_cond
from visalign.seeding import example_generators


def parse_params(text: str | None) -> dict[str, float | str]:
    """``"label_smoothing=0.1,f_divergence_type=js_divergence"`` -> a dict (numbers parsed)."""
    params: dict[str, float | str] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"loss_params item {item!r} must look like name=value")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            params[key.strip()] = value.strip()
    return params


@dataclass
class DiffusionDPOConfig(SpeedOptions, TrainConfig):
    model: str | None = field(None, help="base pipeline: hub id or local folder (e.g. assets/toyworld/toy-sd)")
    data: str | None = field(None, help="preference pairs: .jsonl/.parquet, a folder, a saved dataset or a hub id")
    loss: str = field("sigmoid", help="pairwise loss (or 'name:weight,...' mix) from visalign.losses")
    beta: float = field(5000.0, help="DPO strength on r = -1/2 (e - e_ref) (5000 for SD1.5/SDXL in the paper)")
    loss_params: str | None = field(None, help="extra loss hyper-parameters, e.g. 'label_smoothing=0.1'")
    resolution: int | None = field(None, help="training resolution (default: the family's)")
    num_frames: int | None = field(None, help="frames per video (video families)")
    lora_rank: int = field(8, help="LoRA rank")
    lora_alpha: float | None = field(None, help="LoRA alpha (default: the rank)")
    lora_targets: str | None = field(None, help="comma-separated module names for LoRA (default: attention)")
    full_finetune: bool = field(False, help="train every denoiser weight (keeps a frozen reference copy)")
    offload_reference: bool = field(False, help="with full_finetune: keep the reference copy on the CPU")
    timestep_min: float = field(0.0, help="train only on timesteps >= this (scheduler units, 0..1000)")
    timestep_max: float = field(1000.0, help="train only on timesteps < this")
    dtype: str = field("fp32", help="frozen weights dtype: fp32, fp16 or bf16 (LoRA weights stay fp32)")
    device: str = field("auto", help="cpu, cuda or auto")
    attention: str = field("sdpa", help=ATTENTION_HELP)
    split: str = field("train", help="dataset split to train on (hub datasets and saved DatasetDicts)")
    streaming: bool = field(False, help="stream a hub dataset (or .parquet/.jsonl) instead of downloading it first; "
                                        "pairs are encoded every step (implies --cache none)")  # fmt: skip
    max_train_samples: int | None = field(None, help="train on the first N pairs only (after dropping ties)")
    random_flip: bool = field(
        False, help="mirror each pair left-right with probability 1/2 per visit (the cache keeps both orientations)"
    )
    cache: Literal["disk", "none"] = field(
        "disk", help="disk: encode latents and text once into sharded files read memory-mapped; none: every batch"
    )
    cache_dir: str | None = field(None, help="latent cache folder (default: OUTPUT_DIR/../.cache/latents)")
    cache_shard_size: int = field(1024, help="pairs per cache shard (a killed build resumes shard by shard)")
    lora_format: Literal["diffusers", "kohya", "comfyui"] = field("diffusers", help=LORA_FORMAT_HELP)
    eval_prompts: str | None = field(None, help="prompts to sample at evaluation (.txt/.jsonl; default: none)")
    eval_samples: int = field(16, help="samples per evaluation (seeds eval_seed..eval_seed+n-1)")
    eval_seed: int | None = field(None, help="seed of the first evaluation sample (default: --seed)")
    eval_steps: int = field(20, help="sampling steps at evaluation")
    eval_guidance: float | None = field(None, help="guidance at evaluation (default: the family's)")
    oracle: bool = field(False, help="score evaluation samples with the shapes-world oracle")
    eval_reward: str | None = field(None, help="reward spec scored on evaluation samples (a gold metric to watch)")

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ConfigError("model is required: --model HUB_ID_OR_FOLDER")
        if not self.data:
            raise ConfigError("data is required: --data PAIRS (.jsonl, .parquet, folder or dataset id)")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.lora_rank <= 0 and not self.full_finetune:
            raise ConfigError(f"lora_rank must be > 0 (or pass --full_finetune), got {self.lora_rank}")
        if not 0 <= self.timestep_min < self.timestep_max <= 1000:
            raise ConfigError(
                f"need 0 <= timestep_min < timestep_max <= 1000, got {self.timestep_min}, {self.timestep_max}"
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.cache_shard_size < 1:
            raise ConfigError(f"cache_shard_size must be >= 1, got {self.cache_shard_size}")
        if self.offload_reference and not self.full_finetune:
            raise ConfigError("offload_reference needs --full_finetune (LoRA uses the base itself as reference)")


def sd15_pickapic(**overrides) -> DiffusionDPOConfig:
    """Diffusion-DPO on SD1.5 with Pick-a-Pic v2 (Wallace et al. 2024, Sec. 5 and App. B)."""
    values = dict(
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        data="yuvalkirstain/pickapic_v2",  # 851K pairs, ties dropped (Sec. 5)
        beta=5000.0,  # Sec. 5 ("beta = 5000"); our 1/2-inside convention matches it
        learning_rate=2.048e-5,  # 1e-8 scaled by the effective batch 2048 (App. B)
        batch_size=1, gradient_accumulation_steps=128,  # x 16 GPUs = effective batch 2048 (App. B)
        max_steps=2000,  # App. B
        warmup_steps=500, lr_scheduler="constant_with_warmup",  # diffusers example
        resolution=512, full_finetune=True, mixed_precision="fp16",
    )  # fmt: skip
    return DiffusionDPOConfig(**{**values, **overrides})


def sdxl_pickapic(**overrides) -> DiffusionDPOConfig:
    """Diffusion-DPO on SDXL with Pick-a-Pic v2 (Wallace et al. 2024, App. B: 200 steps at batch 2048)."""
    values = dict(
        model="stabilityai/stable-diffusion-xl-base-1.0", data="yuvalkirstain/pickapic_v2",
        beta=5000.0, learning_rate=2.048e-5, batch_size=1, gradient_accumulation_steps=128,
        max_steps=200, warmup_steps=50, resolution=1024, full_finetune=True, mixed_precision="fp16",
    )  # fmt: skip
    return DiffusionDPOConfig(**{**values, **overrides})


PRESETS = {"sd15-pickapic": sd15_pickapic, "sdxl-pickapic": sdxl_pickapic}


class DiffusionDPO:
    """The Diffusion-DPO / Flow-DPO task for :class:`trainers.base.Trainer`."""

    def __init__(self, config: DiffusionDPOConfig, model=None):
        from visalign.cache import encode_pairs
        from visalign.data import load_preference_data
        from visalign.models import load_model

        self.config = cfg = config
        self.epoch = 0  # set by the loop (set_epoch): per-example draws are seeded by (seed, epoch, index)
        torch.manual_seed(cfg.seed)  # the LoRA initialisation is part of the run's seeded state
        self.objective = losses.build(cfg.loss, beta=cfg.beta, **parse_params(cfg.loss_params))
        self.needs_reference = bool(self.objective.inputs & {"chosen_logratios", "rejected_logratios"})
        device = resolve_device(cfg.device)
        self.model = model or load_model(cfg.model, device=device, dtype=cfg.dtype, attention=cfg.attention)
        if cfg.full_finetune:
            if self.needs_reference:
                self.model.set_reference(copy.deepcopy(self.model.denoiser), offload=cfg.offload_reference)
            self.params = [p for p in self.model.denoiser.parameters()]
            for p in self.params:
                p.requires_grad_(True)
            self.model.denoiser.train()
        else:
            self.params = self.model.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                              target_modules=cfg.lora_targets)  # fmt: skip
        if cfg.gradient_checkpointing:
            self.model.denoiser.enable_gradient_checkpointing()
        apply_speed_options(self.model, cfg)
        if cfg.lora_format != "diffusers":
            from visalign.models.lora_formats import check_format

            check_format(self.model.family, cfg.lora_format)  # before any training
        resolution = cfg.resolution or self.model.default_resolution
        self.pairs = load_preference_data(cfg.data, resolution=resolution, num_frames=cfg.num_frames,
                                          split=cfg.split, limit=cfg.max_train_samples, streaming=cfg.streaming,
                                          seed=cfg.seed)  # fmt: skip
        if self.pairs.video != self.model.is_video:
            kind = "videos" if self.pairs.video else "images"
            raise ConfigError(f"{cfg.data} holds {kind} but {cfg.model} is a {self.model.family} model")
        self.encoded = None
        if cfg.cache == "disk" and not cfg.streaming:
            cache = cfg.cache_dir or str(Path(cfg.output_dir).parent / ".cache" / "latents")
            self.encoded = encode_pairs(self.model, self.pairs, cache, shard_size=cfg.cache_shard_size,
                                        flip=cfg.random_flip, progress=cfg.progress)  # fmt: skip

    # ----------------------------------------------------------------- Task protocol
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def shard(self, apply) -> None:
        """Shard the denoiser (and a full fine-tune's reference copy) over processes; train the sharded weights."""
        self.model.shard(apply)
        full = self.config.full_finetune
        self.params = list(self.model.denoiser.parameters()) if full else self.model.lora_parameters()

    def train_dataset(self):
        return self.pairs if self.encoded is None else self.encoded

    def collate(self, rows):
        return self.train_dataset().collate(rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps, redrawn until inside ``[timestep_min, timestep_max)`` (segment training)."""
        cfg = self.config
        t = self.model.sample_timesteps(batch_size, generator=generator)
        if cfg.timestep_min <= 0 and cfg.timestep_max >= 1000:
            return t
        for _ in range(1000):
            bad = (t < cfg.timestep_min) | (t >= cfg.timestep_max)
            if not bad.any():
                return t
            t = torch.where(bad, self.model.sample_timesteps(batch_size, generator=generator), t)
        raise ConfigError(f"could not draw timesteps in [{cfg.timestep_min}, {cfg.timestep_max})")

    def latents(self, batch, flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Winner and loser latents and the conditioning of a batch: read from the cache, or (``cache none``)
        encoded now with the same per-row posterior draws the cache would have stored."""
        from visalign.cache import encode_media, flip_media

        model, mask = self.model, torch.tensor(flips, dtype=torch.bool)
        if self.encoded is not None:
            pick = [(k, k + "_flip") for k in ("chosen", "rejected")]
            out = [torch.where(mask.view(-1, *[1] * (batch[a].ndim - 1)), batch[b], batch[a]) if any(flips)
                   else batch[a] for a, b in pick]  # fmt: skip
            return out[0], out[1], batch["cond"]
        rows = [self.pairs.source_row(int(i)) for i in batch["index"]]
        out = []
        with torch.no_grad():
            for key in ("chosen", "rejected"):
                media = batch[key]
                z = encode_media(model, media, rows, 0, key)
                if any(flips):
                    zf = encode_media(model, flip_media(media[mask]), [r for r, f in zip(rows, flips) if f], 0,
                                      key + "_flip")  # fmt: skip
                    z[mask.to(z.device)] = zf
                out.append(z)
            cond = model.encode_prompt(batch["prompt"])
        return out[0], out[1], cond

    def errors(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample errors ``[2B]`` (chosen then rejected) of the policy and, if needed, the reference.

        Every draw of an example (flip, noise, timestep) comes from a generator seeded by (seed, epoch, example
        index), so the same example gets the same draws whatever the batch size or number of processes."""
        model, cfg = self.model, self.config
        gens = example_generators(cfg.seed, batch["index"].tolist(), "dpo", self.epoch)
        flips = [bool(torch.randint(2, (1,), generator=g)) if cfg.random_flip else False for g in gens]
        chosen, rejected, cond = self.latents(batch, flips)
        chosen, rejected = chosen.to(model.device, model.dtype), rejected.to(model.device, model.dtype)
        cond = {k: v.to(model.device, model.dtype) for k, v in cond.items()}
        shape = chosen.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(model.device, model.dtype)
        t = torch.cat([self.sample_timesteps(1, g) for g in gens])  # noise shared by winner and loser (Eq. 14)
        x0, eps, tt, cc = (
            torch.cat([chosen, rejected]),
            torch.cat([noise, noise]),
            torch.cat([t, t]),
            cat_cond(cond, cond),
        )
        errors = model.denoising_error(x0, eps, tt, cc)
        if not self.needs_reference:
            return errors, None
        with torch.no_grad(), model.reference():
            ref_errors = model.denoising_error(x0, eps, tt, cc)
        return errors, ref_errors

    def loss(self, batch):
        errors, ref_errors = self.errors(batch)
        e_w, e_l = errors.chunk(2)
        inputs = {}
        if ref_errors is not None:
            r = losses.diffusion_logratios(errors, ref_errors)
            inputs["chosen_logratios"], inputs["rejected_logratios"] = r.chunk(2)
            ref_w, ref_l = ref_errors.chunk(2)
        if {"chosen_errors", "rejected_errors"} & self.objective.inputs:
            inputs["chosen_errors"], inputs["rejected_errors"] = e_w, e_l
        if "preference_probs" in self.objective.inputs:
            inputs["preference_probs"] = batch["label"].to(errors.device)
        # the loss sees the global batch (batch-level losses such as aot sort over it), as one process would
        per_pair, metrics = self.objective(**{k: gather_with_grad(v) for k, v in inputs.items()})
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["error/chosen"], metrics["error/rejected"] = float(e_w.detach().mean()), float(e_l.detach().mean())
        if ref_errors is not None:  # the paper's implicit accuracy: the winner improved more than the loser
            metrics["implicit_accuracy"] = float(((e_w - ref_w) < (e_l - ref_l)).float().mean())
        return per_pair.mean(), metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.full_finetune:
            return {k: v for k, v in self.model.denoiser.state_dict().items()}
        return self.model.lora_state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.config.full_finetune:
            self.model.denoiser.load_state_dict(state)
            return
        self.model.load_lora_state_dict(state)

    # ----------------------------------------------------------------- evaluation and export
    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        if not self.config.eval_prompts:
            return {}
        self.model.denoiser.eval()
        try:
            return self.sample_figures(self.model, out_dir)
        finally:
            if self.config.full_finetune:
                self.model.denoiser.train()

    def sample_figures(self, model, out_dir: Path) -> dict[str, float]:
        """Oracle and ``eval_reward`` figures of ``model``'s samples of ``eval_prompts`` (seeded as configured)."""
        from visalign.evaluation import evaluate_samples

        cfg = self.config
        return evaluate_samples(
            model,
            cfg.eval_prompts,
            out_dir,
            n=cfg.eval_samples,
            steps=cfg.eval_steps,
            guidance=cfg.eval_guidance,
            seed=cfg.seed if cfg.eval_seed is None else cfg.eval_seed,
            oracle=cfg.oracle,
            resolution=cfg.resolution,
            num_frames=cfg.num_frames,
            scorers=self.eval_scorers(),
        )

    def eval_scorers(self) -> dict:
        """The evaluation reward (``eval_reward``) as ``{spec: fn(media, prompts) -> [N]}``, built once."""
        if not self.config.eval_reward:
            return {}
        if getattr(self, "_eval_reward", None) is None:
            from reward_models import build_reward

            self._eval_reward = build_reward(self.config.eval_reward, device=self.model.device)

        def score(media, prompts):
            with torch.no_grad():
                return self._eval_reward(media.to(self.model.device), prompts).scores.cpu()

        return {self.config.eval_reward: score}

    def export(self, out_dir: Path, results: dict[str, float]) -> None:
        cfg = self.config
        if cfg.full_finetune:
            self.model.save_pipeline(out_dir)
            usage = f'pipe = DiffusionPipeline.from_pretrained("{out_dir}")'
        else:
            self.model.save_lora(out_dir)
            usage = f'pipe = DiffusionPipeline.from_pretrained("{cfg.model}")\npipe.load_lora_weights("{out_dir}")'
            usage += export_lora_format(out_dir, cfg.lora_format, self.model.family)
        write_model_card(
            out_dir,
            title=f"{type(self).__name__} ({cfg.loss}, beta={cfg.beta:g}) on {cfg.model}",
            base_model=cfg.model,
            data=cfg.data,
            config=cfg,
            results=results,
            usage="from diffusers import DiffusionPipeline\n" + usage,
        )
