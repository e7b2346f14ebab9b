"""Learning curves of shapes-world GRPO runs, one PNG: the oracle's strict accuracy on held-in and held-out
captions and the squares drawn as squares (from each evaluation's ``report.json``), the rollout reward and the KL
to the base (from the run's TensorBoard logs, ``--report_to tensorboard``), against the step; the first panel's
top axis gives the first run's minutes of training (from the wall time of its logs). Runs given together as
``label=RUN,RUN,RUN`` (seeds of one recipe) are drawn as their mean with a band from the lowest to the highest.

    python examples/shapes_world/plot_grpo.py OUT.png RUN [RUN ...]          (RUN: a --output_dir; label=RUN works)
    python examples/shapes_world/plot_grpo.py OUT.png "3 seeds=SEED0,SEED1,SEED2"
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


def across(series: list[tuple[list, list[float]]], what: str) -> tuple[list, list[float], list[float], list[float]]:
    """Mean, lowest and highest of several runs' ``(steps, values)`` on the steps they all have."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in series)))
    if not common:
        raise SystemExit(f"the runs given together share no step of {what}")
    columns = [[dict(zip(steps, values))[step] for steps, values in series] for step in common]
    return common, [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def draw(ax, series: list[tuple[list, list[float]]], what: str, style: str, **kw):
    """One run's line, or the mean of several with a band from their lowest to their highest."""
    steps, mean, low, high = across(series, what)
    (line,) = ax.plot(steps, mean, style, **kw)
    if len(series) > 1:
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    return line


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
        label, _, paths = spec.rpartition("=")
        group = [Path(p) for p in paths.split(",")]
        label = label or group[0].name
        evs = [evaluations(run) for run in group]
        for run, ev in zip(group, evs):
            if not ev["step"]:
                raise SystemExit(f"{run}: no eval/step-*/report.json (run GRPO with --eval_every and --oracle)")
        seeds = f" ({len(group)} runs)" if len(group) > 1 else ""
        line = draw(axes[0], [(ev["step"], ev["held_in"]) for ev in evs], "evaluations", "o-",
                    label=f"{label}: held-in{seeds}")  # fmt: skip
        color = line.get_color()
        draw(axes[0], [(ev["step"], ev["held_out"]) for ev in evs], "evaluations", "s--", color=color,
             label=f"{label}: held-out")  # fmt: skip
        draw(axes[0], [(ev["step"], ev["squares"]) for ev in evs], "evaluations", ":", color=color, alpha=0.6,
             label=f"{label}: squares")  # fmt: skip
        logged = [scalars(run, "reward/mean", "kl") for run in group]
        for ax, tag in ((axes[1], "reward/mean"), (axes[2], "kl")):
            if all(tag in found for found in logged):
                series = [(found[tag][0], smooth(found[tag][1])) for found in logged]
                draw(ax, series, tag, "-", color=color, label=label)
        if all("kl" in found for found in logged):
            steps, _, minutes = logged[0]["kl"]
            per_step = per_step or minutes[-1] / max(steps[-1], 1)  # the first run's minutes per step
    if per_step:
        top = axes[0].secondary_xaxis("top", functions=(lambda s: s * per_step, lambda m: m / per_step))
        first = runs[0].rpartition("=")
        top.set_xlabel(f"minutes of training ({first[0] or Path(first[2].split(',')[0]).name})")
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
