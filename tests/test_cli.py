"""The ``visalign`` command: lazy start-up, one-line user errors, --debug tracebacks, generate end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny import VIDEO

from apps.cli import COMMANDS, main


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, apps.cli; apps.cli.build_parser().format_help();"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"visalign {command}" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "missing-model"), "--prompts", "a cat", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "missing-model" in err and "not found" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="not found"):
        main(["--debug", "generate", "--model", str(tmp_path / "nope"), "--prompts", "x", "--out", str(tmp_path)])


def test_missing_prompt_file_is_named(tiny_pipeline_dir, tmp_path, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_pipeline_dir("sd")),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "prompt file not found" in err and "prompts.txt" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_generate_writes_media_metadata_and_config(tiny_pipeline_dir, tmp_path, name):
    from apps.generate import GenerateConfig, run
    from visalign.media import read_video

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    extra = {"num_frames": 5, "video_format": "gif"} if name in VIDEO else {}
    cfg = GenerateConfig(
        model=str(tiny_pipeline_dir(name)),
        prompts=str(prompts),
        out=str(tmp_path / "out"),
        seed=7,
        num_per_prompt=2,
        steps=2,
        height=32,
        width=32,
        batch_size=3,
        **extra,
    )
    out = run(cfg)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["seed"] for r in rows] == [7, 8, 9, 10]
    assert all(r["steps"] == 2 and r["model"] == cfg.model for r in rows)
    assert (out / "config.yaml").exists()
    if name in VIDEO:
        video = read_video(out / rows[0]["file"])
        assert video.shape == (5, 3, 32, 32)
    else:
        from PIL import Image

        assert Image.open(out / rows[3]["file"]).size == (32, 32)
    # a sample is reproducible alone from its seed, whatever the batching
    alone = GenerateConfig(
        model=cfg.model,
        prompts="a blue square",
        out=str(tmp_path / "alone"),
        seed=10,
        steps=2,
        height=32,
        width=32,
        **extra,
    )
    run(alone)
    if name in VIDEO:
        torch.testing.assert_close(read_video(tmp_path / "alone" / "00000.gif"), read_video(out / rows[3]["file"]))
    else:
        a = torch.tensor(list(Image.open(tmp_path / "alone" / "00000.png").getdata()))
        b = torch.tensor(list(Image.open(out / rows[3]["file"]).getdata()))
        assert torch.equal(a, b)
