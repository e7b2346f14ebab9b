"""A shapes-world model samples with its own settings (its toyworld.json) in every command, an explicit flag
still wins, and the metadata and reports record what was used and where the defaults came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.cli import main

TOY_SD = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "toy-sd"
OWN = {"steps": 20, "guidance": 3.0, "height": 64, "width": 64}  # toy-sd's toyworld.json


def recorded(settings: dict) -> dict:
    return {k: settings[k] for k in OWN}


def test_the_model_carries_its_own_defaults(tiny_pipeline_dir):
    from visalign.models import load_model

    toy = load_model(TOY_SD)
    assert recorded(toy.resolve_sampling()) == OWN
    assert toy.resolve_sampling()["defaults_from"].endswith("toyworld.json")
    assert toy.resolve_sampling(steps=5, guidance=1.0)["set_explicitly"] == ["steps", "guidance"]
    tiny = load_model(tiny_pipeline_dir("sd"))  # no toyworld.json: the family's
    assert tiny.resolve_sampling()["defaults_from"] == "family" and tiny.default_steps == type(tiny).default_steps


@pytest.mark.parametrize("flags, expected", [([], OWN), (["--steps", "4", "--guidance", "1.5"],
                                                          {**OWN, "steps": 4, "guidance": 1.5})])
def test_generate(tmp_path, flags, expected):
    assert main(["generate", "--model", str(TOY_SD), "--prompts", "a red circle", "--out", str(tmp_path), *flags]) == 0
    row = json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[0])
    assert recorded(row) == expected and row["defaults_from"].endswith("toyworld.json")
    from PIL import Image

    assert Image.open(tmp_path / "00000.png").size == (64, 64)


def test_pairs_and_evaluate(tmp_path):
    prompts = ["a red circle", "a blue square"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    args = ["--model", str(TOY_SD), "--prompts", str(tmp_path / "p.txt"), "--reward", "stats(stat=brightness)"]
    assert main(["pairs", *args, "--out", str(tmp_path / "pairs"), "--per_prompt", "2", "--steps", "6"]) == 0
    sampling = json.loads((tmp_path / "pairs" / "sampling.json").read_text())
    assert recorded(sampling) == {**OWN, "steps": 6} and sampling["set_explicitly"] == ["steps"]
    assert main(["evaluate", *args, "--out", str(tmp_path / "eval"), "--n", "2"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert recorded(report["sampling"]) == OWN and report["sampling"]["set_explicitly"] == []


def test_training_evaluation_uses_the_models_guidance(tmp_path):
    """Diffusion-DPO's evaluation samples at eval_steps (its own setting) and, unless told, the model's guidance."""
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from visalign.models import load_model

    model = load_model(TOY_SD)
    seen = {}
    original = model.sample

    def sample(*a, **k):
        seen.update(model.resolve_sampling(**k))
        return original(*a, **k)

    model.sample = sample
    (tmp_path / "p.txt").write_text("a red circle\n")
    import torch

    from visalign.data import PreferenceWriter

    writer = PreferenceWriter(tmp_path / "d")
    writer.append("a red circle", torch.rand(3, 64, 64), torch.rand(3, 64, 64))
    writer.append("a blue square", torch.rand(3, 64, 64), torch.rand(3, 64, 64))
    cfg = DiffusionDPOConfig(model=str(TOY_SD), data=str(tmp_path / "d"), output_dir=str(tmp_path / "run"),
                             batch_size=1, max_steps=1, report_to="none", progress=False, eval_prompts=str(
                                 tmp_path / "p.txt"), eval_samples=1, eval_steps=3)  # fmt: skip
    task = DiffusionDPO(cfg, model=model)
    task.evaluate(0, tmp_path / "eval")
    assert seen["steps"] == 3 and seen["guidance"] == 3.0 and seen["height"] == 64
