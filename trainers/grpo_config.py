"""GRPO's options (:class:`GRPOConfig`) and its paper presets (:data:`PRESETS`, ``visalign train grpo --preset``).

The trainer is :mod:`trainers.grpo`, which re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.base import LORA_FORMAT_HELP, TrainConfig
from trainers.speed import ATTENTION_HELP, SpeedOptions
from visalign.config import field
from visalign.errors import ConfigError

TIMESTEP_SELECTIONS = ("all-but-last", "random", "window")
SAMPLER_NOISE_ARG = {"flow-sde": "noise_level", "cps": "noise_level", "dance-sde": "eta", "ddim": "eta"}


@dataclass
class GRPOConfig(SpeedOptions, TrainConfig):
    """GRPO options. ``batch_size`` is the number of prompts per process per rollout."""

    model: str | None = field(None, help="base pipeline: hub id or local folder (e.g. assets/toyworld/toy-flow)")
    reward: str | None = field(None, help="reward spec to maximise, e.g. 'pickscore' or 'pickscore:1,aesthetic:0.1'")
    prompts: str | None = field(None, help="training prompts: .txt/.jsonl file or one literal prompt")
    negative_prompt: str | None = field(None, help="negative prompt of classifier-free guidance (default: '')")
    resolution: int | None = field(None, help="sample height and width (default: the family's)")
    num_frames: int | None = field(None, help="frames per video (video families)")
    lora_format: Literal["diffusers", "kohya", "comfyui"] = field("diffusers", help=LORA_FORMAT_HELP)
    group_size: int = field(8, help="samples per prompt (G); advantages compare samples of one prompt")
    steps: int = field(10, help="sampling steps of a rollout")
    guidance: float | None = field(None, help="CFG scale in rollouts and training alike (default: the family's)")
    sampler: str = field("auto", help="auto (flow-sde / ddim by family), flow-sde, dance-sde, cps or ddim")
    noise_level: float | None = field(None, help="sampler noise: a for flow-sde/cps, eta for dance-sde/ddim")
    same_noise_per_group: bool = field(False, help="start every sample of a group from the same initial noise")
    rollout_batch_size: int = field(0, help="samples per sampling forward in rollouts (0: the whole rollout)")
    timestep_selection: str = field("all-but-last", help="steps trained: all-but-last, random (per sample) or window")
    timestep_fraction: float = field(0.6, help="share of steps trained per sample with timestep_selection=random")
    sde_window: int = field(2, help="SDE steps per rollout with timestep_selection=window (noise-free elsewhere)")
    sde_window_range: int = field(0, help="the window lies in steps [0, range) (0: the first half)")
    train_batch_size: int = field(0, help="samples per training micro-batch (0: the whole rollout)")
    samples_per_update: int = field(0, help="samples whose gradients make one optimizer step (0: the whole rollout)")
    inner_epochs: int = field(1, help="passes over each rollout (PPO epochs)")
    shuffle_samples: bool = field(True, help="shuffle samples before each inner epoch")
    clip_range: float = field(1e-4, help="PPO clip range c on the ratio (1e-4 Flow-GRPO, 1e-5 its fast variant)")
    adv_clip_max: float = field(5.0, help="advantages clipped to [-x, x]")
    advantage_std: str = field("group", help="divide by the std of the prompt's group, the whole 'batch', or 'none'")
    advantage_history: int = field(0, help="rewards kept per prompt across rollouts as baseline (0: this rollout)")
    skip_flat_groups: bool = field(
        False,
        help="leave out of the update the groups whose rewards all tie (advantage 0; DAPO's filter): the same "
        "policy gradient for less compute, normalised over the samples trained; their KL term goes too",
    )
    beta_kl: float = field(0.04, help="KL weight to the reference (0.04 GenEval/OCR, 0.01 PickScore, 0: no ref pass)")
    lora_rank: int = field(32, help="LoRA rank")
    lora_alpha: float | None = field(64.0, help="LoRA alpha (None: the rank)")
    lora_targets: str | None = field(None, help="comma-separated module names for LoRA (default: attention)")
    ema_decay: float = field(0.0, help="EMA of the LoRA weights for evaluation and export (0: off)")
    dtype: str = field("fp32", help="frozen weights dtype: fp32, fp16 or bf16 (LoRA weights and log-probs fp32)")
    device: str = field("auto", help="cpu, cuda or auto")
    attention: str = field("sdpa", help=ATTENTION_HELP)
    eval_prompts: str | None = field(None, help="held-out prompts sampled at evaluation (.txt/.jsonl)")
    eval_samples: int = field(16, help="samples per evaluation (seeds eval_seed..eval_seed+n-1)")
    eval_seed: int | None = field(
        None,
        help="seed of the first evaluation sample (default: --seed); select "
        "checkpoints on one seed set, then report on another with visalign evaluate --seed",
    )
    eval_steps: int = field(20, help="sampling steps at evaluation (ODE)")
    eval_guidance: float | None = field(None, help="guidance at evaluation (default: the rollout guidance)")
    oracle: bool = field(False, help="score evaluation samples with the shapes-world oracle (the gold metric)")
    eval_reward: str | None = field(None, help="reward spec scored at evaluation; the gold metric without --oracle")
    reference_data: str | None = field(None, help="folder of reference images for the drift FD (monitor)")
    monitor_patience: int = field(2, help="evaluations in a row with gold down and reward up before the alarm")
    monitor_min_gold_drop: float = field(0.05, help="gold-metric drop below its peak that counts")
    early_stop: bool = field(False, help="stop training when the reward-hacking alarm is raised")

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ConfigError("model is required: --model HUB_ID_OR_FOLDER")
        if not self.prompts:
            raise ConfigError("prompts is required: --prompts FILE.txt (or one literal prompt)")
        if self.sampler not in ("auto", *SAMPLER_NOISE_ARG):
            raise ConfigError(f"sampler must be auto or one of {sorted(SAMPLER_NOISE_ARG)}, got {self.sampler!r}")
        if self.timestep_selection not in TIMESTEP_SELECTIONS:
            raise ConfigError(f"timestep_selection must be one of {TIMESTEP_SELECTIONS}")
        if self.advantage_std not in ("group", "batch", "none"):
            raise ConfigError(f"advantage_std must be group, batch or none, got {self.advantage_std!r}")
        if self.skip_flat_groups and self.advantage_history:
            raise ConfigError(
                "skip_flat_groups drops groups whose rewards tie, whose advantage is 0 only against their own mean: "
                "with advantage_history the baseline is the prompt's history, so leave one of the two off"
            )
        if self.advantage_history and self.advantage_std == "none":
            raise ConfigError("advantage_history tracks z-scores: use advantage_std group or batch with it")
        for name in ("group_size", "steps", "inner_epochs", "lora_rank", "monitor_patience", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rollout_batch_size", "train_batch_size", "samples_per_update", "advantage_history"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: the default), got {getattr(self, name)}")
        if not (0 < self.clip_range < 1 and self.adv_clip_max > 0 and self.beta_kl >= 0):
            raise ConfigError("need 0 < clip_range < 1, adv_clip_max > 0 and beta_kl >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        n = self.samples_per_rollout
        per_update = self.samples_per_update or n
        micro = self.train_batch_size or n
        if n % per_update or per_update % micro:
            raise ConfigError(
                f"a rollout has batch_size x group_size = {n} samples: samples_per_update ({per_update}) must divide "
                f"it and train_batch_size ({micro}) must divide samples_per_update"
            )
        derived = per_update // micro * self.trained_steps
        if self.gradient_accumulation_steps not in (1, derived):
            raise ConfigError(
                f"GRPO derives gradient_accumulation_steps = (samples_per_update / train_batch_size) x trained steps "
                f"= {derived}; set samples_per_update / train_batch_size instead of gradient_accumulation_steps"
            )
        self.gradient_accumulation_steps = derived
        per_rollout = self.updates_per_rollout
        for name in ("max_steps", "checkpoint_every"):
            if getattr(self, name) % per_rollout:
                raise ConfigError(
                    f"{name} ({getattr(self, name)}) must be a multiple of the {per_rollout} optimizer steps each "
                    "rollout feeds (inner_epochs x samples per rollout / samples_per_update), so checkpoints fall "
                    "between rollouts and resume exactly"
                )

    @property
    def samples_per_rollout(self) -> int:
        return self.batch_size * self.group_size

    @property
    def updates_per_rollout(self) -> int:
        return self.inner_epochs * self.samples_per_rollout // (self.samples_per_update or self.samples_per_rollout)

    @property
    def trained_steps(self) -> int:
        """Steps trained per sample: ``K``."""
        if self.timestep_selection == "all-but-last":
            if self.steps < 2:
                raise ConfigError("timestep_selection=all-but-last needs steps >= 2")
            return self.steps - 1
        if self.timestep_selection == "random":
            if not 0 < self.timestep_fraction <= 1:
                raise ConfigError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
            return max(1, round(self.timestep_fraction * self.steps))
        window_range = self.sde_window_range or max(self.steps // 2, self.sde_window)
        if not 1 <= self.sde_window <= window_range <= self.steps:
            raise ConfigError(
                f"need 1 <= sde_window ({self.sde_window}) <= sde_window_range ({window_range}) "
                f"<= steps ({self.steps})"
            )
        return self.sde_window


# ----------------------------------------------------------------------------------------------- presets
def flow_grpo_sd3_pickscore(**overrides) -> GRPOConfig:
    """Flow-GRPO on SD3.5-Medium with PickScore (Liu et al. 2025, Sec. 5 and the flow_grpo pickscore config)."""
    values = dict(
        model="stabilityai/stable-diffusion-3.5-medium", reward="pickscore",
        resolution=512,  # Sec. 5.1: 512 px training
        steps=10, guidance=4.5,  # Sec. 5.1: T = 10 training steps ("denoising reduction"), CFG 4.5
        group_size=24, noise_level=0.7,  # Sec. 5.1: G = 24; a = 0.7
        beta_kl=0.01,  # Sec. 5.1: beta = 0.01 for PickScore
        clip_range=1e-4, adv_clip_max=5.0, advantage_std="batch",  # flow_grpo config (global_std)
        learning_rate=3e-4, lora_rank=32, lora_alpha=64.0, ema_decay=0.9,  # flow_grpo config
        eval_steps=40, mixed_precision="bf16", dtype="bf16",
    )  # fmt: skip
    return GRPOConfig(**{**values, **overrides})


def flow_grpo_sd3_geneval(**overrides) -> GRPOConfig:
    """Flow-GRPO on SD3.5-Medium with a GenEval-style reward served over HTTP (flow_grpo runs its detector
    scorer as a separate server too): start it with ``visalign serve-reward`` and pass its URL."""
    values = dict(reward="remote:http://127.0.0.1:8765", beta_kl=0.04)  # Sec. 5.1: beta = 0.04 for GenEval
    return flow_grpo_sd3_pickscore(**{**values, **overrides})


def flow_grpo_fast_sd3(**overrides) -> GRPOConfig:
    """Flow-GRPO-Fast: an SDE window of 2 steps in the first half, no KL, clip 1e-5 (flow_grpo fast configs)."""
    values = dict(timestep_selection="window", sde_window=2, beta_kl=0.0, clip_range=1e-5)
    return flow_grpo_sd3_pickscore(**{**values, **overrides})


def dance_grpo_flux_hps(**overrides) -> GRPOConfig:
    """DanceGRPO on FLUX.1-dev with HPS v2.1 (Xue et al. 2025; its FLUX training script). DanceGRPO fine-tunes
    every weight with lr 1e-5; here a LoRA (lr 1e-4) does the work."""
    values = dict(
        model="black-forest-labs/FLUX.1-dev", reward="hps-v2.1",
        resolution=720, steps=16, guidance=3.5,  # script: 720 px, 16 sampling steps, distilled guidance 3.5
        sampler="dance-sde", noise_level=0.3, group_size=12,  # eta = 0.3, 12 generations per prompt
        timestep_selection="random", timestep_fraction=0.6,  # 60% of the steps per sample
        beta_kl=0.0, clip_range=1e-4, adv_clip_max=5.0, advantage_std="group",
        learning_rate=1e-4, lora_rank=32, lora_alpha=64.0, mixed_precision="bf16", dtype="bf16",
    )  # fmt: skip
    return GRPOConfig(**{**values, **overrides})


def toy_flow_clip(**overrides) -> GRPOConfig:
    """The shapes world: Flow-GRPO on toy-flow with the toy-clip reward, judged by the oracle (README figure)."""
    values = dict(
        model="assets/toyworld/toy-flow", reward="clip(model=assets/toyworld/toy-clip)",
        prompts="assets/toyworld/prompts/held_in.txt", eval_prompts="assets/toyworld/prompts/held_in.txt",
        oracle=True, resolution=64, steps=10, guidance=4.5, group_size=8, batch_size=4, advantage_std="batch",
        beta_kl=0.01, learning_rate=3e-4, lora_rank=8, lora_alpha=16.0, eval_samples=200, eval_steps=20,
    )  # fmt: skip
    return GRPOConfig(**{**values, **overrides})


PRESETS = {
    "flow-grpo-sd3-pickscore": flow_grpo_sd3_pickscore,
    "flow-grpo-sd3-geneval": flow_grpo_sd3_geneval,
    "flow-grpo-fast-sd3": flow_grpo_fast_sd3,
    "dance-grpo-flux-hps": dance_grpo_flux_hps,
    "toy-flow-clip": toy_flow_clip,
}
