"""Learning curves of shapes-world GRPO runs, one PNG: the oracle's strict accuracy on held-in and held-out
captions and the squares drawn as squares (from each evaluation's ``report.json``), the rollout reward and the KL
to the base (from the run's TensorBoard logs, ``--report_to tensorboard``), against the step; the first panel's
top axis gives the first run's minutes of training (from the wall time of its logs).

    python examples/shapes_world/plot_grpo.py OUT.png RUN [RUN ...]          (RUN: a --output_dir; label=RUN works)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def evaluations(run: Path) -> dict[str, list[float]]:
    """Step, held-in / held-out strict accuracy and square shape accuracy of every ``eval/step-N/report.json``."""
    rows = {"step": [], "held_in": [], "held_out": [], "squares": []}
    for report in sorted((run / "eval").glob("step-*/report.json")):
        data = json.loads(report.read_text())
        results = data["results"]
        rows["step"].append(data["step"])
        for key, name in (("held_in", "held_in/strict_acc"), ("held_out", "held_out/strict_acc"),
                          ("squares", "square/shape_acc")):  # fmt: skip
            rows[key].append(100 * results.get(f"oracle/{name}", float("nan")))
    return rows


def scalars(run: Path, *tags: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """``tag -> (steps, values, wall times in minutes from the first record)`` from the run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for folder in sorted({p.parent for p in (run / "logs").rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in tags:
            if tag in events.Tags()["scalars"]:
                records = events.Scalars(tag)
                start = records[0].wall_time
                found[tag] = ([r.step for r in records], [r.value for r in records],
                              [(r.wall_time - start) / 60 for r in records])  # fmt: skip
    return found


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, runs = Path(argv[0]), argv[1:]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    per_step = 0.0
    for spec in runs:
        label, _, path = spec.rpartition("=")
        run = Path(path)
        label = label or run.name
        ev = evaluations(run)
        if not ev["step"]:
            raise SystemExit(f"{run}: no eval/step-*/report.json (run GRPO with --eval_every and --oracle)")
        (line,) = axes[0].plot(ev["step"], ev["held_in"], "o-", label=f"{label}: held-in")
        axes[0].plot(ev["step"], ev["held_out"], "s--", color=line.get_color(), label=f"{label}: held-out")
        axes[0].plot(ev["step"], ev["squares"], ":", color=line.get_color(), alpha=0.6, label=f"{label}: squares")
        logged = scalars(run, "reward/mean", "kl")
        if "reward/mean" in logged:
            steps, values, _ = logged["reward/mean"]
            axes[1].plot(steps, smooth(values), color=line.get_color(), label=label)
        if "kl" in logged:
            steps, values, minutes = logged["kl"]
            axes[2].plot(steps, smooth(values), color=line.get_color(), label=label)
            per_step = per_step or minutes[-1] / max(steps[-1], 1)  # the first run's minutes per step
    if per_step:
        top = axes[0].secondary_xaxis("top", functions=(lambda s: s * per_step, lambda m: m / per_step))
        top.set_xlabel(f"minutes of training ({runs[0].rpartition('=')[0] or Path(runs[0]).name})")
    axes[0].set(xlabel="step", ylabel="oracle accuracy (%)")
    axes[0].set_title("strict held-in / held-out, squares (shape)", pad=30 if per_step else 6)
    axes[1].set(xlabel="step", ylabel="mean reward of a rollout (10-step mean)", title="training reward")
    axes[2].set(xlabel="step", ylabel="KL to the base (10-step mean)", title="KL")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
