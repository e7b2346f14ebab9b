"""``visalign train ALGO [--preset NAME] [--config F.yaml] [--key value ...]``: run one algorithm on the shared loop.

Each algorithm is a ``trainers/`` module with a config dataclass (extending ``TrainConfig``) and a task class
(``Task(config)``, the loop's protocol). They are listed in :data:`ALGORITHMS` and imported only when chosen, so
``visalign train --help`` stays fast. ``visalign train ALGO --help`` lists the options of one algorithm.
``--preset NAME`` starts from one of the module's named paper presets (its ``PRESETS``); a YAML file and flags
override it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

from visalign.config import parse_config
from visalign.errors import ConfigError


class Algorithm(NamedTuple):
    module: str  # a trainers/ module, imported lazily
    config: str  # its config dataclass (extends trainers.base.TrainConfig)
    task: str  # its task class: task(config) implements trainers.base.Task
    help: str  # one line for `visalign train --help`
    own_loop: bool = False  # the task runs the shared loop itself (several runs): task(config).train()


ALGORITHMS: dict[str, Algorithm] = {
    "diffusion-dpo": Algorithm(
        "trainers.diffusion_dpo",
        "DiffusionDPOConfig",
        "DiffusionDPO",
        "Diffusion-DPO / Flow-DPO on any family, LoRA or full (--loss: any pairwise loss of visalign.losses)",
    ),
    "timestep-segment": Algorithm(
        "trainers.timestep_segment",
        "TimestepSegmentConfig",
        "TimestepSegment",
        "timestep-segment experts (AlignHuman): one DPO LoRA per timestep interval, each on its own data",
        own_loop=True,
    ),
    "mapo": Algorithm("trainers.mapo", "MaPOConfig", "MaPO", "MaPO: margin-aware, reference-free preference training"),
    "grpo": Algorithm(
        "trainers.grpo",
        "GRPOConfig",
        "GRPO",
        "online RL with any reward: Flow-GRPO / DanceGRPO / SDE-window GRPO on flow models, DDIM-eta GRPO on UNets",
    ),
    "drl": Algorithm(
        "trainers.drl",
        "DRLConfig",
        "DRL",
        "discriminator-guided RL: GRPO toward real data with a real-vs-base discriminator's logit as the reward",
    ),
    "rwr": Algorithm(
        "trainers.rwr",
        "RWRConfig",
        "RWR",
        "Flow-RWR: online reward-weighted regression on the model's own samples (softmax of rewards per prompt)",
    ),
    "llm-dpo": Algorithm(
        "trainers.llm_preference",
        "LLMPreferenceConfig",
        "LLMPreferenceTask",
        "text LLM preference training: DPO, IPO, KTO, ORPO, SimPO, ... (--loss: any text loss of visalign.losses)",
    ),
}


def usage() -> str:
    width = max(len(name) for name in ALGORITHMS)
    lines = ["usage: visalign train ALGO [--preset NAME] [--config FILE.yaml] [--key value ...]", "", "algorithms:"]
    lines += [f"  {name:<{width}}  {algo.help}" for name, algo in ALGORITHMS.items()]
    lines += ["", "Run 'visalign train ALGO --help' for the options of one algorithm."]
    return "\n".join(lines)


def resolve(name: str) -> tuple[type, type]:
    """The config and task classes of algorithm ``name``; an unknown name lists the available ones."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
    algo = ALGORITHMS[name]
    module = importlib.import_module(algo.module)
    return getattr(module, algo.config), getattr(module, algo.task)


def split_preset(name: str, argv: list[str]) -> tuple[dict, list[str]]:
    """``--preset NAME`` (or ``--preset=NAME``) out of ``argv`` -> (the preset's config values, the rest)."""
    rest, preset = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--preset":
            preset = next(args, None)
            if preset is None:
                raise ConfigError("--preset needs a name")
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if preset is None:
        return {}, rest
    presets = getattr(importlib.import_module(ALGORITHMS[name].module), "PRESETS", {})
    if preset not in presets:
        known = ", ".join(sorted(presets)) or "none"
        raise ConfigError(f"unknown preset {preset!r} for {name}; available: {known}")
    from visalign.config import explicit_values

    # the preset function validates: give it what the user set (a paper preset leaves e.g. the prompts to them)
    config_cls = getattr(importlib.import_module(ALGORITHMS[name].module), ALGORITHMS[name].config)
    return dataclasses.asdict(presets[preset](**explicit_values(config_cls, rest))), rest


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``ALGO`` and its options, train, and return the final evaluation results (``{}`` without any)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if argv:
            raise SystemExit(0)
        return {}
    name, rest = argv[0], argv[1:]
    config_cls, task_cls = resolve(name)
    defaults, rest = split_preset(name, rest)
    config = parse_config(
        config_cls, rest, prog=f"visalign train {name}", description=ALGORITHMS[name].help, defaults=defaults
    )
    from trainers.base import Trainer
    from visalign.distributed import process_state

    process_state()  # the process group, and an FSDP/DeepSpeed request taken off the environment, before any loading
    task = task_cls(config)
    results = task.train() if ALGORITHMS[name].own_loop else Trainer(task).train()
    print(f"visalign train {name}: done; checkpoints and logs in {config.output_dir}, export in "
          f"{config.output_dir}/final")  # fmt: skip
    timing = Path(config.output_dir) / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        print(f"  {t['steps']} steps in {t['train_seconds']:.1f} s ({t['seconds_per_step']:.3g} s/step), "
              f"evaluations during training {t['eval_seconds']:.1f} s")  # fmt: skip
    for key, value in results.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return results


if __name__ == "__main__":
    main()
