"""Bad input to every command fails early with one line that names what to change: no traceback, no model loaded.

Each row is a command line with one mistake and the word its message must contain (the file or option named).
The commands run in-process through :func:`apps.cli.main`, as ``visalign ...`` does; every mistake is caught before
a model or reward loads, so the whole table takes seconds.
"""

from __future__ import annotations

import shlex

import pytest

from apps.cli import COMMANDS, main
from apps.toy import SUBCOMMANDS as TOY_SUBCOMMANDS
from apps.train import ALGORITHMS

M = "--model assets/toyworld/toy-sd"
GEN = f"{M} --prompts 'a red circle' --out TMP/out"  # TMP: a scratch folder holding some.png, an image
RL = f"{M} --prompts 'a red circle'"

# (id, command line, a word its one-line message must contain)
CASES = [
    ("demo-per-prompt", "demo --per_prompt 1 --out TMP/demo", "per_prompt"),
    ("demo-missing-model", "demo --model TMP/no-model --out TMP/demo", "no-model"),
    ("generate-lora-not-a-lora", f"generate {GEN} --lora TMP/some.png", "some.png"),
    ("generate-lora-missing", f"generate {GEN} --lora TMP/no-lora", "no-lora"),
    ("generate-height", f"generate {GEN} --height 12", "height"),
    ("generate-typo", f"generate {GEN} --lorra x", "--lora"),
    ("generate-config-missing", "generate --config TMP/missing.yaml", "missing.yaml"),
    ("train-unknown", "train dpo-xl", "dpo-xl"),
    ("train-unknown-preset", "train diffusion-dpo --preset sd9-pickapic", "sd9-pickapic"),
    ("train-diffusion-dpo", f"train diffusion-dpo {M} --data TMP/pairs --beta 0", "beta"),
    ("train-timestep-segment", f"train timestep-segment {M} --data TMP/pairs", "intervals"),
    ("train-mapo", f"train mapo {M} --data TMP/pairs --loss sigmoid", "mapo"),
    ("train-grpo", f"train grpo {RL} --reward oracle --sampler euler", "sampler"),
    ("train-drl", f"train drl {RL} --real_data toyworld --reward oracle", "--reward"),
    ("train-rwr", f"train rwr {RL} --reward oracle --rwr_scores rank", "rwr_scores"),
    ("train-llm-dpo", "train llm-dpo --model TMP/llm --data TMP/prefs.jsonl --eval_fraction 1.5", "eval_fraction"),
    ("pairs-per-prompt", f"pairs {GEN} --reward oracle --per_prompt 1", "per_prompt"),
    ("pairs-lora", f"pairs {GEN} --reward oracle --lora TMP/some.png", "some.png"),
    ("evaluate-nothing", f"evaluate {GEN}", "--oracle"),
    ("evaluate-lora", f"evaluate {GEN} --lora TMP/some.png", "some.png"),
    ("score-folder", "score --reward oracle --images TMP/no-images --out TMP/s.jsonl", "no-images"),
    ("score-out", "score --reward oracle --images TMP --out TMP/s.csv", "--out"),
    ("serve-reward-port", "serve-reward --reward oracle --port 70000", "port"),
    ("compare-port", "compare --port 99999", "port"),
    ("compare-lora", f"compare {M} --lora TMP/some.png", "some.png"),
    ("export-lora-without-fuse", "export --lora TMP/lora --out TMP/x", "--fuse"),
    ("export-lora-not-a-lora", f"export --lora TMP/some.png --fuse {M} --out TMP/x", "some.png"),
    ("export-checkpoint", "export --checkpoint TMP/some.png --out TMP/x", "some.png"),
    ("toy-render", "toy render --out TMP/r --n 0", "n must be"),
    ("toy-pretrain", "toy pretrain --model toy-sd --out TMP/t --caption_dropout 1", "caption_dropout"),
    ("toy-evaluate", f"toy evaluate {M} --out TMP/t --lora TMP/some.png", "some.png"),
]


@pytest.mark.parametrize("line, word", [pytest.param(line, word, id=name) for name, line, word in CASES])
def test_bad_input_is_one_clear_line(line, word, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the bad input was caught")

    monkeypatch.setattr("visalign.models.load_model", no_model)
    (tmp_path / "some.png").write_bytes(b"\x89PNG\r\n\x1a\n not a LoRA")  # an image where a LoRA belongs
    argv = [arg.replace("TMP", str(tmp_path)) for arg in shlex.split(line)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith(f"visalign {argv[0]}: error: "), err
    assert "Traceback" not in err
    assert word in err, err


def test_the_table_covers_every_command():
    """A new command, train algorithm or toy subcommand needs its row here."""
    commands = [shlex.split(line) for _, line, _ in CASES]
    assert set(COMMANDS) <= {argv[0] for argv in commands}
    assert set(ALGORITHMS) <= {argv[1] for argv in commands if argv[0] == "train"}
    assert set(TOY_SUBCOMMANDS) <= {argv[1] for argv in commands if argv[0] == "toy"}
