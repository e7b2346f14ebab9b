"""Reward-hacking monitors: a held-out gold metric, drift statistics, and an alarm when they part ways.

Online RL maximises a learned reward, and a learned reward can be maximised without doing what it was meant to
measure: oversaturated colours, grid artifacts, one sample per prompt (Flow-GRPO, Liu et al. 2025, Sec. 6;
"reward hacking"). The signature is a training reward that keeps rising while a held-out **gold** metric (the
oracle in the shapes world, a reward the trainer never optimises elsewhere) falls. This module records, at each
evaluation, the training reward and the gold metric on the same seeded held-out samples plus drift statistics
(saturation, brightness, colour entropy, feature-space Fréchet distance to reference data, diversity within and
across prompts), raises an alarm by :func:`hacking_alarm`, and plots the record.

Everything here takes plain tensors and floats: the caller (a trainer, ``visalign evaluate``) samples and scores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import save_json
from .metrics import drift_stats, frechet_distance, pairwise_diversity

__all__ = ["RewardHackingMonitor", "drift_report", "hacking_alarm", "within_prompt_diversity"]


def within_prompt_diversity(features: torch.Tensor, prompts: Sequence[str]) -> float:
    """Mean, over prompts with at least two samples, of the pairwise cosine distance of their features.

    Mode collapse under RL shows first as samples of one prompt becoming alike, while diversity across prompts
    (:func:`~visalign.metrics.pairwise_diversity` over the whole set) can stay high.

    Args:
        features: ``[N, D]`` per-sample features.
        prompts: ``N`` prompts (samples with equal prompts form a group).

    Returns:
        The mean within-group diversity in ``[0, 2]``; NaN when no prompt has two samples.
    """
    if len(prompts) != features.shape[0]:
        raise ValueError(f"got {features.shape[0]} feature rows but {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    values = [pairwise_diversity(features[rows]) for rows in groups.values() if len(rows) > 1]
    return float(sum(values) / len(values)) if values else math.nan


def drift_report(
    media: torch.Tensor,
    prompts: Sequence[str] | None = None,
    *,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Drift statistics of a set of samples.

    Args:
        media: ``[N, 3, H, W]`` or ``[N, F, 3, H, W]`` float in ``[0, 1]``.
        prompts: ``N`` prompts, for ``diversity_within_prompt``.
        features: ``media -> [N, D]`` feature map for the Fréchet distance and diversity (default: 16x16 pixel
            thumbnails, :func:`visalign.evaluation.thumbnails`).
        reference_features: ``[M, D]`` features of reference data (real images, or the base model's samples) in
            the same feature space, for ``fd_to_reference``.

    Returns:
        ``saturation``, ``brightness``, ``color_entropy`` (means), ``diversity`` (across all samples),
        ``diversity_within_prompt`` (with prompts) and ``fd_to_reference`` (with reference features).
    """
    from .evaluation import thumbnails

    report = drift_stats(media)
    feats = (features or thumbnails)(media).float().cpu()
    report["diversity"] = pairwise_diversity(feats)
    if prompts is not None:
        report["diversity_within_prompt"] = within_prompt_diversity(feats, list(prompts))
    if reference_features is not None:
        report["fd_to_reference"] = frechet_distance(feats, reference_features.float().cpu())
    return report


