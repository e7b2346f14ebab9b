"""``visalign score`` end to end: shapes-world images and videos scored by the oracle and by a tiny CLIP folder,
prompt files in every accepted form, the CSV summary and histogram, and one clear error per bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from apps.score import ScoreConfig, main, run
from visalign.errors import ConfigError, VisalignError

CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle on the top", "a yellow circle"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from visalign.media import save_image
    from visalign.toyworld import render_images

    folder = tmp_path_factory.mktemp("images")
    images, _ = render_images(CAPTIONS, seed=0)
    for i, image in enumerate(images):
        save_image(image, folder / f"{i:05d}.png")
    # the metadata.jsonl of `visalign generate`: file + prompt (one caption deliberately wrong)
    prompts = CAPTIONS[:3] + ["a purple square"]
    rows = [{"file": f"{i:05d}.png", "prompt": p, "seed": i} for i, p in enumerate(prompts)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    return folder


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_images_with_the_oracle(image_dir, tmp_path, capsys):
    out = tmp_path / "res" / "oracle.jsonl"
    main(["--reward", "oracle", "--images", str(image_dir), "--out", str(out), "--batch_size", "3"])
    rows = _rows(out)
    # prompts matched by file name (metadata.jsonl is in reverse order), scores in file order
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(4)]
    assert [r["score"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    assert rows[3]["prompt"] == "a purple square" and rows[3]["components"]["shape_ok"] == 0.0
    assert rows[0]["components"]["position_ok"] is None  # NaN (no position named) is written as null
    with open(tmp_path / "res" / "oracle.summary.csv") as f:
        summary = {r["metric"]: r for r in csv.DictReader(f)}
    assert float(summary["score"]["mean"]) == 0.75 and summary["score"]["n_valid"] == "4"
    assert float(summary["object"]["mean"]) == 1.0 and float(summary["color_ok"]["mean"]) == 0.75
    hist = Image.open(tmp_path / "res" / "oracle.hist.png")
    assert hist.size == (640, 400)
    assert (tmp_path / "res" / "oracle.config.yaml").read_text().startswith("reward: oracle")
    assert "scored 4 files (4 valid), mean 0.75" in capsys.readouterr().out


def test_prompt_file_forms(image_dir, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(CAPTIONS) + "\n")
    run(ScoreConfig(reward="oracle", images=str(image_dir), prompts=str(txt), out=str(tmp_path / "a.jsonl")))
    assert [r["score"] for r in _rows(tmp_path / "a.jsonl")] == [1.0] * 4
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CAPTIONS))
    run(ScoreConfig(reward="oracle", images=str(image_dir), prompts=str(jsonl), out=str(tmp_path / "b.jsonl")))
    assert [r["score"] for r in _rows(tmp_path / "b.jsonl")] == [1.0] * 4
    run(ScoreConfig(reward="oracle", images=str(image_dir), prompts="a red circle", out=str(tmp_path / "c.jsonl")))
    assert [r["score"] for r in _rows(tmp_path / "c.jsonl")] == [1.0, 0.0, 0.0, 0.0]


def test_score_videos_with_an_image_reward_from_a_folder(tmp_path):
    """An open_clip folder (the toy-clip layout) scores GIFs frame by frame through the video adapter."""
    import open_clip
    from safetensors.torch import save_file

    from reward_models.encoders import TINY_OPEN_CLIP
    from visalign.media import save_video
    from visalign.toyworld import render_videos

    clip_dir = tmp_path / "tiny-clip"
    clip_dir.mkdir()
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, clip_dir / "open_clip_model.safetensors")
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    captions = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]
    videos, _ = render_videos(captions, seed=0)
    video_dir = tmp_path / "videos"
    for i, v in enumerate(videos):
        save_video(v, video_dir / f"{i:03d}.gif")
    (tmp_path / "p.txt").write_text("\n".join(captions))
    out = tmp_path / "v.jsonl"
    main(
        [
            "--reward",
            f"clip(model={clip_dir})",
            "--videos",
            str(video_dir),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--out",
            str(out),
            "--frames",
            "3",
            "--reduce",
            "min",
        ]
    )
    rows = _rows(out)
    assert len(rows) == 3 and all(-1 <= r["score"] <= 1 for r in rows)

    from reward_models import build_reward
    from reward_models.video import VideoReward
    from visalign.media import read_video

    ref = VideoReward(build_reward(f"clip(model={clip_dir})"), 3, "min")(
        torch.stack([read_video(video_dir / f"{i:03d}.gif") for i in range(3)]), captions
    ).scores
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), ref, rtol=1e-5, atol=1e-6)

    main(
        [
            "--reward",
            "oracle",
            "--videos",
            str(video_dir),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--out",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert [r["score"] for r in _rows(tmp_path / "o.jsonl")] == [1.0, 1.0, 1.0]


def test_corrupt_image_file_is_named(image_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("00000.png", "00001.png"):
        (folder / name).write_bytes((image_dir / name).read_bytes())
    (folder / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "p.txt").write_text("a\nb\nc\n")
    out = tmp_path / "x.jsonl"
    with pytest.raises(VisalignError, match=r"cannot read image .*00002.png"):
        run(ScoreConfig(reward="oracle", images=str(folder), prompts=str(folder / "p.txt"), out=str(out)))
    assert not out.exists()


def test_cli_errors_are_one_line(image_dir, tmp_path, capsys, monkeypatch):
    from apps.cli import COMMANDS
    from apps.cli import main as cli

    monkeypatch.setitem(COMMANDS, "score", ("apps.score", "score media with a reward"))  # as apps/cli.py registers it
    rc = cli(["score", "--reward", "hps-v3", "--images", str(image_dir), "--out", str(tmp_path / "s.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown reward 'hps-v3'" in err and "oracle" in err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": None}, "exactly one of --images DIR or --videos DIR"),
        ({"videos": "x"}, "exactly one of"),
        ({"out": "scores.csv"}, "must be a .jsonl"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_config_errors(image_dir, kwargs, match):
    base = {"reward": "oracle", "images": str(image_dir), "out": "s.jsonl"}
    with pytest.raises(ConfigError, match=match):
        ScoreConfig(**{**base, **kwargs})


def test_input_errors(image_dir, tmp_path):
    def score(**kw):
        run(ScoreConfig(**{"reward": "oracle", "images": str(image_dir), "out": str(tmp_path / "s.jsonl"), **kw}))

    with pytest.raises(ConfigError, match="media folder not found"):
        score(images=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds no media files"):
        score(images=str(tmp_path))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ConfigError, match="holds 3 prompts for 4 media files"):
        score(prompts=str(tmp_path / "three.txt"))
    with pytest.raises(ConfigError, match="prompt file not found"):
        score(prompts=str(tmp_path / "missing.jsonl"))
    (tmp_path / "partial.jsonl").write_text(json.dumps({"file": "00000.png", "prompt": "a red circle"}) + "\n")
    with pytest.raises(ConfigError, match="no prompt for 3 file"):
        score(prompts=str(tmp_path / "partial.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not valid JSON"):
        score(prompts=str(tmp_path / "bad.jsonl"))
