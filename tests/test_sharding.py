"""Sharded runs (FSDP2): what accelerate FSDP and DeepSpeed configs ask for, and two real processes (gloo
on a CPU) that shard the model and still train the weights one unsharded process trains; a resume under sharding
equals the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import assert_same_weights, lora, run_args
from tiny import write_image_pairs
from tiny.launch import ROOT, cli_args, launch

from apps.cli import main
from visalign import sharding
from visalign.errors import ConfigError
from visalign.sharding import Sharding, deepspeed_sharding, fsdp_strategy

pytestmark = pytest.mark.xdist_group("processes")  # one worker runs the multi-process tests, one at a time


def test_fsdp_strategies_as_accelerate_reads_them():
    """FSDP2 reads reshard_after_forward, FSDP1 sharding_strategy (accelerate launch always sets the latter)."""
    assert fsdp_strategy("2", "true", "FULL_SHARD") == fsdp_strategy("1", "false", "FULL_SHARD") == "full_shard"
    assert fsdp_strategy("2", "false", "FULL_SHARD") == fsdp_strategy("1", "true", "SHARD_GRAD_OP") == "shard_grad_op"
    assert fsdp_strategy(None, None, "2") == fsdp_strategy(None, None, "HYBRID_SHARD_ZERO2") == "shard_grad_op"
    assert fsdp_strategy("1", None, "NO_SHARD") == fsdp_strategy("1", None, "3") == "no"
    assert fsdp_strategy("2", None, None) == fsdp_strategy(None, None, "None") == "full_shard"  # the default
    with pytest.raises(ConfigError, match="unknown FSDP sharding strategy 'HALF'"):
        fsdp_strategy("2", "HALF", None)


def test_deepspeed_zero_stages(tmp_path):
    assert deepspeed_sharding(3, None).strategy == "full_shard"
    assert deepspeed_sharding("2", None) == Sharding("shard_grad_op", False, None, "DeepSpeed config (ZeRO-2)")
    assert deepspeed_sharding(1, None).strategy == "shard_grad_op" and deepspeed_sharding(0, None).strategy == "no"
    assert deepspeed_sharding(2, None, offload_optimizer="cpu").offload
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    got = deepspeed_sharding(1, str(file))  # the file wins
    assert (got.strategy, got.offload) == ("full_shard", True) and str(file) in got.source
    with pytest.raises(ConfigError, match="zero stage must be 0-3, got 4"):
        deepspeed_sharding(4, None)
    with pytest.raises(ConfigError, match="cannot read the DeepSpeed config file"):
        deepspeed_sharding(3, str(tmp_path / "missing.json"))


def test_a_launch_config_is_read_once_and_taken_off_the_environment(monkeypatch):
    monkeypatch.setattr(sharding, "_launch", None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BasicTransformerBlock, ResnetBlock2D")
    got = sharding.launch_sharding()
    assert got == Sharding(
        "shard_grad_op", False, ("BasicTransformerBlock", "ResnetBlock2D"), "accelerate FSDP config"
    )
    import os

    assert "ACCELERATE_USE_FSDP" not in os.environ  # accelerate forms a plain data-parallel group
    assert sharding.resolve_sharding(None) == got and sharding.resolve_sharding("full_shard").strategy == "full_shard"
    with pytest.raises(ConfigError, match="sharding must be one of"):
        sharding.resolve_sharding("zero3")
    monkeypatch.setattr(sharding, "_launch", None)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_image_pairs(tmp_path_factory.mktemp("shard-pairs"), 8, ["a red circle", "a blue square"])


def test_fsdp_config_shards_a_lora_run_and_trains_what_one_process_trains(tiny_pipeline_dir, pairs, tmp_path):
    """The shipped FSDP config's variables (full shard) in two processes: each process holds half of every LoRA
    weight, the evaluation samples on both processes, the final export gathers the weights, and they equal the
    one-process run's."""
    model = str(tiny_pipeline_dir("sd"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    evaluation = dict(eval_prompts=prompts, eval_samples=2, eval_steps=2, eval_reward="stats(stat=brightness)")
    one = run_args(model, pairs, tmp_path / "one", tmp_path / "c1", **evaluation)
    assert main(["train", "diffusion-dpo", *cli_args(one)]) == 0
    two = run_args(model, pairs, tmp_path / "two", tmp_path / "c2", batch_size=2, checkpoint_every=2, **evaluation)
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}
    out = launch(2, ["train", "diffusion-dpo", *cli_args(two)], env=env)
    assert "sharding: full_shard (accelerate FSDP config)" in out
    assert_same_weights(lora(tmp_path / "one"), lora(tmp_path / "two"))
    reports = [json.loads((tmp_path / r / "eval" / "step-000003" / "report.json").read_text()) for r in ("one", "two")]
    assert reports[0]["results"] == pytest.approx(reports[1]["results"], abs=1e-5) and reports[0]["results"]
    step = tmp_path / "two" / "checkpoints" / "step-000003"
    assert json.loads((step / "trainer_state.json").read_text())["sharding"] == "full_shard"
    halves = [load_file(str(step / f"trainable-{r}.safetensors")) for r in (0, 1)]
    final = lora(tmp_path / "two")
    for key in halves[0]:  # each process's checkpoint holds its dim-0 slice of every LoRA weight
        torch.testing.assert_close(torch.cat([halves[0][key], halves[1][key]]), final[f"unet.{key}"], rtol=0, atol=0)
        assert halves[0][key].shape[0] < final[f"unet.{key}"].shape[0]
    # a resume under sharding from step 2 ends where the uninterrupted run ended
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    launch(2, ["train", "diffusion-dpo", *cli_args({**two, "output_dir": resumed, "resume_from": "latest"})],
             env=env)  # fmt: skip
    assert_same_weights(lora(tmp_path / "two"), lora(resumed), atol=0)


def test_deepspeed_zero3_config_shards_a_full_finetune(tiny_pipeline_dir, pairs, tmp_path):
    """A DeepSpeed ZeRO-3 config file (as ``accelerate launch`` passes it): the denoiser and its frozen reference
    copy sharded, and the exported pipeline's weights equal the one-process full fine-tune's."""
    model = str(tiny_pipeline_dir("sd"))
    values = dict(full_finetune=True, random_flip=False)  # adam_epsilon=1: updates linear in the gradient
    one = run_args(model, pairs, tmp_path / "one", tmp_path / "c1", **values)
    assert main(["train", "diffusion-dpo", *cli_args(one)]) == 0
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
    two = run_args(model, pairs, tmp_path / "two", tmp_path / "c2", batch_size=2, **values)
    out = launch(2, ["train", "diffusion-dpo", *cli_args(two)], env=env)
    assert f"sharding: full_shard (DeepSpeed config {config} (ZeRO-3))" in out
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    a, b = (load_file(str(tmp_path / run / "final" / weights)) for run in ("one", "two"))
    base = load_file(str(Path(model) / weights))
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-4  # the runs trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow  # the sharding mechanism is the DPO tests'; this adds GRPO's rollouts and monitor on shards
def test_grpo_sharded_trains_what_one_process_trains(tiny_pipeline_dir, tmp_path):
    """Flow-GRPO's rollouts run on every process's shards (``--sharding shard_grad_op``); the end-of-run
    evaluation runs on both processes and the main one writes it."""
    from test_distributed import GRPO_VALUES

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} circle\n" for c in ("red", "green", "blue", "yellow")))
    values = {**GRPO_VALUES, "model": tiny_pipeline_dir("sd"), "prompts": prompts, "eval_prompts": prompts,
              "eval_samples": 2, "eval_steps": 2}  # fmt: skip
    assert main(["train", "grpo", *cli_args({**values, "output_dir": tmp_path / "one"})]) == 0
    two = {**values, "output_dir": tmp_path / "two", "batch_size": 2, "sharding": "shard_grad_op"}
    assert "sharding: shard_grad_op (--sharding)" in launch(2, ["train", "grpo", *cli_args(two)])
    runs = ("one", "two")
    assert_same_weights(*(lora(tmp_path / run) for run in runs), atol=1e-5)
    one, two = (json.loads((tmp_path / run / "eval" / "step-000002" / "report.json").read_text()) for run in runs)
    assert one["results"] == pytest.approx(two["results"], abs=1e-5, nan_ok=True) and len(one["results"]) > 4


@pytest.mark.parametrize(
    "name, strategy", [("fsdp.yaml", "full_shard"), ("deepspeed_zero2.yaml", "shard_grad_op"),
                       ("deepspeed_zero3.yaml", "full_shard"), ("ddp.yaml", "no")]  # fmt: skip
)
def test_shipped_launch_configs(monkeypatch, name, strategy):
    """Each shipped config, through accelerate launch's own parsing and environment, asks for what it says."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "examples" / "accelerate" / name), "x.py"])
    args = _validate_launch_command(args)[0]
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""  # what launch_command sets before this call
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    monkeypatch.setattr(sharding, "_launch", None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sharding.launch_sharding().strategy == strategy and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    monkeypatch.setattr(sharding, "_launch", None)
