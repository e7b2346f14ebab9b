"""``visalign export --checkpoint RUN/checkpoints/step-N --out DIR``: a checkpoint as a Diffusers LoRA (or fused).

A run exports its final adapter to ``RUN/final``; its resumable checkpoints (``trainable.safetensors`` with the
optimizer and RNG states) are not adapters. This turns one of them into the same export: the base model of the
checkpoint's ``config.yaml``, a LoRA of the run's rank, alpha and targets with the checkpoint's weights, saved
in Diffusers format with a model card (and the run's evaluation of that step when it has one). A checkpoint
that keeps an EMA of the weights (GRPO ``--ema_decay``) exports the EMA, as the run's final export does; a full
fine-tune exports the whole pipeline. Then ``visalign evaluate --lora DIR`` compares it with the base.

``--fuse`` folds the LoRA into the base weights and saves the whole pipeline instead: a new base model that plain
Diffusers loads without peft, and the next round of iterative DPO (sample pairs from it, train a new LoRA against
it as the reference). ``--lora DIR --fuse`` does the same for an exported LoRA folder (such as ``RUN/final``).

``--format kohya|comfyui`` adds ``lora_<format>.safetensors`` beside the Diffusers file: the layout A1111-style UIs
or ComfyUI load (docs/lora_formats.md names the file to pick per family); ``--lora DIR --format F`` converts an
exported LoRA folder. With ``--fuse`` the whole pipeline is saved in Diffusers layout whatever the format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visalign.config import field
from visalign.errors import ConfigError

NAMESPACED = "/"  # a trainer's own state (counters, EMA, trackers) is stored under "name/..." keys


@dataclass
class ExportConfig:
    out: str = field(help="folder for the Diffusers-format LoRA (or pipeline: a full fine-tune, or --fuse)")
    checkpoint: str | None = field(None, help="a checkpoint folder: RUN/checkpoints/step-N (trainable.safetensors)")
    lora: str | None = field(None, help="an exported LoRA folder to fuse (with --fuse; instead of --checkpoint)")
    model: str | None = field(None, help="base model of --lora (default: the base its visalign_lora.json names)")
    fuse: bool = field(False, help="fold the LoRA into the base weights and save the whole pipeline (a new base)")
    device: str = field("cpu", help="where to load the base model while exporting")
    dtype: Literal["fp32", "fp16", "bf16"] = field("fp32", help="dtype of the base model while exporting")
    format: Literal["diffusers", "kohya", "comfyui"] = field(
        "diffusers", help="LoRA layout: diffusers; kohya (A1111-style UIs) or comfyui add lora_<format>.safetensors"
    )

    def __post_init__(self):
        if (self.checkpoint is None) == (self.lora is None):
            raise ConfigError("give one of --checkpoint RUN/checkpoints/step-N or --lora DIR (with --fuse)")
        if self.lora is not None and not self.fuse and self.format == "diffusers":
            raise ConfigError(
                f"--lora {self.lora} is already a LoRA; add --fuse to fold it into its base model "
                "(or --format kohya|comfyui to convert it)"
            )
        if self.model is not None and self.lora is None:
            raise ConfigError("--model names the base of --lora; a checkpoint's config.yaml names its own")


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """``(run config, trainer state, tensors)`` of a checkpoint folder; a clear error when it is not one."""
    import yaml
    from safetensors.torch import load_file

    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} is not a folder (expected RUN/checkpoints/step-N)")
    missing = [n for n in ("trainable.safetensors", "trainer_state.json", "config.yaml") if not (path / n).exists()]
    if missing:
        hint = " (a LoRA export: use it directly)" if (path / "pytorch_lora_weights.safetensors").exists() else ""
        raise ConfigError(f"{path} is not a complete training checkpoint: no {', '.join(missing)}{hint}")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if "model" not in config:
        raise ConfigError(f"{path / 'config.yaml'} names no base model ('model')")
    return config, json.loads((path / "trainer_state.json").read_text()), load_file(path / "trainable.safetensors")


def save_pipeline(model, out: Path) -> None:
    """``model``'s whole pipeline to ``out`` in Diffusers format, atomically (a temporary folder beside it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    device: str = "cpu",
    dtype: str = "fp32",
    model=None,
    fuse: bool = False,
    fmt: str = "diffusers",
) -> Path:
    """Write checkpoint ``checkpoint`` as an adapter (or pipeline) to ``out``; returns ``out``.

    ``model``: the base model already loaded, without adapters (default: load the checkpoint's ``model``).
    ``fuse``: fold the LoRA into the base and save the whole pipeline.
    ``fmt``: ``kohya`` or ``comfyui`` add ``lora_<fmt>.safetensors`` beside the Diffusers LoRA (a fused pipeline and
    a full fine-tune are saved in Diffusers layout whatever the format).
    """
    import torch

    from trainers.base import write_model_card
    from visalign.models import load_model
    from visalign.models.lora_formats import check_format, write_lora_format

    checkpoint, out = Path(checkpoint), Path(out)
    config, state, tensors = read_checkpoint(checkpoint)
    model = model or load_model(config["model"], device=device, dtype=dtype)
    if not fuse and not config.get("full_finetune"):
        check_format(model.family, fmt)  # before anything is written
    step, ema = int(state["step"]), []
    if config.get("full_finetune"):
        model.denoiser.load_state_dict(tensors)
        save_pipeline(model, out)
        usage = f'pipe = DiffusionPipeline.from_pretrained("{out}")'
    else:
        params = model.add_lora(rank=int(config.get("lora_rank", 4)), alpha=config.get("lora_alpha"),
                                target_modules=config.get("lora_targets"))  # fmt: skip
        model.load_lora_state_dict({k: v for k, v in tensors.items() if NAMESPACED not in k})
        ema = [k for k in tensors if k.split(NAMESPACED)[-2:-1] == ["ema"]]  # e.g. grpo/ema/0, grpo/ema/1, ...
        ema.sort(key=lambda k: int(k.rsplit(NAMESPACED, 1)[1]))
        if ema:
            if len(ema) != len(params):
                raise ConfigError(f"{checkpoint}: {len(ema)} EMA tensors for {len(params)} LoRA parameters")
            with torch.no_grad():
                for p, key in zip(params, ema):
                    p.copy_(tensors[key])
        if fuse:
            model.fuse_lora()
            save_pipeline(model, out)
            usage = f'pipe = DiffusionPipeline.from_pretrained("{out}")  # base + LoRA, fused'
        else:
            model.save_lora(out)
            usage = f'pipe = DiffusionPipeline.from_pretrained("{config["model"]}")\npipe.load_lora_weights("{out}")'
            if fmt != "diffusers":
                usage += format_usage(write_lora_format(out, fmt), fmt, model.family)
    title = f"step {step} of {checkpoint.parent.parent}" + (" (EMA weights)" if ema else "")
    title += ", fused" if fuse else ""
    if fmt != "diffusers":
        title += " (Diffusers layout: a fused model has no LoRA file)" if fuse else f", {fmt} format"
    report = checkpoint.parent.parent / "eval" / checkpoint.name / "report.json"
    results = json.loads(report.read_text()).get("results", {}) if report.exists() else {}
    write_model_card(
        out,
        title=title,
        base_model=config["model"],
        data=config.get("data") or config.get("prompts"),
        config=config,
        results={k: v for k, v in results.items() if isinstance(v, (int, float))},
        usage="from diffusers import DiffusionPipeline\n" + usage,
    )
    return out


