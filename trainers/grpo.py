"""GRPO for diffusion and flow models on every family: Flow-GRPO, DanceGRPO and MixGRPO-style SDE windows.

Each rollout samples ``group_size`` images (or videos) for each of ``batch_size`` prompts with a stochastic sampler
of :mod:`visalign.samplers` (Flow-SDE, Dance-SDE or CPS for SD3/FLUX/Wan; DDIM-eta for SD1.5/SDXL/CogVideoX), keeping
the latent trajectory and the fp32 log-prob of every step. The reward scores the samples; group-relative
advantages ``(r - mean_prompt) / (std + 1e-4)`` (clipped to ``+-adv_clip_max``) weight the PPO-clip surrogate on
``rho = exp(logp - logp_old)`` of the chosen steps, plus ``beta_kl`` times the KL to the reference (the same
network with the LoRA disabled), ``mean(||mu - mu_ref||^2) / (2 s^2)``:

* Flow-GRPO (Liu et al. 2025, arXiv:2505.05470, Eq. 6-9): Flow-SDE, all steps but the last, batch std.
* DanceGRPO (Xue et al. 2025, arXiv:2505.07818): Dance-SDE, a random ``timestep_fraction`` of steps per sample.
* MixGRPO (Li et al. 2025) / Flow-GRPO-Fast: an SDE window of a few steps, noise-free steps elsewhere, and
  training on the window only (about half the time: fewer trained steps, one window per rollout).

One rollout feeds ``inner_epochs * N / samples_per_update`` optimizer steps of the shared loop; each step
accumulates one micro-batch per (``train_batch_size`` samples, trained step), so memory holds one forward at a
time as in flow_grpo (``gradient_accumulation_steps`` is derived, not set). Rollout and training call the same
one-step function (:meth:`DiffusionModel.sde_step`): same timestep grid, CFG and schedule, fp32 log-probs.

Departures from the reference code, and why:

* LoRA only; the reference is the base with the adapter disabled, never a copy.
* Samples whose reward is NaN or ``valid=False`` are excluded from advantages and from the update, and counted
  (``rollout/invalid``); the reference scripts train on them. ``skip_flat_groups`` also leaves out the groups whose
  rewards tie (advantage 0), as DAPO does; the loss is a mean over the samples trained in the whole rollout. A
  reward that fails (a remote one that times out) stops the run naming the step, instead of hanging or training
  on garbage.
* Each process rolls out whole groups; rewards are gathered over processes before advantages, so groups and the
  ``batch`` std span every process (as flow_grpo). Each sample draws its noise from a generator seeded by
  (seed, epoch, prompt, member) and the SDE window from (seed, rollout), so N processes x ``batch_size`` B roll
  out and train what one process x N*B does (with ``samples_per_update`` the whole rollout).
* Evaluation scores the training reward and a gold metric on the same seeded held-out samples and feeds
  :class:`visalign.monitors.RewardHackingMonitor` (alarm, optional early stop).
"""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import torch

from trainers.base import TrainingError, export_lora_format, resolve_device, write_model_card
from trainers.grpo_config import (  # noqa: F401  (re-exported: the trainer's options and presets)
    PRESETS,
    SAMPLER_NOISE_ARG,
    TIMESTEP_SELECTIONS,
    GRPOConfig,
    dance_grpo_flux_hps,
    flow_grpo_fast_sd3,
    flow_grpo_sd3_geneval,
    flow_grpo_sd3_pickscore,
    toy_flow_clip,
)
from trainers.speed import apply_speed_options
from visalign.advantages import PromptStatTracker, clip_advantages, flat_groups, group_advantages, ppo_clip_loss
from visalign.distributed import gather_rows, process_state
from visalign.errors import ConfigError
from visalign.models import cat_cond, index_cond
from visalign.samplers import get_sampler
from visalign.sde import kl_to_reference
from visalign.seeding import example_generator, example_seed


