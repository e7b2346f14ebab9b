"""`visalign demo` end to end at tiny size: pairs -> DPO -> evaluate -> report, every artefact written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.demo import TOY, DemoConfig, run

pytestmark = pytest.mark.skipif(not (TOY / "toy-clip").exists(), reason="needs the shipped toy-clip")


def test_demo_pipeline_on_a_tiny_model(tiny_pipeline_dir, tmp_path, capsys):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        model=str(tiny_pipeline_dir("sd")),
        per_prompt=2,
        repeats=1,
        sample_steps=2,
        eval_steps=2,
        train_steps=4,
        batch_size=4,
        eval_every=2,
        curve_n=4,
        eval_n=4,
        eval_n_held_out=4,
        progress=False,
    )
    summary = run(cfg)
    out = Path(cfg.out)
    for name in (
        "grid.png",
        "curves.png",
        "report.json",
        "config.yaml",
        "lora/pytorch_lora_weights.safetensors",
        "pairs/pairs.jsonl",
        "evaluate/report.json",
    ):
        assert (out / name).exists(), name
    assert summary["pairs"] == 80 and [h["step"] for h in summary["history"]] == [0, 2, 4]
    report = json.loads((out / "report.json").read_text())
    assert set(report["held_in_strict"]) == {"base", "dpo"}
    # the curve's end points are step 3's base and DPO rows (sampled once); the mid-run one is on a subset
    assert [h["n"] for h in report["history"]] == [8, 4, 8]
    assert report["history"][0]["reward/toy-clip"] == report["evaluate"]["base"]["reward/toy-clip"]
    assert report["history"][-1]["oracle/held_in/strict_acc"] == report["held_in_strict"]["dpo"]
    stages = report["stage_seconds"]
    assert list(stages) == ["load", "pairs", "train", "evaluate", "report", "total"]
    assert all(v > 0 for v in stages.values()) and sum(stages.values()) - stages["total"] <= stages["total"]
    assert report["seconds"] == stages["total"]
    text = capsys.readouterr().out
    assert "held-in strict accuracy" in text and "visalign compare" in text
    assert all(f"      {stage}: " in text for stage in ("pairs", "train", "evaluate", "report"))
    assert "time: load " in text and "; total " in text


def test_the_curve_subset_is_half_per_split_and_inside_the_evaluation():
    from apps.demo import evaluation_set

    held_in, held_out = [f"in {i}" for i in range(8)], [f"out {i}" for i in range(2)]
    cfg = DemoConfig(eval_n=10, eval_n_held_out=5, curve_n=6)
    texts, seeds, subset = evaluation_set(cfg, held_in, held_out)
    assert len(texts) == len(seeds) == len(set(seeds)) == 15 and texts[:9] == held_in + held_in[:1]
    assert texts[10:] == held_out + held_out + held_out[:1]
    assert len(subset) == len(set(subset)) == 6
    assert all(i < 10 for i in subset[:3]) and all(10 <= i < 15 for i in subset[3:])
    assert evaluation_set(cfg, held_in, held_out)[2] == subset  # seeded
    small = DemoConfig(eval_n=2, eval_n_held_out=1, curve_n=80)
    assert evaluation_set(small, held_in, held_out)[2] == [0, 1, 2]  # capped at each split's size


def test_the_reward_column_is_named_after_the_reward():
    from apps.demo import reward_name

    assert reward_name(DemoConfig.reward) == "toy-clip"
    assert reward_name("oracle(score=shape)") == "oracle(score=shape)"  # not labelled toy-clip when it is not


def test_threads_are_the_requested_ones_or_the_idle_cores(monkeypatch):
    import torch

    import apps.demo as demo

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert demo.cpu_threads(3) == 3
    monkeypatch.setattr(demo, "idle_cores", lambda: 1.9)
    assert demo.cpu_threads() == 2  # an idle 2-core machine: both cores
    monkeypatch.setattr(demo, "idle_cores", lambda: 1.1)
    assert demo.cpu_threads() == 1  # a core busy elsewhere: one thread, not two taking turns on one core
    monkeypatch.setattr(demo, "idle_cores", lambda: 0.0)
    assert demo.cpu_threads() == 1
    monkeypatch.setattr(demo, "idle_cores", lambda: None)
    assert demo.cpu_threads() == 2  # no /proc/stat: torch's default
    monkeypatch.setattr(demo, "idle_cores", lambda: 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert demo.cpu_threads() == 2  # an explicit OMP_NUM_THREADS wins


def test_idle_cores_reads_the_machine():
    import os

    from apps.demo import idle_cores

    idle = idle_cores(0.05)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6