def format_usage(file: Path, fmt: str, family: str) -> str:
    """The model card's lines on the ``fmt`` file written for a ``family`` LoRA."""
    ui = "ComfyUI (LoraLoaderModelOnly)" if fmt == "comfyui" else "A1111-style UIs and ComfyUI"
    return (f"\n# {fmt} format ({family} family): for {ui}, use {file.name} (docs/lora_formats.md);"
            f"\n# in Diffusers: pipe.load_lora_weights(load_file('{file}')) reads it too")  # fmt: skip


def convert_lora_folder(lora: str | Path, out: str | Path, fmt: str) -> Path:
    """The exported LoRA folder ``lora`` copied to ``out`` with ``lora_<fmt>.safetensors`` added; returns ``out``."""
    from visalign.models.lora_formats import check_format, read_diffusers_lora, write_lora_format

    lora, out = Path(lora), Path(out)
    _, _, family = read_diffusers_lora(lora)  # a clear error for what is not an exported LoRA
    if family is None:
        raise ConfigError(f"{lora} does not name its model family (no visalign_lora.json)")
    check_format(family, fmt)
    if not lora.is_dir():
        raise ConfigError(f"--lora {lora} must be an exported LoRA folder (with visalign_lora.json)")
    if out.resolve() != lora.resolve():
        shutil.copytree(lora, out, dirs_exist_ok=True)
    file = write_lora_format(out, fmt)
    card = out / "README.md"
    note = f"\n## {fmt} format\n\nFor {family} in other UIs: `{file.name}` (see visalign's docs/lora_formats.md).\n"
    card.write_text((card.read_text() if card.exists() else "") + note)
    return out


def fuse_lora_folder(lora: str | Path, out: str | Path, model: str | None = None, device: str = "cpu",
                     dtype: str = "fp32") -> Path:  # fmt: skip
    """Fold the exported LoRA ``lora`` into its base (``model``, default: the one ``visalign_lora.json`` names) and
    save the whole pipeline to ``out``; returns ``out``."""
    from trainers.base import write_model_card
    from visalign.models import load_model
    from visalign.models.lora import lora_file

    lora, out = Path(lora), Path(out)
    lora_file(lora)  # a clear error before the model loads
    info = lora / "visalign_lora.json"
    if model is None:
        model = json.loads(info.read_text()).get("base_model") if info.exists() else None
        if not model:
            raise ConfigError(f"{lora} does not name its base model (no visalign_lora.json): pass --model")
    base = load_model(model, device=device, dtype=dtype)
    base.load_lora(lora)
    base.fuse_lora()
    save_pipeline(base, out)
    usage = f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{out}")'
    write_model_card(out, title=f"{model} with {lora} fused", base_model=model, data=None, config={"lora": str(lora)},
                     usage=usage, tags=("visalign", "lora-fused"))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> Path:
    from visalign.config import parse_config

    cfg = parse_config(ExportConfig, argv, prog="visalign export", description=__doc__.split("\n")[0])
    if cfg.lora is not None and not cfg.fuse:
        out = convert_lora_folder(cfg.lora, cfg.out, cfg.format)
    elif cfg.lora is not None:
        out = fuse_lora_folder(cfg.lora, cfg.out, model=cfg.model, device=cfg.device, dtype=cfg.dtype)
    else:
        out = export_checkpoint(cfg.checkpoint, cfg.out, device=cfg.device, dtype=cfg.dtype, fuse=cfg.fuse,
                                fmt=cfg.format)  # fmt: skip
    what = f"--model {out}" if cfg.fuse else f"--model M --lora {out}"
    print(f"visalign export: {cfg.checkpoint or cfg.lora} -> {out} (compare it: visalign evaluate {what} ...)")
    return out