# ----------------------------------------------------------------------------------------------- rollouts
def sample_seed(seed: int, epoch: int, prompt_id: int, member: int) -> int:
    """The generator seed of one rollout sample: member ``member`` of prompt ``prompt_id``'s group in ``epoch``.

    A hash (63 bits), so it is the same whichever process samples it (world-size invariance) and, but with
    negligible probability, never one of the small integers evaluation seeds samples with (``seed + i``): no
    rollout starts from the initial noise of a sample the run is judged on."""
    return example_seed(seed, "rollout", epoch, prompt_id, member)


@dataclass
class Rollout:
    """One rollout: ``N = prompts x group_size`` samples and what training needs of them.

    Attributes:
        prompts: ``N`` prompts; prompt_ids: ``[N]`` indices into the task's prompt list (the groups).
        cond, uncond: text conditioning ``[N, ...]`` (``uncond`` ``None`` without CFG).
        trajectory: ``[N, S + 1, ...]`` latents before each step and after the last.
        log_probs: ``[N, S]`` fp32 log-probs at rollout time (0 at noise-free steps).
        train_steps: ``[N, K]`` step indices trained for each sample.
        scheduler: the timestep grid of the rollout (rebuilt identically for training).
        pixels: ``[N, ...]`` decoded samples in [0, 1].
        rewards, valid, advantages: ``[N]`` (NaN rewards are invalid; invalid samples get advantage 0).
        trained: ``[N]`` the samples the update trains (valid, and not in a flat group with ``skip_flat_groups``);
            sample_weight: ``N_all / trained_all`` over every process (a trained sample's loss weight x N_all).
        clean: ``[N, ...]`` the pixels encoded again (RWR's regression targets; ``None`` for GRPO).
    """

    prompts: list[str]
    prompt_ids: torch.Tensor
    cond: dict
    uncond: dict | None
    trajectory: torch.Tensor
    log_probs: torch.Tensor
    train_steps: torch.Tensor
    scheduler: Any
    pixels: torch.Tensor
    rewards: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    trained: torch.Tensor | None = None
    sample_weight: float = 1.0
    clean: torch.Tensor | None = None
    metrics: dict[str, float] = dc_field(default_factory=dict)


class TextCache:
    """Text conditioning (and its CFG branch) computed once per prompt, kept on the model's device.

    Each prompt is encoded alone: a batched encoder's output depends (in the last bits) on what it is batched
    with, and a resumed run must see exactly the embeddings of an uninterrupted one.
    """

    def __init__(self, model, negative_prompt: str | None, cfg: bool):
        self.model, self.negative_prompt, self.cfg = model, negative_prompt, cfg
        self.rows: dict[str, tuple[dict, dict | None]] = {}

    def __call__(self, prompts: list[str]) -> tuple[dict, dict | None]:
        for p in dict.fromkeys(p for p in prompts if p not in self.rows):
            cond = self.model.encode_prompt([p])
            self.rows[p] = (cond, self.model.negative_cond(cond, self.negative_prompt) if self.cfg else None)
        conds = [self.rows[p] for p in prompts]
        return cat_cond(*[c for c, _ in conds]), (cat_cond(*[u for _, u in conds]) if self.cfg else None)


