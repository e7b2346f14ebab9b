"""The shell recipes in examples/shapes_world/ pass options the commands accept.

Each script runs with ``visalign`` and ``python`` on PATH replaced by a recorder of their arguments; every recorded
``visalign`` command is then parsed by the real command's config (its checks in ``__post_init__`` included), so a
renamed flag or a step count the trainer refuses fails here, not 40 minutes into a user's run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "shapes_world"
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""


def recorded_commands(script: str, args: list[str], tmp_path: Path) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("visalign", "python"):
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}
    subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=ROOT, env=env, check=True, timeout=60)
    return [json.loads(line) for line in record.read_text().splitlines()]


def parse(argv: list[str]):
    """The config the real ``visalign`` would build from ``argv`` (raises on an unknown flag or a refused value)."""
    from visalign.config import parse_config

    command, rest = argv[0], argv[1:]
    if command == "train":
        from apps.train import resolve, split_preset

        config_cls, _ = resolve(rest[0])
        defaults, rest = split_preset(rest[0], rest[1:])
        return parse_config(config_cls, rest, defaults=defaults)
    from apps.evaluate import EvaluateConfig
    from apps.pairs import PairsConfig

    return parse_config({"evaluate": EvaluateConfig, "pairs": PairsConfig}[command], rest)


TOY = "assets/toyworld"


@pytest.mark.parametrize(
    "script, model",
    [
        ("grpo_oracle.sh", f"{TOY}/toy-sd"),
        ("flow_grpo_oracle.sh", f"{TOY}/toy-flow"),
    ],
)
def test_grpo_oracle_scripts_run_what_they_say(script, model, tmp_path):
    out = tmp_path / "run"
    commands = recorded_commands(script, [str(out), "50", "3", "--lora_rank", "4"], tmp_path)
    names = [c[0] if c[0] == "python" else " ".join(c[:3] if c[1] == "train" else c[:2]) for c in commands]
    assert names == ["visalign train grpo", "visalign evaluate", "visalign evaluate", "python"]
    train = parse(commands[0][1:])
    assert (train.model, train.reward, train.max_steps, train.seed) == (model, "oracle(score=dense)", 50, 3)
    assert train.lora_rank == 4 and train.lr_scheduler == "cosine" and train.output_dir == str(out)
    assert train.eval_prompts == str(out / "eval_prompts.txt")
    eval_prompts = (out / "eval_prompts.txt").read_text().splitlines()
    assert len(eval_prompts) == 80 + 4 * 10  # held-in once, held-out four times: both splits in every evaluation
    for command, split in zip(commands[1:3], ("held_in", "held_out")):
        evaluate = parse(command[1:])
        assert evaluate.model == model and evaluate.lora == [str(out / "final")] and evaluate.oracle
        assert evaluate.prompts.endswith(f"{split}.txt") and evaluate.seed != train.seed and evaluate.n >= 256
    assert commands[3][1:] == [str(SCRIPTS / "plot_grpo.py"), str(out / "curve.png"), str(out)]


def test_mapo_style_trains_both_methods_on_the_same_pairs_and_steps(tmp_path):
    out = tmp_path / "run"
    commands = recorded_commands("mapo_style.sh", [str(out), "40"], tmp_path)
    names = [" ".join(c[:2]) for c in commands]
    assert names == ["visalign pairs", *["visalign train"] * 2, *["visalign evaluate"] * 2, "python -"]
    pairs = parse(commands[0][1:])
    assert pairs.reward == "stats(stat=saturation)" and pairs.out == str(out / "pairs")
    mapo, dpo = parse(commands[1][1:]), parse(commands[2][1:])
    assert [commands[1][2], commands[2][2]] == ["mapo", "diffusion-dpo"]
    for config in (mapo, dpo):
        assert (config.data, config.max_steps, config.batch_size) == (pairs.out, 40, 16)
    for command in commands[3:5]:
        evaluate = parse(command[1:])
        assert evaluate.lora == [str(out / "mapo" / "final"), str(out / "dpo" / "final")]
        assert evaluate.reward == pairs.reward and evaluate.oracle and evaluate.n >= 256
