"""Reward-hacking monitors: the alarm rule on constructed histories, drift statistics exactly, persistence, plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from visalign.metrics import brightness, color_entropy, frechet_distance, pairwise_diversity, saturation
from visalign.monitors import RewardHackingMonitor, drift_report, hacking_alarm, within_prompt_diversity


@pytest.mark.parametrize(
    "rewards, golds, patience, expected",
    [
        ([0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.3, 0.2], 2, True),  # reward up, gold down: hacking
        ([0.1, 0.2, 0.3], [0.5, 0.4, 0.3], 3, False),  # not enough evaluations after the peak yet
        ([0.4, 0.3, 0.2, 0.1], [0.5, 0.4, 0.3, 0.2], 2, False),  # both fall: trouble, not hacking
        ([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], 2, False),  # both rise: learning
        ([0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.52, 0.3], 2, False),  # gold recovered in between
        ([0.1, 0.2, 0.3, 0.4], [0.5, 0.48, 0.47, 0.46], 2, False),  # drops smaller than min_gold_drop
        ([0.1, 0.2, 0.3, 0.4], [0.5, math.nan, 0.3, 0.2], 2, True),  # an evaluation without gold is skipped
        ([0.1, 0.2], [0.5, 0.3], 1, True),
    ],
)
def test_hacking_alarm_rule(rewards, golds, patience, expected):
    assert hacking_alarm(rewards, golds, patience=patience, min_gold_drop=0.05) is expected


def test_hacking_alarm_thresholds_and_errors():
    assert not hacking_alarm([0.1, 0.11, 0.12], [0.5, 0.3, 0.3], patience=2, min_reward_gain=0.05)
    assert hacking_alarm([0.1, 0.2, 0.3], [0.5, 0.3, 0.3], patience=2, min_reward_gain=0.05)
    with pytest.raises(ValueError, match="patience"):
        hacking_alarm([1.0], [1.0], patience=0)
    with pytest.raises(ValueError, match="2 rewards but 1 gold"):
        hacking_alarm([1.0, 2.0], [1.0])


def test_monitor_records_alarms_stops_and_round_trips(tmp_path):
    monitor = RewardHackingMonitor(patience=2, min_gold_drop=0.05, early_stop=True, gold_name="oracle")
    history = [(10, 0.1, 0.5), (20, 0.2, 0.6), (30, 0.3, 0.5), (40, 0.4, 0.4), (50, 0.5, 0.3)]
    fired = [monitor.record(s, r, g, {"saturation": 0.1 * i}) for i, (s, r, g) in enumerate(history)]
    assert fired == [False, False, False, True, True] and monitor.alarm_step == 40 and monitor.should_stop
    monitor.record(60, 0.6, None, {"brightness": 0.9})  # a new drift key later: earlier rows get NaN
    rows = monitor.history()
    assert math.isnan(rows[0]["brightness"]) and rows[-1]["brightness"] == 0.9 and math.isnan(rows[-1]["gold"])
    copy = RewardHackingMonitor()
    copy.load_state_dict(monitor.state_dict())
    assert copy.alarm_step == 40 and copy.steps == monitor.steps
    assert json.dumps(copy.history()) == json.dumps(rows)  # NaN-aware equality through JSON
    monitor.save(tmp_path)
    report = json.loads((tmp_path / "monitor.json").read_text())
    assert report["alarm_step"] == 40 and len(report["history"]) == 6 and report["gold_name"] == "oracle"
    assert (tmp_path / "monitor.png").stat().st_size > 1000
    assert not RewardHackingMonitor(early_stop=False).should_stop


def test_drift_report_is_exact():
    g = torch.Generator().manual_seed(0)
    media = torch.rand(6, 3, 8, 8, generator=g)
    prompts = ["a", "a", "b", "b", "b", "c"]
    ref = torch.rand(5, 3 * 16 * 16, generator=g)
    report = drift_report(media, prompts, reference_features=ref)
    assert report["saturation"] == pytest.approx(float(saturation(media).mean()))
    assert report["brightness"] == pytest.approx(float(brightness(media).mean()))
    assert report["color_entropy"] == pytest.approx(float(color_entropy(media).mean()))
    from visalign.evaluation import thumbnails

    feats = thumbnails(media)
    assert report["diversity"] == pytest.approx(pairwise_diversity(feats))
    expected = (pairwise_diversity(feats[:2]) + pairwise_diversity(feats[2:5])) / 2  # "c" has one sample
    assert report["diversity_within_prompt"] == pytest.approx(expected)
    assert report["fd_to_reference"] == pytest.approx(frechet_distance(feats, ref))
    same = drift_report(media, features=lambda m: m.flatten(1), reference_features=media.flatten(1))
    assert same["fd_to_reference"] == pytest.approx(0.0, abs=1e-6) and "diversity_within_prompt" not in same


def test_within_prompt_diversity_values():
    eye = torch.eye(3)
    assert within_prompt_diversity(torch.stack([eye[0], eye[0], eye[1], eye[2]]), ["x", "x", "y", "y"]) == 0.5
    assert math.isnan(within_prompt_diversity(eye, ["x", "y", "z"]))
    with pytest.raises(ValueError, match="3 feature rows but 2 prompts"):
        within_prompt_diversity(eye, ["x", "y"])
