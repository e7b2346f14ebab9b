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
        train_steps=4,
        batch_size=4,
        eval_every=2,
        eval_n=4,
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
    assert "reward/" + cfg.reward in report["history"][0]
    text = capsys.readouterr().out
    assert "held-in strict accuracy" in text and "visalign compare" in text


def test_the_reward_column_is_named_after_the_reward():
    from apps.demo import reward_name

    assert reward_name(DemoConfig.reward) == "toy-clip"
    assert reward_name("oracle(score=shape)") == "oracle(score=shape)"  # not labelled toy-clip when it is not
