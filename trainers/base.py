"""The one training loop every algorithm runs on.

An algorithm is a *task*: an object with ``loss(batch) -> (loss, metrics)`` and a few hooks (below). The loop
owns everything else, on ``accelerate``: mixed precision, gradient accumulation, gradient clipping, logging to
accelerate trackers (tensorboard by default), a progress bar, periodic evaluation, atomic checkpoints with exact
resume (trainable weights, optimizer, LR schedule, RNG states of every process, data position) and the final
export.

Departures from a stock ``Accelerator.prepare`` loop, and why:

* The model is not wrapped in DDP. LoRA training calls the frozen pipeline's own modules, so gradients of the
  trainable parameters are averaged across processes explicitly after each accumulation cycle, in buckets; the
  result equals DDP's gradient averaging. Sharded runs (an FSDP or DeepSpeed ZeRO config, or ``--sharding``)
  shard the task's modules in place with FSDP2 (:mod:`visalign.sharding`), which averages the gradients itself;
  their checkpoints hold each process's slice, and evaluation and export run on every process.
* Data order is a pure function of ``(seed, epoch, position)``, so resuming skips to the exact batch without
  reading the skipped ones; every global batch holds the same examples whatever the number of processes, and
  tasks draw per-example randomness from ``(seed, epoch, index)`` (``set_epoch``), so N processes x batch B
  train what one process x batch N*B does.
* A non-finite loss stops the run naming the step and batch; the last good checkpoint is left intact.
* Online tasks (GRPO) train several micro-batches on one rollout: while ``task.wants_data()`` is false the loop
  calls ``loss(None)`` without drawing prompts, and ``on_step_end`` returning ``True`` stops the run early.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from visalign.config import config_to_dict, field, save_config, save_json
from visalign.distributed import process_state
from visalign.errors import ConfigError, VisalignError
from visalign.sharding import full, local_state, optimizer_from_local, resolve_sharding, shard_module, state_from_local


class TrainingError(VisalignError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not match the run)."""


