"""Timestep-segment preference optimisation (AlignHuman's "TPO"): one LoRA expert per timestep interval.

Liang et al. 2025, "AlignHuman: Improving Motion and Fidelity via Timestep-Segment Preference Optimization":
early (high-noise) denoising steps decide layout and motion, late steps decide fidelity. The timestep range is
split into K intervals; expert k is a LoRA trained with the Diffusion-DPO / Flow-DPO objective on its own
preference data with training timesteps drawn only inside interval k; at inference expert k is active only while
the sampler is inside interval k (:mod:`visalign.experts`). The CLI name is ``timestep-segment`` (the acronym TPO
also names text- and tree-preference methods).

How it is built, and why:

* Experts train one after another, each a complete :class:`~trainers.diffusion_dpo.DiffusionDPO` run of the
  shared loop with ``timestep_min/max`` set to its interval, its own data, and its own output folder
  ``OUTPUT_DIR/expert-NAME`` (checkpoints, logs, export). All run on the same denoiser: finished experts stay
  loaded as named peft adapters, switched off, and the DPO reference is the base with every adapter off. So each
  expert equals a plain ``visalign train diffusion-dpo --timestep_min A --timestep_max B`` run with the same seed.
* Resuming (``--resume_from latest``) loads the experts whose export exists, resumes the interrupted one from its
  latest checkpoint and trains the rest; nothing finished is trained twice.
* Export ``OUTPUT_DIR/final``: one Diffusers LoRA folder per expert (``final/NAME``, loads with
  ``pipe.load_lora_weights``), ``experts.json`` (intervals, adapter names, base model and its signature) and a
  model card. ``visalign generate --experts final/experts.json`` samples with the experts switched per step.
* Intervals are given in scheduler timesteps or, for flow models, in sigma (``t = 1000 sigma``).
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainers.base import Trainer, resolve_device, write_model_card
from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from visalign.config import field, save_config
from visalign.errors import ConfigError
from visalign.experts import (
    LORA_WEIGHT_NAME,
    Expert,
    ExpertsError,
    ExpertsView,
    Manifest,
    base_signature,
    parse_interval,
    validate_experts,
)


@dataclass
class TimestepSegmentConfig(DiffusionDPOConfig):
    data: list[str] = field([], help="preference data per interval, in the order of --intervals (one: shared)")
    intervals: list[str] = field(
        [], help="one interval per expert, LOW:HIGH, half-open, e.g. '600:1000 0:600' (timesteps) or '0.6:1' (sigma)"
    )
    interval_units: Literal["timestep", "sigma"] = field(
        "timestep", help="units of --intervals: scheduler timesteps (0..1000), or sigma for flow models (t = 1000 s)"
    )
    expert_names: list[str] = field([], help="adapter name per interval (default: expert0, expert1, ...)")
    expert_max_steps: list[int] = field([], help="optimizer steps per expert (default: max_steps for every one)")
    expert_beta: list[float] = field([], help="DPO beta per expert (default: beta for every one)")
    expert_learning_rate: list[float] = field([], help="learning rate per expert (default: learning_rate)")

    def __post_init__(self):
        super().__post_init__()
        k = len(self.intervals)
        if k == 0:
            raise ConfigError("intervals are required: --intervals LOW:HIGH ... (e.g. 600:1000 0:600)")
        if (self.timestep_min, self.timestep_max) != (0.0, 1000.0):
            raise ConfigError("timestep-segment takes --intervals (one per expert), not timestep_min/timestep_max")
        if len(self.data) not in (1, k):
            raise ConfigError(f"got {len(self.data)} --data sources for {k} intervals; pass one per interval, or one")
        if self.expert_names and len(self.expert_names) != k:
            raise ConfigError(f"got {len(self.expert_names)} --expert_names for {k} intervals; pass one per interval")
        if self.expert_max_steps and (len(self.expert_max_steps) != k or min(self.expert_max_steps) < 1):
            raise ConfigError(f"--expert_max_steps needs {k} values >= 1 (one per interval)")
        for name in ("expert_beta", "expert_learning_rate"):
            values = getattr(self, name)
            if values and (len(values) != k or min(values) <= 0):
                raise ConfigError(f"--{name} needs {k} values > 0 (one per interval)")
        if self.full_finetune:
            raise ConfigError("timestep-segment trains LoRA experts; full_finetune is not supported")
        if self.resume_from not in (None, "latest"):
            raise ConfigError(
                "timestep-segment resumes with --resume_from latest (experts keep their own checkpoints)"
            )
        self.experts()  # intervals and names are checked now, before a model is loaded

    def experts(self, num_train_timesteps: int = 1000) -> list[Expert]:
        """The experts this config trains (their ``path`` is the name: ``final/NAME``)."""
        names = self.expert_names or [f"expert{i}" for i in range(len(self.intervals))]
        data = self.data if len(self.data) == len(self.intervals) else self.data * len(self.intervals)
        try:
            bounds = [parse_interval(s, self.interval_units, num_train_timesteps) for s in self.intervals]
            experts = [Expert(n, n, a, b, d) for n, (a, b), d in zip(names, bounds, data)]
            validate_experts(experts, num_train_timesteps, "--intervals")
        except ExpertsError as e:
            raise ConfigError(str(e)) from e
        return experts


class TimestepSegment:
    """Trains the experts one after another on the shared loop; :meth:`train` returns the final evaluation."""

    eval_scorers = DiffusionDPO.eval_scorers  # the evaluation reward (``eval_reward``), built as Diffusion-DPO does
    sample_figures = DiffusionDPO.sample_figures  # and the same evaluation of samples

    def __init__(self, config: TimestepSegmentConfig, model=None):
        from visalign.models import load_model

        self.config = cfg = config
        device = resolve_device(cfg.device)
        self.model = model or load_model(cfg.model, device=device, dtype=cfg.dtype, attention=cfg.attention)
        if cfg.interval_units == "sigma" and not self.model.is_flow:
            raise ConfigError(
                f"sigma intervals are for flow models; {cfg.model} is a {self.model.family} model: give timesteps"
            )
        self.experts = cfg.experts(self.model.num_train_timesteps)
        taken = [e.name for e in self.experts if e.name in self.model.adapter_names]
        if taken:
            raise ConfigError(f"the model already has adapters named {taken}; choose other --expert_names")
        self.out = Path(cfg.output_dir)
        self.signature = base_signature(self.model)  # of the base, before any adapter

    def expert_dir(self, expert: Expert) -> Path:
        return self.out / f"expert-{expert.name}"

    def expert_config(self, index: int, resume: bool) -> DiffusionDPOConfig:
        """The Diffusion-DPO run of expert ``index``: its data, its interval, its folder, the shared settings."""
        cfg, expert = self.config, self.experts[index]
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DiffusionDPOConfig)}
        values.update(
            data=expert.data,
            timestep_min=expert.t_min,
            timestep_max=expert.t_max,
            output_dir=str(self.expert_dir(expert)),
            cache_dir=cfg.cache_dir or str(self.out.parent / ".cache" / "latents"),
            max_steps=cfg.expert_max_steps[index] if cfg.expert_max_steps else cfg.max_steps,
            beta=cfg.expert_beta[index] if cfg.expert_beta else cfg.beta,
            learning_rate=cfg.expert_learning_rate[index] if cfg.expert_learning_rate else cfg.learning_rate,
            resume_from="latest" if resume else None,
            eval_prompts=None,  # an expert alone over every step is not what ships: the experts are evaluated together
            eval_every=0,
        )
        return DiffusionDPOConfig(**values)

    def train(self) -> dict[str, float]:
        cfg, model = self.config, self.model
        save_config(cfg, self.out)
        resume = cfg.resume_from == "latest"
        for k, expert in enumerate(self.experts):
            export = self.expert_dir(expert) / "final"
            if not (resume and (export / LORA_WEIGHT_NAME).is_file()):
                checkpoints = list((self.expert_dir(expert) / "checkpoints").glob("step-*"))
                run = DiffusionDPO(self.expert_config(k, resume and bool(checkpoints)), model=model)
                if cfg.progress:
                    print(f"timestep-segment: expert {k + 1}/{len(self.experts)} {expert.name!r} on "
                          f"t in [{expert.t_min:g}, {expert.t_max:g}) with {expert.data}")  # fmt: skip
                Trainer(run).train()
                with warnings.catch_warnings():  # peft notes that another adapter becomes active: all go off below
                    warnings.filterwarnings("ignore", message="Adapter default was active")
                    model.denoiser.delete_adapters("default")
            model.load_lora(export, adapter_name=expert.name)  # stays loaded (switched off) for the next runs
        model.set_adapters(None)
        manifest = self.export_experts(self.out / "final")
        results = self.evaluate(manifest)
        self.write_card(manifest, results)
        return results

    def export_experts(self, final: Path) -> Manifest:
        """Copy each expert's LoRA to ``final/NAME`` and write ``final/experts.json``."""
        final.mkdir(parents=True, exist_ok=True)
        for e in self.experts:
            target = final / e.path
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(self.expert_dir(e) / "final", target)
        manifest = Manifest(
            experts=self.experts,
            base_model=self.config.model,
            base_signature=self.signature,
            num_train_timesteps=self.model.num_train_timesteps,
            extras={"family": self.model.family, "algorithm": "timestep-segment"},
        )
        manifest.write(final)
        return manifest

    def evaluate(self, manifest: Manifest) -> dict[str, float]:
        """Oracle / reward figures of samples with every expert switched in its interval (needs ``eval_prompts``)."""
        if not self.config.eval_prompts:
            return {}
        return self.sample_figures(ExpertsView(self.model, manifest), self.out / "eval" / "experts")

    def write_card(self, manifest: Manifest, results: dict[str, float]) -> None:
        cfg = self.config
        final = self.out / "final"
        table = "\n".join(f"#   {e.name}: t in [{e.t_min:g}, {e.t_max:g})" for e in manifest.experts)
        usage = (
            f"# visalign generate --model {cfg.model} --experts {final}/experts.json --prompts ... --out ...\n"
            f"{table}\n"
            "from visalign.experts import ExpertsView, load_experts\n"
            "from visalign.models import load_model\n"
            f'model = load_model("{cfg.model}")\n'
            f'view = ExpertsView(model, load_experts(model, "{final}"))\n'
            'pixels = view.sample(["a prompt"]).pixels'
        )
        write_model_card(
            final,
            title=f"Timestep-segment experts ({', '.join(manifest.names)}) on {cfg.model}",
            base_model=cfg.model,
            data=", ".join(dict.fromkeys(e.data or "" for e in manifest.experts)),
            config=cfg,
            results=results,
            usage=usage,
            tags=("visalign", "lora", "timestep-segment"),
        )
