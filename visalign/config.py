"""Typed dataclass configs: a YAML file plus ``--key value`` overrides, validated, saved beside outputs.

Parsing goes through transformers' ``HfArgumentParser`` (help text from each field's ``metadata["help"]``).
Precedence: field default < ``--config FILE.yaml`` < command-line ``--key value``. Each config validates
derived values in ``__post_init__`` and raises :class:`ConfigError` saying what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field with a one-line help string (shown by ``--help``)."""
    metadata = {"help": help, **kwargs.pop("metadata", {})}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def load_yaml(path: str | os.PathLike, config_cls: type) -> dict[str, Any]:
    """Read a YAML mapping of config values, rejecting keys that ``config_cls`` does not have."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys to values, not {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(config_cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} for {config_cls.__name__}{hint}")
    return data


def parse_config(
    config_cls: type[T],
    argv: list[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> T:
    """Build ``config_cls`` from ``defaults`` (e.g. a preset), then ``--config FILE.yaml``, then ``--key value``
    overrides in ``argv`` (each overrides the one before)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, prog=prog, description=description)
    parser.add_argument("--config", type=str, default=None, help="YAML file of config values (CLI flags override it)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    data = dict(defaults or {})
    if known.config:
        data.update(load_yaml(known.config, config_cls))
    if data:
        parser.set_defaults(**data)
        for action in parser._actions:  # values given by the YAML file are no longer required on the CLI
            if action.dest in data:
                action.required = False
    *outputs, remaining = parser.parse_args_into_dataclasses(argv, look_for_args_file=False,
                                                             return_remaining_strings=True)  # fmt: skip
    if remaining:
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        close = difflib.get_close_matches(flag.split("=")[0], options, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; see {prog or 'the command'} --help"
        raise ConfigError(f"unrecognised argument(s) {' '.join(remaining)}{hint}")
    return outputs[0]


def explicit_values(config_cls: type, argv: list[str]) -> dict[str, Any]:
    """The values ``argv`` sets explicitly (its ``--config`` YAML file, then its flags), typed, unvalidated."""
    from transformers import HfArgumentParser

    unset = object()
    parser = HfArgumentParser(config_cls)
    parser.add_argument("--config", type=str, default=None)
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            action.required, action.default = False, unset
    namespace, _ = parser.parse_known_args(argv)
    values = load_yaml(namespace.config, config_cls) if namespace.config else {}
    values.update({k: v for k, v in vars(namespace).items() if v is not unset and k != "config"})
    return values


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass (or an already plain dict, e.g. a checkpoint's config.yaml) as a dict."""
    return dict(config) if isinstance(config, dict) else dataclasses.asdict(config)


def save_json(obj: Any, path: str | os.PathLike, **dumps_kwargs) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, **dumps_kwargs))
    os.replace(tmp, path)
    return path


def save_config(config: Any, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML into ``directory`` (atomically: never a half-written file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    os.replace(tmp, target)
    return target


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16", "fp64": "float64", "float64": "float64"}  # fmt: skip


def resolve_dtype(dtype, error: type[Exception] = ConfigError):
    """``"bf16"`` / ``"float32"`` / a ``torch.dtype`` / ``None`` -> the ``torch.dtype`` (``None`` stays ``None``).

    Raises ``error`` (a :class:`ConfigError` by default) naming the accepted spellings.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise error(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[dtype])