@dataclass
class TrainConfig:
    """Options of the shared loop; every algorithm's config extends it."""

    output_dir: str = field("outputs/run", help="where checkpoints, logs, samples and the export go")
    seed: int = field(0, help="seed of data order, noise and initialisation")
    max_steps: int = field(100, help="optimizer steps to train")
    batch_size: int = field(4, help="examples per process per micro-batch")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    learning_rate: float = field(1e-4, help="peak learning rate (AdamW)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = field(
        "constant_with_warmup", help="learning-rate schedule"
    )
    warmup_steps: int = field(0, help="linear warm-up steps")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    adam_epsilon: float = field(1e-8, help="AdamW epsilon")
    fused_adam: bool = field(False, help="fused AdamW kernel (one kernel per step; CUDA and CPU)")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0 disables clipping)")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        None, help="autocast precision of the forward pass (default: accelerate launch's or its config's, else no)"
    )
    gradient_checkpointing: bool = field(False, help="recompute the denoiser's activations in backward (less memory)")
    checkpoint_every: int = field(0, help="save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = field(2, help="how many recent checkpoints to keep")
    eval_every: int = field(0, help="evaluate every N steps (0: only at the end)")
    log_every: int = field(1, help="log metrics every N steps")
    resume_from: str | None = field(None, help="checkpoint folder, or 'latest' in output_dir/checkpoints")
    report_to: Literal["tensorboard", "wandb", "none"] = field("tensorboard", help="metrics tracker")
    num_workers: int = field(0, help="data-loader worker processes")
    progress: bool = field(True, help="show a progress bar")
    sharding: Literal["no", "shard_grad_op", "full_shard"] | None = field(
        None,
        help="shard the model over processes (FSDP2): full_shard (ZeRO-3) or shard_grad_op (ZeRO-2); "
        "default: what an accelerate FSDP or DeepSpeed config asks for, else no",
    )

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("log_every and keep_checkpoints must be >= 1")


class Task(Protocol):
    """What an algorithm gives the loop. Optional hooks: ``evaluate(step, out_dir) -> dict``,
    ``export(out_dir, results)``, ``on_step_end(step) -> bool | None`` (``True`` stops training early: the run
    still saves, evaluates and exports), ``set_epoch(epoch)`` (called before ``loss`` on each new batch, so that
    per-example draws can be seeded by ``(seed, epoch, example index)``), ``wants_data() -> bool`` (online
    tasks: ``False`` while the micro-batches still come from their last rollout; the loop then calls
    ``loss(None)`` without drawing a dataset batch)."""

    config: TrainConfig

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def collate(self, rows: list) -> Any: ...

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def batch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """The micro-batches of one epoch on one process.

    A seeded permutation of the epoch is cut into global batches of ``batch_size * world`` (the last partial one
    dropped); process ``rank`` takes the ``rank``-th slice of each. So the examples of every global batch, and the
    ranks together, are the same whatever the number of processes: one process with batch ``4`` sees what two
    with batch ``2`` see between them, each example once per epoch, the shards disjoint.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    span = batch_size * world
    return [perm[g + rank * batch_size : g + (rank + 1) * batch_size] for g in range(0, n - span + 1, span)]


def resolve_device(device: str) -> str:
    """``"auto"``: this process's own device as accelerate assigns it (``cuda:LOCAL_RANK`` under ``accelerate
    launch`` or ``torchrun`` on GPUs, else the CPU); anything else is taken as given."""
    if device != "auto":
        return device
    from visalign.distributed import process_state

    return str(process_state().device)


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps
    )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs a :class:`Task` to ``config.max_steps`` optimizer steps. ``Trainer(task).train()`` returns the final
    evaluation results (or ``{}``)."""

    def __init__(self, task: Task, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.task = task
        self.config = cfg = task.config
        self.out = Path(cfg.output_dir)
        log_with = None if cfg.report_to == "none" else cfg.report_to
        if accelerator is None:
            # a run earlier in this process (another trainer, another precision) leaves accelerate's singleton
            # state behind; the process group itself (PartialState) is kept
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
        process_state()  # the process group, CPU groups included, before the Accelerator reads it
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision, log_with=log_with, project_dir=str(self.out / "logs")
        )
        set_seed(cfg.seed + self.accelerator.process_index)
        self.sharding = resolve_sharding(cfg.sharding)
        self.sharded = self.sharding.enabled and self.accelerator.num_processes > 1
        if self.sharded:
            shard = getattr(task, "shard", None)
            if getattr(cfg, "compile", False):
                raise ConfigError("--compile with a sharded run is not supported yet (untested with FSDP2's hooks): "
                                  "drop --compile, or train data-parallel (--sharding no)")  # fmt: skip
            if shard is None:
                raise ConfigError(f"{type(task).__name__} cannot be sharded ({self.sharding.source}); train it "
                                  "data-parallel (--sharding no, or examples/accelerate/ddp.yaml)")  # fmt: skip
            shard(lambda module: shard_module(module, self.sharding, self.accelerator.device))
            self.accelerator.print(f"sharding: {self.sharding.strategy} ({self.sharding.source})")
        elif self.sharding.enabled:
            self.accelerator.print(f"sharding: {self.sharding.strategy} ({self.sharding.source}) needs 2+ processes")
        self.params = list(task.trainable_parameters())
        if not self.params:
            raise TrainingError("the task has no trainable parameters")
        optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            fused=cfg.fused_adam or None,
        )
        self.lr_scheduler = build_lr_scheduler(cfg, optimizer)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.dataset = task.train_dataset()
        world = self.accelerator.num_processes
        self.streaming = isinstance(self.dataset, torch.utils.data.IterableDataset)
        if not self.streaming and len(self.dataset) < cfg.batch_size * world:
            raise ConfigError(
                f"the dataset has {len(self.dataset)} examples, fewer than one batch "
                f"({cfg.batch_size} x {world} processes): lower batch_size or add data"
            )
        self.step = 0
        self.epoch = 0
        self.position = 0  # micro-batches consumed in the current epoch

    # ----------------------------------------------------------------- data
    def _batches(self) -> Iterator[tuple[int, int, Any]]:
        """Yields ``(epoch, position, batch)`` forever, from the saved position on."""
        acc, cfg = self.accelerator, self.config
        if self.streaming:
            yield from self._stream_batches()
        while True:
            order = batch_order(
                len(self.dataset), cfg.batch_size, cfg.seed, self.epoch, acc.process_index, acc.num_processes
            )
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=order[self.position :],
                collate_fn=self.task.collate,
                num_workers=cfg.num_workers,
                generator=torch.Generator().manual_seed(cfg.seed + self.epoch),
            )  # a private generator: creating a loader must not draw from the global RNG (exact resume)
            for batch in loader:
                self.position += 1  # counted before the yield: a checkpoint taken now resumes after this batch
                yield self.epoch, self.position - 1, batch
            self.epoch, self.position = self.epoch + 1, 0

    def _stream_batches(self) -> Iterator[tuple[int, int, Any]]:
        """Batches of an iterable dataset (a streamed one): the stream's own shuffle per epoch (``set_epoch``); a
        resume replays the epoch's stream up to the saved position (the skipped batches are read, not trained)."""
        cfg = self.config
        while True:
            set_epoch = getattr(self.dataset, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self.epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=cfg.batch_size,
                drop_last=True,
                collate_fn=self.task.collate,
                num_workers=cfg.num_workers,
            )
            seen = 0
            for i, batch in enumerate(loader):
                seen += 1
                if i < self.position:
                    continue
                self.position += 1
                yield self.epoch, self.position - 1, batch
            if seen == 0:
                raise ConfigError(f"the stream holds fewer than one batch ({cfg.batch_size}) for this process")
            self.epoch, self.position = self.epoch + 1, 0

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def _checkpoints(self) -> list[Path]:
        """``checkpoints/step-N`` folders, oldest first (a temporary ``.tmp-step-N`` is never one)."""
        found = [p for p in self.checkpoint_root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_checkpoint(self, skipped: list[str] | None = None) -> Path | None:
        """The newest *complete* checkpoint (every file matches its manifest), or ``None``; each newer one passed
        over is appended to ``skipped`` with the reason."""
        from visalign.checkpoints import is_complete

        for path in reversed(self._checkpoints()):
            why = is_complete(path)
            if why is None:
                return path
            if skipped is not None:
                skipped.append(f"{path.name}: {why}")
        return None

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically: every process writes its files into a temporary folder, the
        main process then lists them in a manifest (sizes, SHA-256) written last, and renames the folder into
        place. A write that fails (a full disk) removes the temporary folder, leaves the earlier checkpoints as
        they were and stops the run with :class:`TrainingError`."""
        from visalign.checkpoints import save_rng, save_torch, save_trainable, write_manifest

        acc = self.accelerator
        final = self.checkpoint_root / f"step-{self.step:06d}"
        tmp = self.checkpoint_root / f".tmp-step-{self.step:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            save_rng(rng_state(), tmp / f"rng-{acc.process_index}.safetensors")
            if self.sharded:  # each process its slice of the weights and of the optimizer state
                weights, optimizer = (local_state(m.state_dict()) for m in (self.task, self.optimizer))
                save_trainable(tmp, weights, optimizer, rank=acc.process_index)
            if acc.is_main_process:
                if not self.sharded:
                    save_trainable(tmp, self.task.state_dict(), self.optimizer.state_dict())
                save_torch(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
                meta = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "position": self.position,
                    "num_processes": acc.num_processes,
                    "batch_size": self.config.batch_size,
                    "sharding": self.sharding.strategy if self.sharded else "no",
                }
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
                save_config(self.config, tmp)
        except OSError as e:
            self._checkpoint_failed(final, tmp, e)
        acc.wait_for_everyone()  # every process's files are in tmp
        if acc.is_main_process:
            try:
                write_manifest(tmp)
            except OSError as e:
                self._checkpoint_failed(final, tmp, e)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _checkpoint_failed(self, final: Path, tmp: Path, error: OSError):
        shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest_checkpoint()
        raise TrainingError(
            f"could not write checkpoint {final} (process {self.accelerator.process_index}): {error}; "
            f"the previous checkpoint {previous or '(none)'} is intact: free space, then resume with "
            f"--resume_from latest"
        ) from error

    def resolve_checkpoint(self, path: str | os.PathLike) -> Path:
        """``"latest"``: the newest complete checkpoint, saying which newer ones it skipped and why; a path: that
        checkpoint, checked against its manifest. Raises :class:`TrainingError` naming the damaged file."""
        from visalign.checkpoints import CheckpointError, verify

        if str(path) == "latest":
            skipped: list[str] = []
            found = self.latest_checkpoint(skipped)
            for line in skipped:
                self.accelerator.print(f"resume_from=latest: skipping {line}")
            if found is None:
                what = f"complete checkpoint (skipped {'; '.join(skipped)})" if skipped else "checkpoint"
                raise TrainingError(f"resume_from='latest' but {self.checkpoint_root} holds no {what}")
            if skipped:
                self.accelerator.print(f"resume_from=latest: resuming from {found}")
            return found
        try:
            verify(path)
        except CheckpointError as e:
            raise TrainingError(f"cannot resume from {path}: {e}") from e
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from visalign.checkpoints import CheckpointError, load_rng, load_torch, load_trainable

        path = self.resolve_checkpoint(path)
        meta_file = Path(path) / "trainer_state.json"
        if not meta_file.exists():
            raise TrainingError(f"{path} is not a complete checkpoint (no trainer_state.json)")
        meta = json.loads(meta_file.read_text())
        acc = self.accelerator
        if meta["num_processes"] != acc.num_processes or meta["batch_size"] != self.config.batch_size:
            raise TrainingError(
                f"{path} was written by {meta['num_processes']} processes with batch_size {meta['batch_size']}; "
                f"resume with the same (now {acc.num_processes} and {self.config.batch_size}) for an exact resume"
            )
        sharding = self.sharding.strategy if self.sharded else "no"
        if meta.get("sharding", "no") != sharding:
            raise TrainingError(
                f"{path} was written with sharding {meta.get('sharding', 'no')!r}; resume with the same "
                f"(now {sharding!r}: --sharding or the accelerate config)"
            )
        try:
            weights, optimizer = load_trainable(path, rank=acc.process_index if self.sharded else None)
            if self.sharded:  # this process's slices, made into shards of the model's layout again
                weights = state_from_local(weights, self.task.state_dict())
                optimizer = optimizer_from_local(optimizer, self.params)
            self.task.load_state_dict(weights)
            self.optimizer.load_state_dict(optimizer)
            self.lr_scheduler.load_state_dict(load_torch(Path(path) / "lr_scheduler.pt"))
            set_rng_state(load_rng(Path(path) / f"rng-{acc.process_index}.safetensors"))
        except CheckpointError as e:
            raise TrainingError(f"cannot resume from {path}: {e}") from e
        self.step, self.epoch, self.position = meta["step"], meta["epoch"], meta["position"]

    # ----------------------------------------------------------------- the loop
    def _sync_gradients(self, bucket: int = 1 << 24) -> None:
        """Average the gradients over processes (what DDP does), in buckets of at most ``bucket`` elements, so a
        full fine-tune holds one bucket, not a second copy of every gradient."""
        if self.accelerator.num_processes == 1 or self.sharded:  # FSDP has averaged them
            return
        world = self.accelerator.num_processes
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups, current, size = [], [], 0
        for p in self.params:
            if current and size + p.numel() > bucket:
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        groups.append(current)
        for group in groups:
            flat = torch.cat([p.grad.reshape(-1).float() for p in group])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat /= world
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _evaluate(self) -> dict[str, float]:
        evaluate = getattr(self.task, "evaluate", None)
        if evaluate is None:
            return {}
        out = self.out / "eval" / f"step-{self.step:06d}"
        results = self._on_main(lambda folder: evaluate(self.step, folder), out) or {}
        if self.accelerator.is_main_process:
            self.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=self.step)
        self.accelerator.wait_for_everyone()
        return results

    def _on_main(self, fn, out_dir: Path):
        """``fn(out_dir)`` on the main process; in a sharded run on every process (each forward needs every
        process's shards), the others writing into a scratch folder that is then removed."""
        if self.accelerator.is_main_process:
            return fn(out_dir)
        if not self.sharded:
            return None
        with tempfile.TemporaryDirectory(prefix="visalign-scratch-") as scratch:
            return fn(Path(scratch) / out_dir.name)

    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        if cfg.resume_from:
            self.load_checkpoint(cfg.resume_from)
        if acc.is_main_process:
            save_config(cfg, self.out)
        if cfg.report_to != "none":
            acc.init_trackers(
                "visalign",
                config={
                    k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config_to_dict(cfg).items()
                },
            )
        batches = self._batches()
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc="training", disable=not (cfg.progress and acc.is_main_process)
        )
        results: dict[str, float] = {}
        wants_data = getattr(self.task, "wants_data", None)
        set_epoch = getattr(self.task, "set_epoch", None)
        epoch, position = self.epoch, self.position
        evaluated = None  # the results of an evaluation at the step the loop ended on
        timing = {"first_step": self.step + 1, "steps": 0, "train_seconds": 0.0, "eval_seconds": 0.0}
        while self.step < cfg.max_steps:
            started = time.perf_counter()
            sums: dict[str, float] = {}
            for micro in range(cfg.gradient_accumulation_steps):
                if wants_data is None or wants_data():
                    epoch, position, batch = next(batches)
                    if set_epoch is not None:
                        set_epoch(epoch)
                else:  # an online task trains on its last rollout: the data position does not move
                    batch = None
                with acc.autocast():
                    loss, metrics = self.task.loss(batch)
                if not torch.isfinite(loss.detach()).all():
                    last = self.latest_checkpoint()
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at step {self.step + 1}, micro-batch {micro} "
                        f"(epoch {epoch}, batch {position}); last good checkpoint: {last or 'none'}"
                    )
                acc.backward(loss / cfg.gradient_accumulation_steps)
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).detach()) / cfg.gradient_accumulation_steps
            self._sync_gradients()
            if cfg.max_grad_norm > 0:
                sums["grad_norm"] = float(full(acc.clip_grad_norm_(self.params, cfg.max_grad_norm)))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            seconds = time.perf_counter() - started  # data, forward, backward and the update (a rollout included)
            timing["steps"] += 1
            timing["train_seconds"] += seconds
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                logged = self._reduce_metrics(sums)
                logged["lr"] = self.lr_scheduler.get_last_lr()[0]
                logged["time/step_s"] = seconds
                acc.log(logged, step=self.step)
                bar.set_postfix(loss=f"{logged['loss']:.4g}")
            bar.update(1)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
            evaluated = None
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                started = time.perf_counter()
                evaluated = self._evaluate()
                timing["eval_seconds"] += time.perf_counter() - started
            hook = getattr(self.task, "on_step_end", None)
            if hook is not None and self._all_agree_to_stop(hook(self.step) is True):
                acc.print(f"training stopped early at step {self.step} by the task (see its logs)")
                break
        bar.close()
        self.save_checkpoint()
        timing["seconds_per_step"] = timing["train_seconds"] / max(timing["steps"], 1)
        if acc.is_main_process:  # this run's wall time (a resumed run counts its own steps), final evaluation aside
            save_json(timing, self.out / "timing.json")
        # an early stop right after an evaluation keeps that evaluation (no second one of the same step)
        results = evaluated if evaluated is not None else self._evaluate()
        export = getattr(self.task, "export", None)
        if export is not None:
            self._on_main(lambda out: export(out, results), self.out / "final")
        acc.wait_for_everyone()
        acc.end_training()
        return results

    def _all_agree_to_stop(self, stop: bool) -> bool:
        """Whether any process asked to stop (evaluation, and so a monitor's alarm, runs on the main one only)."""
        if self.accelerator.num_processes == 1:
            return stop
        flag = torch.tensor([float(stop)], device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _reduce_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return sums
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return {k: float(v) for k, v in zip(keys, values)}


LORA_FORMAT_HELP = "also write the final LoRA as lora_<format>.safetensors: kohya (A1111-style UIs) or comfyui"


def export_lora_format(out_dir: Path, fmt: str, family: str) -> str:
    """Write the exported LoRA in ``fmt`` beside the Diffusers file (docs/lora_formats.md); returns a usage line."""
    if fmt == "diffusers":
        return ""
    from visalign.models.lora_formats import write_lora_format

    file = write_lora_format(out_dir, fmt, family)
    return f"\n# {fmt} format: load {file.name} in your UI (docs/lora_formats.md)"


def write_model_card(
    directory: str | os.PathLike,
    *,
    title: str,
    base_model: str | None,
    data: str | None,
    config: Any,
    results: dict[str, float] | None = None,
    usage: str = "",
    library_name: str = "diffusers",
    tags: tuple[str, ...] = ("visalign", "lora"),
) -> Path:
    """A README.md beside an exported adapter: base model, data, hyper-parameters and measured results."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["---", f"library_name: {library_name}", f"tags: [{', '.join(tags)}]"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {title}", "", f"- base model: `{base_model}`", f"- data: `{data}`", ""]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) and math.isfinite(v) else f"| {k} | {v} |"
            for k, v in results.items()
        ]
        lines.append("")
    if usage:
        lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    lines += ["## Hyper-parameters", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(config_to_dict(config), sort_keys=False).strip(), "```", ""]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".README.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, directory / "README.md")
    return directory / "README.md"
