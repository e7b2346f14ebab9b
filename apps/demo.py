"""``visalign demo``: the main job end to end on the shapes world, offline, on a CPU, in minutes.

1. pairs: toy-sd samples K images per held-in caption; toy-clip (the learned reward) ranks them; best vs worst.
2. train: Diffusion-DPO (LoRA) on those pairs; mid-run, the oracle and toy-clip on a subset of step 3's samples.
3. evaluate: base against the aligned LoRA on the same prompts and seeds, held-in and held-out captions, judged by
   the oracle (which training never sees) and toy-clip. These are also the curves' first and last points: the
   base and the final LoRA are sampled once.
4. report: a before/after table, a side-by-side grid, the reward and oracle curves as a plot, ``report.json``.

Each stage's seconds are printed as it ends, all of them and the total at the end, and kept in ``report.json``
(``stage_seconds``, ``seconds``).
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
    sample_steps: int = field(20, help="sampling steps of the pairs' candidates (fewer make worse pairs)")
    sample_batch: int = field(32, help="samples per sampling batch")
    guidance: float | None = field(None, help="guidance scale (default: the model's toyworld.json, else the family's)")
    train_steps: int = field(150, help="DPO optimizer steps")
    batch_size: int = field(16, help="pairs per step")
    learning_rate: float = field(2e-3, help="LoRA learning rate")
    beta: float = field(100.0, help="DPO beta (toy-sd is a v-prediction UNet at 64 px; 5000 barely moves it)")
    lora_rank: int = field(8, help="LoRA rank")
    eval_every: int = field(75, help="a mid-run point of the curves every N steps (0: none)")
    curve_n: int = field(80, help="samples per mid-run point: a seeded subset of the evaluation's, half per split")
    eval_steps: int = field(10, help="sampling steps of the evaluation and the curve points")
    eval_n: int = field(200, help="held-in evaluation samples (the 80 captions cycled; the gain is measured here)")
    eval_n_held_out: int = field(100, help="held-out evaluation samples (10 captions: 10 each by default)")
    threads: int = field(0, help="torch CPU threads (0: OMP_NUM_THREADS if set, else the cores idle at the start)")
    progress: bool = field(True, help="progress bars")

    def __post_init__(self):
        if self.per_prompt < 2:
            raise ConfigError(f"per_prompt must be >= 2, got {self.per_prompt}")
        for name in ("sample_steps", "eval_steps", "sample_batch", "train_steps", "eval_n", "eval_n_held_out"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.curve_n < 0 or self.threads < 0:
            raise ConfigError("eval_every, curve_n and threads must be >= 0")
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
    sizes = [h["n"] for h in history if "n" in h]
    if len(set(sizes)) > 1:  # the end points on the whole evaluation, the mid-run ones on a subset of it
        fig.text(0.5, 0.01, f"first and last points: {sizes[0]} samples; mid-run: {min(sizes)} of them", ha="center")
    fig.tight_layout(rect=(0, 0.05, 1, 1) if len(set(sizes)) > 1 else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def idle_cores(interval: float = 0.5) -> float | None:
    """How many CPU cores sat idle over the next ``interval`` seconds (Linux ``/proc/stat``; None elsewhere)."""
    import os

    def times():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle0, total0 = times()
        time.sleep(interval)
        idle1, total1 = times()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)


def cpu_threads(requested: int = 0) -> int:
    """Torch threads for the demo: ``requested``; else ``OMP_NUM_THREADS`` (torch reads it); else torch's
    default (the cores) when they are idle now, one thread per idle core when another process is busy.

    Measured on a 2-core machine (docs/experiments/demo.md): on an idle one 2 threads sample toy-sd ~1.5x faster
    than 1; with another process busy on a core 2 threads are up to ~1.5x slower than 1 even when they sleep
    while waiting (``OMP_WAIT_POLICY=PASSIVE``, set by :func:`main`), and 2-14x slower when they spin."""
    import os

    import torch

    if requested:
        return requested
    cores = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return cores
    idle = idle_cores()
    return cores if idle is None else max(1, min(cores, int(idle + 0.5)))


def evaluation_set(cfg: DemoConfig, held_in: list[str], held_out: list[str]):
    """Step 3's ``(texts, seeds)``: ``eval_n`` held-in then ``eval_n_held_out`` held-out samples (captions cycled),
    and the indices of the mid-run curve points' subset of them: ``curve_n / 2`` per split, drawn with ``seed``."""
    import random

    n_in, n_out = cfg.eval_n, cfg.eval_n_held_out
    texts = [held_in[i % len(held_in)] for i in range(n_in)] + [held_out[i % len(held_out)] for i in range(n_out)]
    seeds = [cfg.seed + 50_000 + i for i in range(len(texts))]
    rng = random.Random(cfg.seed)
    subset = sorted(rng.sample(range(n_in), min(cfg.curve_n // 2, n_in)))
    subset += sorted(n_in + i for i in rng.sample(range(n_out), min(cfg.curve_n // 2, n_out)))
    return texts, seeds, subset


def run(cfg: DemoConfig) -> dict:
    start = time.perf_counter()  # "load" counts the imports below too
    import torch

    from apps.pairs import make_pairs
    from reward_models import build_reward
    from trainers.base import Trainer
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from visalign.evaluation import evaluate_variants, format_table, oracle_metrics, sample_all
    from visalign.models import load_model
    from visalign.toyworld import caption_texts

    out = Path(cfg.out)
    if not Path(cfg.model).exists():
        raise ConfigError(f"base model {cfg.model} not found (the shapes-world models ship in {TOY})")
    seconds: dict[str, float] = {}

    def stage_done(name: str, since: float) -> float:
        seconds[name] = time.perf_counter() - since
        print(f"      {name}: {seconds[name]:.0f} s")
        return time.perf_counter()

    torch.set_num_threads(cpu_threads(cfg.threads))
    save_config(cfg, out)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    reward = build_reward(cfg.reward)
    name = reward_name(cfg.reward)
    pair_kw = dict(steps=cfg.sample_steps, guidance=cfg.guidance, batch_size=cfg.sample_batch)
    eval_kw = {**pair_kw, "steps": cfg.eval_steps}

    def score(media, prompts):
        with torch.no_grad():
            return reward(media, prompts).scores

    held_in, held_out = caption_texts("held_in"), caption_texts("held_out")
    texts, seeds, subset = evaluation_set(cfg, held_in, held_out)
    seconds["load"] = time.perf_counter() - start
    t = time.perf_counter()
    print(
        f"[1/4] pairs: {len(held_in)} held-in captions x {cfg.per_prompt} samples x {cfg.repeats}, "
        f"{cfg.sample_steps} sampling steps, ranked by the reward"
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
        progress=cfg.progress,
        **pair_kw,
    )
    print(f"      {stats['pairs']} pairs (mean {name} margin {stats['mean_margin']:.3f})")
    t = stage_done("pairs", t)

    points = f", a curve point on {len(subset)} samples every {cfg.eval_every}" if cfg.eval_every and subset else ""
    print(f"[2/4] train: Diffusion-DPO, LoRA rank {cfg.lora_rank}, {cfg.train_steps} steps{points}")
    train_cfg = DiffusionDPOConfig(
        model=cfg.model, data=str(pairs_dir), output_dir=str(out / "train"), seed=cfg.seed,
        max_steps=cfg.train_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, beta=cfg.beta,
        lora_rank=cfg.lora_rank, lr_scheduler="constant", eval_every=cfg.eval_every if subset else 0,
        report_to="tensorboard", progress=cfg.progress, cache_dir=str(out / "cache"),
    )  # fmt: skip
    task = DiffusionDPO(train_cfg, model=model)
    history = []
    curve_texts, curve_seeds = [texts[i] for i in subset], [seeds[i] for i in subset]

    def curve_point(step, eval_dir):
        """A mid-run point on the curve subset; the first and last points come from step 3 (sampled once)."""
        if step == 0 or step >= cfg.train_steps:
            return {}
        training = model.denoiser.training
        model.denoiser.eval()
        try:
            media = sample_all(model, curve_texts, curve_seeds, progress=False, **eval_kw)
        finally:
            model.denoiser.train(training)
        results = oracle_metrics(media, curve_texts)
        results[f"reward/{name}"] = float(torch.as_tensor(score(media, curve_texts)).float().mean())
        history.append({"step": step, "n": len(subset), **results})
        return results

    task.evaluate = curve_point
    Trainer(task).train()
    lora = out / "lora"
    if lora.exists():
        shutil.rmtree(lora)
    shutil.copytree(out / "train" / "final", lora)
    t = stage_done("train", t)

    print(
        f"[3/4] evaluate: base vs DPO on {cfg.eval_n} held-in and {cfg.eval_n_held_out} held-out samples "
        f"(same seeds), {cfg.eval_steps} sampling steps"
    )
    report = evaluate_variants(
        model,
        {"base": None, "dpo": "default"},
        texts,
        seeds,
        out / "evaluate",
        scorers={name: score},
        oracle=True,
        progress=cfg.progress,
        **eval_kw,
    )
    rows = report["variants"]
    history = [
        {"step": 0, "n": len(texts), **rows["base"]},
        *history,
        {"step": cfg.train_steps, "n": len(texts), **rows["dpo"]},
    ]
    t = stage_done("evaluate", t)

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
    stage_done("report", t)
    seconds["total"] = time.perf_counter() - start
    summary = {
        "pairs": stats["pairs"],
        "train_steps": cfg.train_steps,
        "held_in_strict": {k: rows[k]["oracle/held_in/strict_acc"] for k in rows},
        "held_out_strict": {k: rows[k]["oracle/held_out/strict_acc"] for k in rows},
        "history": history,
        "stage_seconds": seconds,
        "seconds": seconds["total"],
        "torch_threads": torch.get_num_threads(),
    }
    (out / "report.json").write_text(json.dumps({**summary, "evaluate": rows}, indent=2))
    gain = 100 * (summary["held_in_strict"]["dpo"] - summary["held_in_strict"]["base"])
    print(
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
        + f"; total {seconds['total']:.0f} s ({seconds['total'] / 60:.1f} min, {torch.get_num_threads()} threads)"
    )  # fmt: skip
    print(
        f"held-in strict accuracy {100 * summary['held_in_strict']['base']:.1f}% -> "
        f"{100 * summary['held_in_strict']['dpo']:.1f}% ({gain:+.1f} points), in {seconds['total'] / 60:.1f} min"
    )
    print(f"grid: {out / 'grid.png'}  curves: {plot}  LoRA: {lora}  report: {out / 'report.json'}")
    print(f"compare them side by side: visalign compare --model {cfg.model} --lora {lora}")
    return summary


def main(argv: list[str]) -> None:
    import os

    from visalign.config import parse_config

    # OpenMP threads that sleep while they wait rather than spin (set before torch loads OpenMP): as fast on an idle
    # machine, and when another process takes a core mid-run, sampling slows <= ~1.5x instead of 2-14x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    run(parse_config(DemoConfig, argv, prog="visalign demo", description=__doc__.splitlines()[0]))
