"""`visalign pairs` and `visalign evaluate` on a tiny pipeline with a tiny real reward model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.pairs import make_pairs
from reward_models import build_random_reward
from visalign.data import load_preference_data
from visalign.evaluation import evaluate_variants
from visalign.models import load_model

PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dir):
    return load_model(tiny_pipeline_dir("sd"))


@pytest.fixture(scope="module")
def reward():
    torch.manual_seed(0)
    return build_random_reward("clip", "tiny")


def score_with(reward):
    def score(media, prompts):
        with torch.no_grad():
            return reward(media, prompts).scores

    return score


REFERENCE = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "reference" / "images"


def test_pairs_put_the_best_first_and_keep_rankings(sd, reward, tmp_path):
    stats = make_pairs(
        sd,
        score_with(reward),
        PROMPTS,
        tmp_path,
        per_prompt=3,
        seed=5,
        repeats=2,
        steps=2,
        height=32,
        width=32,
        progress=False,
    )
    assert stats["groups"] == 4 and stats["pairs"] == 4
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    ranks = [json.loads(line) for line in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in ranks] == PROMPTS * 2
    assert all(r["scores"] == sorted(r["scores"], reverse=True) and len(r["candidates"]) == 3 for r in ranks)
    assert sorted(s for r in ranks for s in r["seeds"]) == list(range(5, 17))
    # the chosen image scores as recorded (PNG round trip aside): the data trains as written
    data = load_preference_data(tmp_path)
    item = data[0]
    rescored = reward(item["chosen"][None], [item["prompt"]]).scores.item()
    assert rescored == pytest.approx(rows[0]["score_chosen"], abs=0.05)


@pytest.mark.parametrize("pairing, expected", [("best-worst", 2), ("spread", 3)])
def test_spread_pairs_each_right_candidate_with_a_different_wrong_one(sd, tmp_path, pairing, expected):
    # a 0/1 reward (as oracle(score=position) is): group 0 has 2 right + 2 wrong, group 1 has 3 right + 1 wrong
    fixed = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    stats = make_pairs(
        sd,
        lambda media, prompts: fixed[: len(prompts)],
        PROMPTS,
        tmp_path,
        per_prompt=4,
        seed=0,
        pairing=pairing,
        batch_size=8,
        steps=1,
        height=32,
        width=32,
        progress=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert stats["pairs"] == len(rows) == expected
    assert all(fixed[r["seed_chosen"]] == 1 and fixed[r["seed_rejected"]] == 0 for r in rows)
    seeds = [s for r in rows for s in (r["seed_chosen"], r["seed_rejected"])]
    assert len(set(seeds)) == len(seeds)  # disjoint: no candidate is used twice


def test_evaluate_variants_against_the_base(sd, reward, tmp_path):
    sd.add_lora(rank=2, adapter_name="same")  # B = 0: identical to the base
    sd.add_lora(rank=2, adapter_name="moved")
    with torch.no_grad():
        for p in sd.lora_parameters("moved"):
            p.add_(0.3 * torch.randn_like(p))
    prompts = PROMPTS * 3
    report = evaluate_variants(
        sd,
        {"base": None, "same": "same", "moved": "moved"},
        prompts,
        list(range(6)),
        tmp_path,
        scorers={"clip": score_with(reward)},
        oracle=True,
        steps=2,
        height=32,
        width=32,
    )
    rows = report["variants"]
    assert rows["same"]["win_rate/clip"] == 0.5 and rows["same"]["fd_to_base"] == pytest.approx(0.0, abs=1e-4)
    assert rows["moved"]["fd_to_base"] > 0 and rows["moved"]["reward/clip"] != rows["base"]["reward/clip"]
    for key in (
        "saturation",
        "brightness",
        "color_entropy",
        "diversity",
        "diversity_within_prompt",
        "oracle/all/object_rate",
    ):
        assert key in rows["base"]
    assert (tmp_path / "grid.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["base"] == "base"
    sd.set_adapters(None)


def test_evaluate_videos_writes_a_playing_side_by_side_grid(tiny_pipeline_dir, tmp_path):
    from visalign.media import read_video

    wan = load_model(tiny_pipeline_dir("wan"))
    wan.add_lora(rank=2, adapter_name="moved")
    with torch.no_grad():
        for p in wan.lora_parameters("moved"):
            p.add_(0.5 * torch.randn_like(p))
    prompts = ["a red circle moving left", "a blue square moving up"]
    report = evaluate_variants(wan, {"base": None, "moved": "moved"}, prompts, [0, 1], tmp_path, oracle=True,
                               steps=2, height=32, width=32, num_frames=5)  # fmt: skip
    assert "oracle/all/direction_acc" in report["variants"]["base"]
    grid = read_video(tmp_path / "grid.mp4")  # 5 frames of 2 rows (variants) x 2 columns (seeds), 2 px padding
    assert grid.shape == (5, 3, 2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    first = torch.from_numpy(np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))).movedim(-1, 0) / 255
    assert (grid[0] - first).abs().mean() < 0.03  # frame 0 of the video is the still grid (codec error aside)
    assert (grid[:, :, 2:34] - grid[:, :, 36:68]).abs().mean() > 0.01  # the rows are different variants


def test_evaluate_cli(tiny_pipeline_dir, tmp_path, capsys):
    from apps.cli import main

    model = load_model(tiny_pipeline_dir("sd"))
    model.add_lora(rank=2)
    model.save_lora(tmp_path / "lora")
    rc = main(
        [
            "evaluate",
            "--model",
            str(tiny_pipeline_dir("sd")),
            "--lora",
            str(tmp_path / "lora"),
            "--prompts",
            "a red circle",
            "--oracle",
            "--n",
            "2",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--out",
            str(tmp_path / "eval"),
            "--reference",
            str(REFERENCE),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "base" in out and "lora" in out and "oracle/all/obj" in out
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["variants"]
    assert set(rows) == {"base", "lora"}
    # LoRA B = 0: the same samples, so the same distance to the shapes world's renders (and a positive one)
    assert rows["base"]["fd_to_reference"] == pytest.approx(rows["lora"]["fd_to_reference"])
    assert rows["base"]["fd_to_reference"] > 0


def test_evaluate_reference_of_mixed_sizes_is_refused(tmp_path):
    from apps.evaluate import read_reference
    from visalign.errors import ConfigError
    from visalign.media import save_image

    save_image(torch.rand(3, 8, 8), tmp_path / "a.png")
    save_image(torch.rand(3, 16, 16), tmp_path / "b.png")
    with pytest.raises(ConfigError, match="differ in size"):
        read_reference(str(tmp_path), video=False)
    assert read_reference(str(REFERENCE), video=False).shape == (270, 3, 64, 64)


def test_evaluate_needs_something_to_measure(tiny_pipeline_dir, tmp_path, capsys):
    from apps.cli import main

    rc = main(["evaluate", "--model", str(tiny_pipeline_dir("sd")), "--prompts", "x", "--out", str(tmp_path)])
    assert rc == 2 and "nothing to measure" in capsys.readouterr().err


def test_evaluate_names_each_lora_by_the_path_tail_that_tells_it_apart(tmp_path):
    from apps.evaluate import lora_names

    assert lora_names([str(tmp_path / "run" / "final")]) == ["final"]
    a, b = str(tmp_path / "mapo" / "final"), str(tmp_path / "dpo" / "final")
    assert lora_names([a, b]) == ["mapo/final", "dpo/final"]
    assert lora_names([str(tmp_path / "x" / "base"), a]) == ["x/base", "mapo/final"]  # never the base row's name
    assert len(set(lora_names([a, a]))) == 2  # the same folder twice still gets two rows