def hacking_alarm(
    rewards: Sequence[float],
    golds: Sequence[float],
    *,
    patience: int = 2,
    min_gold_drop: float = 0.05,
    min_reward_gain: float = 0.0,
) -> bool:
    """Whether the gold metric has fallen while the training reward rose, for ``patience`` evaluations in a row.

    With ``k`` the evaluation where the gold metric peaked (the first, on ties), the alarm holds when each of the
    last ``patience`` evaluations comes after ``k`` and has ``gold <= gold_k - min_gold_drop`` and
    ``reward > reward_k + min_reward_gain``. A gold metric that falls while the reward also falls is plain
    training trouble, not hacking, and does not raise it. Higher is better for both.

    Args:
        rewards, golds: one value per evaluation, in order (NaN golds are skipped: no gold metric that time).
        patience: consecutive evaluations needed (>= 1).
        min_gold_drop: how far below its peak the gold metric must be (its own units: 0.05 = 5 points of accuracy).
        min_reward_gain: how far above its value at the gold peak the reward must be.

    Returns:
        ``True`` when the alarm holds at the last evaluation.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(rewards) != len(golds):
        raise ValueError(f"got {len(rewards)} rewards but {len(golds)} gold values")
    points = [(r, g) for r, g in zip(rewards, golds) if not math.isnan(g) and not math.isnan(r)]
    if len(points) < patience + 1:
        return False
    peak = max(range(len(points)), key=lambda i: (points[i][1], -i))
    reward_at_peak, gold_at_peak = points[peak]
    recent = range(len(points) - patience, len(points))
    return all(
        i > peak and points[i][1] <= gold_at_peak - min_gold_drop and points[i][0] > reward_at_peak + min_reward_gain
        for i in recent
    )


class RewardHackingMonitor:
    """Records training reward, gold metric and drift at each evaluation; raises an alarm (and asks to stop).

    Args:
        patience, min_gold_drop, min_reward_gain: the alarm rule (:func:`hacking_alarm`).
        early_stop: whether :attr:`should_stop` turns true once the alarm is raised.
        reward_name, gold_name: labels for logs and plots.
    """

    def __init__(
        self,
        *,
        patience: int = 2,
        min_gold_drop: float = 0.05,
        min_reward_gain: float = 0.0,
        early_stop: bool = False,
        reward_name: str = "training reward",
        gold_name: str = "gold metric",
    ):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_gold_drop, self.min_reward_gain = patience, min_gold_drop, min_reward_gain
        self.early_stop = early_stop
        self.reward_name, self.gold_name = reward_name, gold_name
        self.steps: list[int] = []
        self.rewards: list[float] = []
        self.golds: list[float] = []
        self.drift: dict[str, list[float]] = {}
        self.alarm_step: int | None = None

    @property
    def alarm(self) -> bool:
        """Whether the alarm has been raised (it stays raised)."""
        return self.alarm_step is not None

    @property
    def should_stop(self) -> bool:
        return self.early_stop and self.alarm

    def record(self, step: int, reward: float, gold: float | None, drift: dict[str, float] | None = None) -> bool:
        """Add one evaluation; returns whether the alarm is raised now (first time or still)."""
        self.steps.append(int(step))
        self.rewards.append(float(reward))
        self.golds.append(math.nan if gold is None else float(gold))
        n = len(self.steps)
        for key in set(self.drift) | set(drift or {}):
            column = self.drift.setdefault(key, [math.nan] * (n - 1))
            column.append(float((drift or {}).get(key, math.nan)))
        firing = hacking_alarm(
            self.rewards,
            self.golds,
            patience=self.patience,
            min_gold_drop=self.min_gold_drop,
            min_reward_gain=self.min_reward_gain,
        )
        if firing and self.alarm_step is None:
            self.alarm_step = int(step)
        return firing

    def history(self) -> list[dict[str, float]]:
        """One row per evaluation: ``step``, ``reward``, ``gold`` and the drift statistics."""
        return [
            {
                "step": s,
                "reward": r,
                "gold": g,
                **{k: v[i] for k, v in self.drift.items()},
            }
            for i, (s, r, g) in enumerate(zip(self.steps, self.rewards, self.golds))
        ]

    # ----------------------------------------------------------------- persistence
    def state_dict(self, prefix: str = "monitor/") -> dict[str, torch.Tensor]:
        """Tensors only (the loop's checkpoints are safetensors), so a resumed run keeps its record."""
        state = {
            f"{prefix}steps": torch.tensor(self.steps, dtype=torch.long),
            f"{prefix}rewards": torch.tensor(self.rewards, dtype=torch.float64),
            f"{prefix}golds": torch.tensor(self.golds, dtype=torch.float64),
            f"{prefix}alarm_step": torch.tensor(-1 if self.alarm_step is None else self.alarm_step),
        }
        state.update({f"{prefix}drift/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.drift.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "monitor/") -> None:
        self.steps = [int(v) for v in state[f"{prefix}steps"]]
        self.rewards = [float(v) for v in state[f"{prefix}rewards"]]
        self.golds = [float(v) for v in state[f"{prefix}golds"]]
        alarm = int(state[f"{prefix}alarm_step"])
        self.alarm_step = None if alarm < 0 else alarm
        drift = f"{prefix}drift/"
        self.drift = {k[len(drift) :]: [float(x) for x in v] for k, v in state.items() if k.startswith(drift)}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``monitor.json`` (settings, alarm, history) and ``monitor.png`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        report = {
            "reward_name": self.reward_name,
            "gold_name": self.gold_name,
            "patience": self.patience,
            "min_gold_drop": self.min_gold_drop,
            "min_reward_gain": self.min_reward_gain,
            "alarm_step": self.alarm_step,
            "history": self.history(),
        }
        save_json(report, directory / "monitor.json", default=lambda x: None)
        if self.steps:
            self.plot(directory / "monitor.png")
        return directory / "monitor.json"

    def plot(self, path: str | os.PathLike) -> Path:
        """Reward and gold metric against steps (left; the alarm as a vertical line) and drift (right)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2)
        left.plot(self.steps, self.rewards, "o-", color="tab:blue", label=self.reward_name)
        left.set_xlabel("step")
        left.set_ylabel(self.reward_name, color="tab:blue")
        gold_axis = left.twinx()
        gold_axis.plot(self.steps, self.golds, "s-", color="tab:orange", label=self.gold_name)
        gold_axis.set_ylabel(self.gold_name, color="tab:orange")
        if self.alarm_step is not None:
            left.axvline(self.alarm_step, color="tab:red", linestyle="--", label="alarm")
            left.legend(loc="upper left", fontsize=8)
        left.set_title("reward vs gold metric")
        for key, values in sorted(self.drift.items()):
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                continue
            scale = max(abs(v) for v in finite) or 1.0  # each statistic relative to its largest value
            right.plot(self.steps, [v / scale for v in values], ".-", label=key)
        right.set_xlabel("step")
        right.set_title("drift (each / its max)")
        if self.drift:
            right.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        return path