class GRPO:
    """The GRPO task for :class:`trainers.base.Trainer` (an online task: ``wants_data`` / ``loss(None)``)."""

    def __init__(self, config: GRPOConfig, model=None, reward=None):
        from visalign.evaluation import read_prompts
        from visalign.models import load_model
        from visalign.monitors import RewardHackingMonitor

        self.config = cfg = config
        torch.manual_seed(cfg.seed)  # the LoRA initialisation is part of the run's seeded state
        device = resolve_device(cfg.device)
        self.model = model or load_model(cfg.model, device=device, dtype=cfg.dtype, attention=cfg.attention)
        self.params = self.model.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
        if cfg.gradient_checkpointing:
            self.model.denoiser.enable_gradient_checkpointing()
        apply_speed_options(self.model, cfg)
        if cfg.lora_format != "diffusers":
            from visalign.models.lora_formats import check_format

            check_format(self.model.family, cfg.lora_format)  # before any training
        self.prompts = read_prompts(cfg.prompts)
        self.guidance = self.model.default_guidance if cfg.guidance is None else cfg.guidance
        name = cfg.sampler if cfg.sampler != "auto" else ("flow-sde" if self.model.is_flow else "ddim")
        noise = {} if cfg.noise_level is None else {SAMPLER_NOISE_ARG[name]: cfg.noise_level}
        self.sampler = get_sampler(name, **noise)
        self.ode_sampler = get_sampler(name, **{SAMPLER_NOISE_ARG[name]: 0.0})
        if self.sampler.kind != self.model.sde_kind:
            fits = "flow-sde, dance-sde or cps" if self.model.is_flow else "ddim"
            raise ConfigError(f"sampler {name} is for {self.sampler.kind} models; {self.model.family} needs {fits}")
        self.text = TextCache(self.model, cfg.negative_prompt, self.model.uses_cfg(self.guidance))
        self.tracker = PromptStatTracker(cfg.advantage_history, global_std=cfg.advantage_std == "batch") if (
            cfg.advantage_history) else None  # fmt: skip
        self.rank = process_state().process_index
        self.epoch = 0  # set by the loop: rollout samples are seeded by (seed, epoch, prompt, member)
        self.queue: collections.deque = collections.deque()
        self.rollouts = 0  # rollouts done (seeds the next one)
        self.micro = 0  # micro-batches trained
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay else None
        self.ema_synced = 0  # optimizer steps the EMA has seen
        self.monitor = RewardHackingMonitor(patience=cfg.monitor_patience, min_gold_drop=cfg.monitor_min_gold_drop,
                                            early_stop=cfg.early_stop, reward_name=f"reward ({self.reward_label})",
                                            gold_name=self.gold_key or "gold metric")  # fmt: skip
        self._eval_reward = None
        self.reward = reward if reward is not None else self.build_reward()
        self.reference_features = self.load_reference_features()

    @property
    def reward_label(self) -> str:
        """The training reward's name in logs and results (``reward/<label>``)."""
        return str(self.config.reward)

    def build_reward(self):
        from reward_models import build_reward

        if not self.config.reward:
            raise ConfigError("reward is required: --reward SPEC (e.g. 'pickscore' or 'clip(model=...)')")
        return build_reward(self.config.reward, device=self.model.device)

    # ----------------------------------------------------------------- Task protocol
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def shard(self, apply) -> None:
        """Shard the denoiser over processes; the LoRA (and its EMA) are the sharded weights from here on."""
        self.model.shard(apply)
        self.params = self.model.lora_parameters()
        if self.ema is not None:
            self.ema = [p.detach().clone() for p in self.params]

    def train_dataset(self):
        return list(range(len(self.prompts)))

    def collate(self, rows: list[int]) -> list[int]:
        return list(rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def wants_data(self) -> bool:
        """A new batch of prompts is needed only when the last rollout's micro-batches are all trained."""
        return not self.queue

    def loss(self, batch: list[int] | None):
        if batch is not None:
            self.rollout(batch)
        if not self.queue:
            raise TrainingError("GRPO.loss(None) called with no rollout pending; the loop must ask wants_data()")
        self._sync_ema()
        rollout, rows, slot = self.queue.popleft()
        self.micro += 1
        loss, metrics = self.item_loss(rollout, rows, slot)
        return loss, {**rollout.metrics, **metrics}

    # ----------------------------------------------------------------- rollout
    def sample_generators(self, prompt_ids: list[int]) -> list[torch.Generator]:
        """One generator per sample of a rollout, seeded by :func:`sample_seed`: its initial noise, its trained
        steps (``random`` selection) and its SDE noise come from it alone."""
        g, cfg = self.config.group_size, self.config
        return [torch.Generator().manual_seed(sample_seed(cfg.seed, self.epoch, p, j)) for p in prompt_ids
                for j in range(g)]  # fmt: skip

    def sample_rollout(self, prompt_ids: list[int], generator: torch.Generator | list[torch.Generator]) -> Rollout:
        """Sample ``group_size`` trajectories per prompt with the stochastic sampler (no rewards yet); ``generator``
        is one for the whole rollout or one per sample (:meth:`sample_generators`)."""
        cfg, model = self.config, self.model
        g = cfg.group_size
        ids = torch.tensor(prompt_ids, dtype=torch.long).repeat_interleave(g)
        prompts = [self.prompts[i] for i in ids.tolist()]
        size = cfg.resolution or model.default_resolution
        per_sample = isinstance(generator, list)
        if cfg.same_noise_per_group:
            first = generator[::g] if per_sample else generator
            noise = model.prepare_latents(len(prompt_ids), size, size, cfg.num_frames, first)
            noise = noise.repeat_interleave(g, dim=0)
        else:
            noise = model.prepare_latents(len(prompts), size, size, cfg.num_frames, generator)
        samplers, steps = self.rollout_samplers(len(prompts), generator)
        chunk = cfg.rollout_batch_size or len(prompts)
        outs = []
        for start in range(0, len(prompts), chunk):
            rows = slice(start, start + chunk)
            cond, uncond = self.text(prompts[rows])
            gen = generator[rows] if per_sample else generator
            outs.append(model.sample(prompts[rows], steps=cfg.steps, guidance=self.guidance, latents=noise[rows],
                                     cond=cond, uncond=uncond, sde=samplers, generator=gen, height=size,
                                     width=size, num_frames=cfg.num_frames, record_trajectory=True))  # fmt: skip
        cond, uncond = self.text(prompts)
        return Rollout(
            prompts=prompts,
            prompt_ids=ids,
            cond=cond,
            uncond=uncond,
            trajectory=torch.cat([o.trajectory for o in outs]),
            log_probs=torch.cat([o.log_probs for o in outs]),
            train_steps=steps,
            scheduler=model.inference_scheduler(cfg.steps, noise, self.sampler),
            pixels=torch.cat([o.pixels for o in outs]),
        )

    def rollout_samplers(self, n: int, generator: torch.Generator | list) -> tuple[list, torch.Tensor]:
        """Per-step samplers and the ``[n, K]`` steps to train, by ``timestep_selection``. The SDE window is one
        per rollout, the same on every process (drawn from the run's seed and the rollout count)."""
        cfg = self.config
        s, k = cfg.steps, cfg.trained_steps
        gens = generator if isinstance(generator, list) else [generator] * n
        if cfg.timestep_selection == "all-but-last":  # Flow-GRPO: the last step is not trained
            return [self.sampler] * s, torch.arange(k).expand(n, k).clone()
        if cfg.timestep_selection == "random":  # DanceGRPO: a random subset per sample
            perms = torch.stack([torch.randperm(s, generator=gens[i])[:k] for i in range(n)])
            return [self.sampler] * s, perms.sort(dim=1).values
        window_range = cfg.sde_window_range or max(s // 2, k)
        window = example_generator(cfg.seed, "window", self.rollouts) if isinstance(generator, list) else generator
        start = int(torch.randint(0, window_range - k + 1, (1,), generator=window))
        samplers = [self.sampler if start <= i < start + k else self.ode_sampler for i in range(s)]
        return samplers, torch.arange(start, start + k).expand(n, k).clone()

    def score(self, rollout: Rollout) -> Rollout:
        """Rewards, validity and clipped group-relative advantages of a sampled rollout."""
        from reward_models import RewardError

        cfg = self.config
        try:
            with torch.no_grad():
                out = self.reward(rollout.pixels.to(self.reward.device), rollout.prompts)
        except RewardError as e:
            step = self.micro // cfg.gradient_accumulation_steps + 1
            raise TrainingError(
                f"the reward failed on rollout {self.rollouts + 1} (optimizer step {step}); the step was not trained "
                f"and the last checkpoint is intact: {e}"
            ) from e
        rewards = out.scores.detach().float().cpu()
        valid = out.valid.cpu() & torch.isfinite(rewards)
        # groups and the batch std span every process's samples (gathered, as flow_grpo does); each process
        # keeps the advantages of its own samples
        all_rewards, all_valid, all_ids = gather_rows(rewards, valid.to(torch.uint8), rollout.prompt_ids)
        all_valid = all_valid.bool()
        advantages = torch.zeros_like(all_rewards)
        if all_valid.sum() > 0:
            r, ids = all_rewards[all_valid], all_ids[all_valid]
            if self.tracker is not None:
                adv = self.tracker.update([self.prompts[i] for i in ids.tolist()], r)
            else:
                adv = group_advantages(r, ids, std=cfg.advantage_std)
            advantages[all_valid] = clip_advantages(adv, cfg.adv_clip_max)
        flat = flat_groups(all_rewards, all_valid, all_ids)
        trained = all_valid & ~flat if cfg.skip_flat_groups else all_valid
        n, rank = len(rewards), process_state().process_index
        own = slice(rank * n, (rank + 1) * n)
        rollout.rewards, rollout.valid = rewards, valid
        rollout.advantages = advantages[own].clone()
        rollout.trained = trained[own].clone()
        # each trained sample weighs 1 / (samples trained in the whole rollout), on every process alike
        rollout.sample_weight = len(all_rewards) / max(int(trained.sum()), 1)
        groups = torch.unique(all_ids[all_valid])
        rollout.metrics["rollout/flat_groups"] = (
            float(torch.isin(groups, all_ids[all_valid & flat]).float().mean()) if len(groups) else float("nan")
        )
        rollout.metrics["rollout/trained_samples"] = float(trained.sum())
        return rollout

    def rollout(self, prompt_ids: list[int]) -> Rollout:
        """Sample and score one rollout, and queue its micro-batches (inner epochs x updates x trained steps)."""
        cfg = self.config
        start = time.perf_counter()
        ro = self.sample_rollout(prompt_ids, self.sample_generators(prompt_ids))
        generator = example_generator(cfg.seed, "rollout-order", self.rollouts)  # the update order, every process
        seconds = time.perf_counter() - start
        self.score(ro)
        self.rollouts += 1
        good = ro.rewards[ro.valid]
        n = len(ro.prompts)
        ro.metrics |= {
            "reward/mean": float(good.mean()) if len(good) else float("nan"),
            "reward/std": float(good.std(correction=0)) if len(good) else float("nan"),
            "rollout/invalid": float(n - len(good)),
            "rollout/seconds": seconds,
            "rollout/samples_per_s": n / seconds,
            "advantage/abs_mean": float(ro.advantages.abs().mean()),
        }
        self.enqueue(ro, generator)
        return ro

    def enqueue(self, ro: Rollout, generator: torch.Generator) -> None:
        """Queue the rollout's micro-batches: inner epochs x updates x micro-batches x trained steps."""
        cfg = self.config
        n = len(ro.prompts)
        micro = cfg.train_batch_size or n
        per_update = cfg.samples_per_update or n
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(n, generator=generator) if cfg.shuffle_samples else torch.arange(n)
            for u in range(0, n, per_update):
                for m in range(u, u + per_update, micro):
                    for slot in range(cfg.trained_steps):  # flow_grpo: timesteps innermost, one backward each
                        self.queue.append((ro, order[m : m + micro], slot))

    # ----------------------------------------------------------------- training step
    def recompute(self, ro: Rollout, rows: torch.Tensor, slot: int, reference: bool = False):
        """The trained step ``slot`` of samples ``rows`` under the policy (or the reference), scoring the stored
        next latents: the same :meth:`DiffusionModel.sde_step` as the rollout."""
        model = self.model
        steps = ro.train_steps[rows, slot]
        traj = ro.trajectory
        r, i = rows.to(traj.device), steps.to(traj.device)
        x, x_next = traj[r, i], traj[r, i + 1]
        uncond = None if ro.uncond is None else index_cond(ro.uncond, rows)
        args = (ro.scheduler, steps, x, index_cond(ro.cond, rows), uncond, self.guidance, self.sampler)
        if not reference:
            return model.sde_step(*args, prev_sample=x_next)
        with torch.no_grad(), model.reference():
            return model.sde_step(*args, prev_sample=x_next)

    def item_loss(self, ro: Rollout, rows: torch.Tensor, slot: int) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO-clip loss plus ``beta_kl`` KL on one micro-batch of one trained step (samples not trained dropped)."""
        cfg = self.config
        # a mean over the micro-batch's share of the samples trained, which is the plain mean when all are
        share = ro.sample_weight / len(rows)
        rows = rows[ro.trained[rows]]
        if rows.numel() == 0:  # nothing valid to learn from: no gradient at all (not a zero gradient)
            empty = {"policy_loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "ratio": 1.0}
            return torch.zeros((), requires_grad=True), empty
        step = self.recompute(ro, rows, slot)
        old = ro.log_probs[rows, ro.train_steps[rows, slot].to(ro.log_probs.device)]
        adv = ro.advantages[rows].to(step.log_prob.device)
        losses, stats = ppo_clip_loss(step.log_prob, old.to(step.log_prob.device), adv, clip_range=cfg.clip_range)
        policy_loss = losses.sum() * share
        loss, kl_mean = policy_loss, torch.zeros(())
        if cfg.beta_kl > 0:
            ref = self.recompute(ro, rows, slot, reference=True)
            scale = step.noise_scale.detach()
            stochastic = scale.flatten(1)[:, 0] > 0  # noise-free steps have no KL (their ratio is exactly 1)
            kl = kl_to_reference(step.mean, ref.mean, torch.where(scale > 0, scale, torch.ones_like(scale)))
            kl = torch.where(stochastic, kl, torch.zeros_like(kl))
            kl_mean = kl.sum() * share
            loss = loss + cfg.beta_kl * kl_mean
        metrics = {"policy_loss": float(policy_loss.detach()), "kl": float(kl_mean.detach())}
        metrics.update({k: float(v) for k, v in stats.items()})
        return loss, metrics

    # ----------------------------------------------------------------- EMA
    def _sync_ema(self) -> None:
        """EMA update for the optimizer steps taken since the last one (lazily, so a resume reproduces it)."""
        done = self.micro // self.config.gradient_accumulation_steps
        self._ema_to(done)

    def _ema_to(self, steps: int) -> None:
        if self.ema is None or self.ema_synced >= steps:
            return
        d = self.config.ema_decay
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        self.ema_synced = steps

    def ema_weights(self, step: int):
        """A context with the EMA weights in the LoRA (the live weights otherwise)."""

        @contextlib.contextmanager
        def swap():
            if self.ema is None:
                yield
                return
            self._ema_to(step)
            live = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    p.copy_(e)
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, v in zip(self.params, live):
                        p.copy_(v)

        return swap()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        self._sync_ema()  # the EMA up to date with the steps taken (what the next loss would do; an export reads it)
        state = self.model.lora_state_dict()
        state["grpo/counters"] = torch.tensor([self.rollouts, self.micro, self.ema_synced], dtype=torch.long)
        if self.ema is not None:
            state.update({f"grpo/ema/{i}": e for i, e in enumerate(self.ema)})
        if self.tracker is not None:
            index = {p: i for i, p in reversed(list(enumerate(self.prompts)))}
            for prompt, values in self.tracker.stats.items():
                state[f"grpo/tracker/{index[prompt]}"] = torch.tensor(list(values), dtype=torch.float64)
        state.update(self.monitor.state_dict("grpo/monitor/"))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_lora_state_dict({k: v for k, v in state.items() if not k.startswith("grpo/")})
        self.rollouts, self.micro, self.ema_synced = (int(v) for v in state["grpo/counters"])
        if self.ema is not None:
            self.ema = [state[f"grpo/ema/{i}"].to(p.device, p.dtype).clone() for i, p in enumerate(self.params)]
        if self.tracker is not None:
            stats = {self.prompts[int(k.rsplit("/", 1)[1])]: v.tolist() for k, v in state.items()
                     if k.startswith("grpo/tracker/")}  # fmt: skip
            self.tracker.load_state_dict({"stats": stats})
        self.monitor.load_state_dict(state, "grpo/monitor/")
        self.queue.clear()

    # ----------------------------------------------------------------- evaluation, monitors, export
    @property
    def gold_key(self) -> str | None:
        cfg = self.config
        if cfg.oracle:
            return "oracle/all/strict_acc"
        return f"reward/{cfg.eval_reward}" if cfg.eval_reward else None

    def features(self, media: torch.Tensor) -> torch.Tensor:
        """Features for the drift FD and diversity (pixel thumbnails; DRL uses its encoder's)."""
        from visalign.evaluation import thumbnails

        return thumbnails(media)

    def load_reference_features(self) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.reference_data:
            return None
        from visalign.data import load_image

        files = sorted(p for p in Path(cfg.reference_data).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if len(files) < 2:
            raise ConfigError(f"reference_data {cfg.reference_data} must hold at least two .png/.jpg images")
        size = cfg.resolution or self.model.default_resolution
        images = torch.stack([load_image(f, size, where=str(f)) for f in files])
        return self.features(images).float().cpu()

    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Training reward, gold metric and drift on seeded held-out samples; feeds the reward-hacking monitor.

        The first evaluation of a run also evaluates the base model (the LoRA disabled: the policy at step 0) as
        ``eval/step-000000``, so the monitor and the figures start from where training started.
        """
        if not self.config.eval_prompts:
            return {}
        if not self.monitor.steps and step > 0:
            with self.model.lora_disabled():
                self.evaluate_at(0, out_dir.parent / f"step-{0:06d}", ema=False)
        return self.evaluate_at(step, out_dir)

    def evaluate_at(self, step: int, out_dir: Path, ema: bool = True) -> dict[str, float]:
        import json

        from visalign.evaluation import oracle_metrics, read_prompts, sample_all
        from visalign.media import image_grid, save_image
        from visalign.monitors import drift_report

        cfg = self.config
        texts = read_prompts(cfg.eval_prompts)
        texts = [texts[i % len(texts)] for i in range(cfg.eval_samples)]
        size = cfg.resolution or self.model.default_resolution
        guidance = self.guidance if cfg.eval_guidance is None else cfg.eval_guidance
        with self.ema_weights(step) if ema else contextlib.nullcontext():
            seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
            media = sample_all(self.model, texts, [seed + i for i in range(len(texts))], steps=cfg.eval_steps,
                               guidance=guidance, height=size, width=size, num_frames=cfg.num_frames,
                               negative_prompt=cfg.negative_prompt, progress=False)  # fmt: skip
        results = oracle_metrics(media, texts) if cfg.oracle else {}
        train_reward = self.reward(media.to(self.reward.device), texts)
        results[f"reward/{self.reward_label}"] = float(train_reward.scores[train_reward.valid].mean())
        if cfg.eval_reward:
            gold = self.eval_reward()(media.to(self.model.device), texts)
            results[f"reward/{cfg.eval_reward}"] = float(gold.scores[gold.valid].mean())
        drift = drift_report(media, texts, features=self.features, reference_features=self.reference_features)
        results.update({f"drift/{k}": v for k, v in drift.items()})
        results.update(self.extra_metrics(media, texts))
        gold = results.get(self.gold_key) if self.gold_key else None
        alarm = self.monitor.record(step, results[f"reward/{self.reward_label}"], gold, drift)
        results["monitor/alarm"] = float(alarm)
        out_dir.mkdir(parents=True, exist_ok=True)
        frames = media[:, 0] if media.ndim == 5 else media
        save_image(image_grid(frames, nrow=min(8, len(frames))), out_dir / "samples.png")
        (out_dir / "report.json").write_text(json.dumps({"step": step, "results": results}, indent=2))
        if process_state().is_main_process:  # a sharded run evaluates on every process
            self.monitor.save(Path(cfg.output_dir) / "monitor")
        return results

    def extra_metrics(self, media: torch.Tensor, texts: list[str]) -> dict[str, float]:
        """Task-specific evaluation figures (none here; DRL adds its distance per caption shape)."""
        return {}

    def eval_reward(self):
        if self._eval_reward is None:
            from reward_models import build_reward

            self._eval_reward = build_reward(self.config.eval_reward, device=self.model.device)
        return self._eval_reward

    def on_step_end(self, step: int) -> bool:
        """Stop when the monitor's alarm is raised and ``early_stop`` is set."""
        return self.monitor.should_stop

    def export(self, out_dir: Path, results: dict[str, float]) -> None:
        cfg = self.config
        steps_done = self.micro // cfg.gradient_accumulation_steps
        with self.ema_weights(steps_done):
            self.model.save_lora(out_dir)
        format_usage = export_lora_format(out_dir, cfg.lora_format, self.model.family)
        if self.monitor.steps:
            self.monitor.save(out_dir / "monitor")
        write_model_card(
            out_dir,
            title=f"{type(self).__name__} ({self.sampler.name}, reward {self.reward_label}) on {cfg.model}",
            base_model=cfg.model,
            data=cfg.prompts,
            config=cfg,
            results=results,
            usage=f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{cfg.model}")\n'
            f'pipe.load_lora_weights("{out_dir}")' + format_usage,
        )

    # ----------------------------------------------------------------- porting checks
    @torch.no_grad()
    def porting_checks(self, prompt_ids: list[int] | None = None) -> dict[str, float]:
        """The checklist Flow-GRPO's authors ask porters to run, on this model and config.

        1. ``ode_max_abs_diff``: sampling with the sampler at noise 0 against deterministic sampling with the
           pipeline's first-order scheduler on the same grid (Euler for flow, DDIM for epsilon/v), final latents.
        2. ``logprob_max_abs_diff``: log-probs recomputed by the training step against the rollout's, every
           trained step of one rollout of ``prompt_ids``, fp32.
        3. ``ratio_max_abs_dev``: ``max |exp(logp - logp_old) - 1|`` over the same (0 when 2. is 0).

        Returns:
            the three figures (the rollout is sampled with its own generator and not queued or scored).
        """
        cfg, model = self.config, self.model
        prompt_ids = prompt_ids or [0]
        size = cfg.resolution or model.default_resolution
        prompts = [self.prompts[i] for i in prompt_ids]
        latents = model.prepare_latents(len(prompts), size, size, cfg.num_frames, torch.Generator().manual_seed(0))
        kw = dict(steps=cfg.steps, guidance=self.guidance, latents=latents, height=size, width=size,
                  num_frames=cfg.num_frames, decode=False, negative_prompt=cfg.negative_prompt)  # fmt: skip
        pipeline_scheduler = model.pipe.scheduler
        model.pipe.scheduler = first_order_scheduler(model)  # both runs on the first-order scheduler's grid
        try:
            zero = model.sample(prompts, sde=self.ode_sampler, **kw)
            ode = model.sample(prompts, **kw)
        finally:
            model.pipe.scheduler = pipeline_scheduler
        ro = self.sample_rollout(prompt_ids, torch.Generator().manual_seed(1))
        rows = torch.arange(len(ro.prompts))
        diffs = []
        for slot in range(ro.train_steps.shape[1]):
            logp = self.recompute(ro, rows, slot).log_prob
            diffs.append((logp - ro.log_probs[rows, ro.train_steps[:, slot].to(ro.log_probs.device)]).abs().max())
        worst = float(torch.stack(diffs).max())
        return {
            "ode_max_abs_diff": float((zero.latents.float() - ode.latents.float()).abs().max()),
            "logprob_max_abs_diff": worst,
            "ratio_max_abs_dev": float(torch.expm1(torch.tensor(worst)).abs()),
        }


def first_order_scheduler(model):
    """The pipeline's scheduler, or its first-order counterpart on the same config (for the noise-0 check):
    ``FlowMatchEulerDiscreteScheduler`` for flow families, DDIM (no clipping) for epsilon/v families."""
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    scheduler = model.pipe.scheduler
    config = scheduler.config
    if model.is_flow:
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return scheduler
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=config.get("flow_shift", 1.0))
    if isinstance(scheduler, (DDIMScheduler, CogVideoXDDIMScheduler)):
        return scheduler
    if isinstance(scheduler, CogVideoXDPMScheduler):
        return CogVideoXDDIMScheduler.from_config(config)
    return DDIMScheduler.from_config(config, clip_sample=False)
