from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from visalign.config import ConfigError, field, parse_config, save_config


@dataclass
class Demo:
    model: str = field(help="model id")
    lr: float = field(1e-4, help="learning rate")
    steps: int = field(10, help="steps")
    loss: Literal["sigmoid", "ipo"] = field("sigmoid", help="loss")
    lora: str | None = field(None, help="optional")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}; pass --lr 1e-4")


def test_yaml_then_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nlr: 0.5\nsteps: 3\n")
    cfg = parse_config(Demo, ["--config", str(f), "--steps", "7"])
    assert (cfg.model, cfg.lr, cfg.steps, cfg.loss, cfg.lora) == ("m", 0.5, 7, "sigmoid", None)


def test_cli_only_and_types():
    cfg = parse_config(Demo, ["--model", "x", "--lr", "2e-5", "--loss", "ipo", "--lora", "a/b"])
    assert cfg.lr == pytest.approx(2e-5) and isinstance(cfg.lr, float) and cfg.loss == "ipo" and cfg.lora == "a/b"


def test_unknown_yaml_key_names_it_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nstep: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'step'.*did you mean 'steps'"):
        parse_config(Demo, ["--config", str(f)])


def test_unknown_flag_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unrecognised argument\(s\) --stpes 3; did you mean --steps\?"):
        parse_config(Demo, ["--model", "m", "--stpes", "3"])
    with pytest.raises(ConfigError, match="unrecognised argument.*--frobnicate.*see prog --help"):
        parse_config(Demo, ["--model", "m", "--frobnicate"], prog="prog")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(Demo, ["--config", str(tmp_path / "nope.yaml")])


def test_validation_message_says_what_to_change():
    with pytest.raises(ConfigError, match="lr must be > 0.*--lr"):
        parse_config(Demo, ["--model", "x", "--lr", "-1"])


def test_invalid_choice_exits():
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--model", "x", "--loss", "nope"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(Demo, ["--model", "x", "--steps", "4"])
    path = save_config(cfg, tmp_path / "out")
    assert yaml.safe_load(path.read_text()) == {"model": "x", "lr": 1e-4, "steps": 4, "loss": "sigmoid", "lora": None}
    assert parse_config(Demo, ["--config", str(path)]) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_preset_defaults_then_yaml_then_cli(tmp_path):
    preset = {"model": "from-preset", "lr": 0.5, "steps": 7}
    cfg = parse_config(Demo, [], defaults=preset)  # a preset fills required fields too
    assert (cfg.model, cfg.lr, cfg.steps) == ("from-preset", 0.5, 7)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.25}))
    cfg = parse_config(Demo, ["--config", str(path), "--steps", "3"], defaults=preset)
    assert (cfg.model, cfg.lr, cfg.steps) == ("from-preset", 0.25, 3)


def test_train_preset_flag():
    from apps.train import split_preset
    from trainers.grpo import GRPOConfig

    defaults, rest = split_preset("grpo", ["--preset", "toy-flow-clip", "--learning_rate", "1e-4"])
    cfg = parse_config(GRPOConfig, rest, defaults=defaults)
    assert cfg.model == "assets/toyworld/toy-flow" and cfg.learning_rate == 1e-4 and cfg.group_size == 8
    assert split_preset("grpo", ["--preset=toy-flow-clip"])[0]["reward"].startswith("clip(")
    with pytest.raises(ConfigError, match="unknown preset 'nope' for grpo; available: .*toy-flow-clip"):
        split_preset("grpo", ["--preset", "nope"])
    with pytest.raises(ConfigError, match="available: none"):
        split_preset("drl", ["--preset", "x"])
    assert split_preset("drl", ["--lr", "1"]) == ({}, ["--lr", "1"])


def test_paper_preset_takes_the_users_required_values(tmp_path):
    from apps.train import split_preset
    from trainers.grpo import GRPOConfig

    argv = ["--prompts", "p.txt", "--learning_rate", "2e-5"]
    defaults, rest = split_preset("grpo", ["--preset", "flow-grpo-sd3-pickscore", *argv])
    cfg = parse_config(GRPOConfig, rest, defaults=defaults)
    assert cfg.prompts == "p.txt" and cfg.learning_rate == 2e-5 and "stable-diffusion-3" in cfg.model
    with pytest.raises(ConfigError, match="prompts is required"):
        split_preset("grpo", ["--preset", "flow-grpo-sd3-pickscore"])
