"""``visalign demo``: the main job end to end on the shapes world, offline, on a CPU, in minutes.

1. pairs: toy-sd samples K images per held-in caption; toy-clip (the learned reward) ranks them; best vs worst.
2. train: Diffusion-DPO (LoRA) on those pairs, evaluated during training with toy-clip and the oracle.
3. evaluate: base against the aligned LoRA on the same prompts and seeds, held-in and held-out captions, judged by
   the oracle (which training never sees) and toy-clip.
4. report: a before/after table, a side-by-side grid, the reward and oracle curves as a plot, ``report.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from visalign.config import field, save_config
from visalign.errors import ConfigError

TOY = Path(__file__).resolve().parents[1] / "assets" / "toyworld"


@dataclass
class DemoConfig:
    out: str = field("outputs/demo", help="output folder (the aligned LoRA goes to OUT/lora)")
    model: str = field(str(TOY / "toy-sd"), help="base pipeline (default: the shipped toy-sd)")
    reward: str = field(f"clip(model={TOY / 'toy-clip'})", help="reward that labels the pairs (default: toy-clip)")
    seed: int = field(0, help="seed of sampling, training and evaluation")
    per_prompt: int = field(4, help="samples per caption when making pairs")
    repeats: int = field(2, help="passes over the held-in captions when making pairs")
    pairing: str = field("best-worst", help="best-worst (one pair per caption group) or spread (K/2 pairs)")
    sample_steps: int = field(20, help="sampling steps")
    guidance: float | None = field(None, help="classifier-free guidance scale (default: the model family's)")
    train_steps: int = field(300, help="DPO optimizer steps")
    batch_size: int = field(16, help="pairs per step")
    learning_rate: float = field(1e-3, help="LoRA learning rate")
    beta: float = field(100.0, help="DPO beta (toy-sd is a v-prediction UNet at 64 px; 5000 barely moves it)")
    lora_rank: int = field(8, help="LoRA rank")
    eval_every: int = field(100, help="evaluate every N steps (for the curves)")
    eval_n: int = field(200, help="evaluation samples per split (held-in and held-out)")
    progress: bool = field(True, help="progress bars")

    def __post_init__(self):
        if self.per_prompt < 2:
            raise ConfigError(f"per_prompt must be >= 2, got {self.per_prompt}")
        from apps.pairs import PAIRINGS

        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown pairing {self.pairing!r}; choose one of {', '.join(PAIRINGS)}")


def reward_name(spec: str) -> str:
    """A short name of the reward for tables: ``toy-clip`` for the default, else the spec itself."""
    return "toy-clip" if spec == DemoConfig.reward else spec


def plot_curves(history: list[dict], path: Path, reward: str = "toy-clip") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, label in (("oracle/held_in/strict_acc", "held-in"), ("oracle/held_out/strict_acc", "held-out")):
        a.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", label=label)
    a.set_title("oracle strict accuracy (gold)")
    a.set_xlabel("DPO step")
    a.legend()
    rewards = [k for k in history[0] if k.startswith("reward/")]
    for key in rewards:
        b.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", color="tab:green")
    b.set_title(f"{reward} reward (trained on)")
    b.set_xlabel("DPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: DemoConfig) -> dict:
    import torch

    from apps.pairs import make_pairs
    from reward_models import build_reward
    from trainers.base import Trainer
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from visalign.evaluation import evaluate_variants, format_table
    from visalign.models import load_model
    from visalign.toyworld import caption_texts

    out = Path(cfg.out)
    if not Path(cfg.model).exists():
        raise ConfigError(f"base model {cfg.model} not found (the shapes-world models ship in {TOY})")
    start = time.perf_counter()
    save_config(cfg, out)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    reward = build_reward(cfg.reward)

    def score(media, prompts):
        with torch.no_grad():
            return reward(media, prompts).scores

    held_in, held_out = caption_texts("held_in"), caption_texts("held_out")
    print(
        f"[1/4] pairs: {len(held_in)} held-in captions x {cfg.per_prompt} samples x {cfg.repeats}, "
        "ranked by the reward"
    )
    pairs_dir = out / "pairs"
    if pairs_dir.exists():
        shutil.rmtree(pairs_dir)
    stats = make_pairs(
        model,
        score,
        held_in,
        pairs_dir,
        per_prompt=cfg.per_prompt,
        seed=cfg.seed + 10_000,
        repeats=cfg.repeats,
        pairing=cfg.pairing,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        progress=cfg.progress,
    )
    name = reward_name(cfg.reward)
    print(f"      {stats['pairs']} pairs (mean {name} margin {stats['mean_margin']:.3f})")

    print(f"[2/4] train: Diffusion-DPO, LoRA rank {cfg.lora_rank}, {cfg.train_steps} steps")
    eval_prompts = out / "eval_prompts.txt"
    eval_prompts.write_text("\n".join(held_in + held_out) + "\n")
    train_cfg = DiffusionDPOConfig(
        model=cfg.model, data=str(pairs_dir), output_dir=str(out / "train"), seed=cfg.seed,
        max_steps=cfg.train_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, beta=cfg.beta,
        lora_rank=cfg.lora_rank, lr_scheduler="constant", eval_every=cfg.eval_every, eval_prompts=str(eval_prompts),
        eval_samples=len(held_in) + len(held_out), eval_steps=cfg.sample_steps, eval_guidance=cfg.guidance,
        oracle=True, eval_reward=cfg.reward,
        report_to="tensorboard", progress=cfg.progress, cache_dir=str(out / "cache"),
    )  # fmt: skip
    task = DiffusionDPO(train_cfg, model=model)
    history = []
    evaluate = task.evaluate

    def evaluate_and_record(step, eval_dir):
        results = evaluate(step, eval_dir)
        history.append({"step": step, **results})
        return results

    task.evaluate = evaluate_and_record
    with model.lora_disabled():
        evaluate_and_record(0, out / "train" / "eval" / "step-000000")
    Trainer(task).train()
    lora = out / "lora"
    if lora.exists():
        shutil.rmtree(lora)
    shutil.copytree(out / "train" / "final", lora)

    print(f"[3/4] evaluate: base vs DPO on {cfg.eval_n} held-in and {cfg.eval_n} held-out samples (same seeds)")
    texts = [held_in[i % len(held_in)] for i in range(cfg.eval_n)] + [
        held_out[i % len(held_out)] for i in range(cfg.eval_n)
    ]
    seeds = [cfg.seed + 50_000 + i for i in range(len(texts))]
    report = evaluate_variants(
        model,
        {"base": None, "dpo": "default"},
        texts,
        seeds,
        out / "evaluate",
        scorers={name: score},
        oracle=True,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        progress=cfg.progress,
    )

    print("[4/4] report")
    keys = [
        "oracle/held_in/strict_acc",
        "oracle/held_out/strict_acc",
        "oracle/all/object_rate",
        f"reward/{name}",
        "win_rate/oracle_strict",
        "saturation",
        "diversity",
    ]
    print(format_table(report, keys))
    plot = plot_curves(history, out / "curves.png", name)
    shutil.copy(out / "evaluate" / "grid.png", out / "grid.png")
    rows = report["variants"]
    summary = {
        "pairs": stats["pairs"],
        "train_steps": cfg.train_steps,
        "held_in_strict": {k: rows[k]["oracle/held_in/strict_acc"] for k in rows},
        "held_out_strict": {k: rows[k]["oracle/held_out/strict_acc"] for k in rows},
        "history": history,
        "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps({**summary, "evaluate": report["variants"]}, indent=2))
    gain = 100 * (summary["held_in_strict"]["dpo"] - summary["held_in_strict"]["base"])
    print(
        f"held-in strict accuracy {100 * summary['held_in_strict']['base']:.1f}% -> "
        f"{100 * summary['held_in_strict']['dpo']:.1f}% ({gain:+.1f} points), in {summary['seconds'] / 60:.1f} min"
    )
    print(f"grid: {out / 'grid.png'}  curves: {plot}  LoRA: {lora}  report: {out / 'report.json'}")
    print(f"compare them side by side: visalign compare --model {cfg.model} --lora {lora}")
    return summary


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    run(parse_config(DemoConfig, argv, prog="visalign demo", description=__doc__.splitlines()[0]))
