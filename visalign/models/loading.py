"""Load a Diffusers pipeline from a hub id or a local folder and wrap it by family."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import config
from .base import FAMILIES, DiffusionModel, ModelError


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return config.resolve_dtype(dtype, ModelError)


def read_model_index(name_or_path: str | os.PathLike, revision: str | None = None) -> dict:
    """The pipeline's ``model_index.json``, from a local folder or (one small file) from the Hub."""
    path = Path(name_or_path)
    if path.exists():
        if path.is_file():
            raise ModelError(
                f"{path} is a file; visalign loads Diffusers pipeline folders (with model_index.json) or hub ids. "
                "Convert a single-file checkpoint first with the pipeline's from_single_file(...).save_pretrained(dir)"
            )
        index = path / "model_index.json"
        if not index.exists():
            raise ModelError(f"{path} is not a Diffusers pipeline folder: it has no model_index.json")
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        file = hf_hub_download(str(name_or_path), "model_index.json", revision=revision)
    except HFValidationError as e:
        raise ModelError(
            f"model {name_or_path!r} not found: no local folder of that name, and not a valid hub id"
        ) from e
    except Exception as e:  # offline, unknown repo, gated repo: all mean "cannot resolve this id"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ModelError(
            f"model {name_or_path!r} not found: no local folder of that name and the Hub could not resolve it{hint}"
        ) from e
    return json.loads(Path(file).read_text())


def family_for(model_index: dict, source: str) -> type[DiffusionModel]:
    cls_name = model_index.get("_class_name", "")
    for family in FAMILIES.values():
        if cls_name in family.pipeline_classes:
            return family
    supported = ", ".join(f"{f.family} ({'/'.join(f.pipeline_classes)})" for f in FAMILIES.values())
    raise ModelError(f"unsupported pipeline family {cls_name or '<none>'!r} in {source}; supported: {supported}")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    variant: str | None = None,
    attention: str = "sdpa",
    **pipeline_kwargs,
) -> DiffusionModel:
    """Load a pipeline (hub id or local folder) and wrap it as its family's :class:`DiffusionModel`.

    Args:
        name_or_path: e.g. ``"stabilityai/stable-diffusion-xl-base-1.0"`` or ``"assets/toyworld/toy-sd"``.
        device, dtype: where and in what precision the frozen weights live (LoRA params stay fp32).
        revision, variant: passed to ``DiffusionPipeline.from_pretrained`` (``variant="fp16"`` for fp16 files).
        attention: ``"sdpa"`` (default), one SDPA kernel (``"sdpa-flash"``, ``"sdpa-efficient"``, ``"sdpa-cudnn"``,
            ``"sdpa-math"``) or ``"xformers"``.
        pipeline_kwargs: component overrides, e.g. ``text_encoder_3=None`` to drop SD3's T5.
    """
    from diffusers import DiffusionPipeline

    source = str(name_or_path)
    index = read_model_index(name_or_path, revision=revision)
    family = family_for(index, source)
    torch_dtype = resolve_dtype(dtype)
    kwargs = {**family.load_kwargs(index), **pipeline_kwargs}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, dtype=torch_dtype, revision=revision, variant=variant, **kwargs
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the {family.family} pipeline from {source}: {e}") from e
    model = family(pipe, device=device, dtype=torch_dtype)
    model.source = source
    model.set_attention(attention)
    from visalign.toyworld import sampling_defaults

    model.apply_sampling_defaults(sampling_defaults(source), f"{source}/toyworld.json")
    return model
