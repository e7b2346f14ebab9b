"""A Diffusers-format LoRA in the layouts other UIs load: kohya / A1111 and ComfyUI (see docs/lora_formats.md).

Every export first writes the Diffusers file (``pytorch_lora_weights.safetensors``); :func:`write_lora_format` adds
``lora_<format>.safetensors`` beside it. Only layouts that plain Diffusers also reads back are written, so the
tests load each file through Diffusers' own non-Diffusers readers and compare the pipeline's output:

- ``sd``, ``sdxl``: kohya / A1111 keys (``lora_unet_*`` with ``.lora_down``/``.lora_up`` and an ``.alpha`` per
  module), from Diffusers' ``convert_state_dict_to_kohya`` with the adapter's real alpha. ComfyUI loads the same
  file, so ``comfyui`` writes it too.
- ``wan``: ComfyUI keys (``diffusion_model.<Wan's own module name>.lora_A/lora_B`` and ``.alpha``), the layout
  Diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` reads.
- ``sd3``, ``flux``: ComfyUI maps the Diffusers keys (``transformer.*``) itself; ``comfyui`` writes them unchanged
  as one file. No kohya layout is written for them (see the page above for why).
- ``cogvideox``: no kohya or ComfyUI layout exists; asking for one is an error.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..errors import ModelError
from .lora import lora_file

FORMATS = ("diffusers", "kohya", "comfyui")

# Wan's original module names (what ComfyUI and Wan's own code use) for Diffusers' WanTransformer3DModel names
# inside ``blocks.N``: the inverse of the names Diffusers' non-Diffusers Wan LoRA reader maps.
WAN_ORIGINAL_NAMES = {
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def lora_modules(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` of a Diffusers-format state whose keys start with ``prefix.`` (``unet``...)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix + ".") or ".lora_" not in key:
            raise ModelError(f"LoRA key {key!r} is not a {prefix} LoRA weight: this LoRA is for another family")
        module, part = key[len(prefix) + 1 :].rsplit(".lora_", 1)
        modules.setdefault(module, {})[part.split(".")[0]] = value
    if any(set(ab) != {"A", "B"} for ab in modules.values()) or not modules:
        raise ModelError(f"not a complete LoRA: each {prefix} module needs lora_A and lora_B weights")
    return {m: (ab["A"], ab["B"]) for m, ab in modules.items()}


def lora_scale(module: str, rank: int, config: dict) -> float:
    """The factor peft multiplies ``B @ A`` by for ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def to_kohya(state: dict, prefix: str, config: dict) -> dict[str, torch.Tensor]:
    """kohya / A1111 keys for a UNet LoRA (SD1.5/SD2/SDXL), each module's ``.alpha`` = scale x rank."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    modules = lora_modules(state, prefix)
    out = convert_state_dict_to_kohya(state)  # alphas there are the rank (scale 1); set the adapter's own
    for module, (a, _) in modules.items():
        name = f"lora_unet_{module.replace('.', '_')}"
        if f"{name}.lora_down.weight" not in out:
            raise ModelError(f"no kohya key for {prefix} module {module!r}")
        out[f"{name}.alpha"] = torch.tensor(lora_scale(module, a.shape[0], config) * a.shape[0])
    return out


def to_wan_comfyui(state: dict, prefix: str, config: dict) -> dict[str, torch.Tensor]:
    """ComfyUI keys for a Wan LoRA: ``diffusion_model.blocks.N.<Wan name>.lora_A/lora_B.weight`` and ``.alpha``."""
    out = {}
    for module, (a, b) in lora_modules(state, prefix).items():
        block, _, rest = module.partition(".")[2].partition(".")
        if not module.startswith("blocks.") or rest not in WAN_ORIGINAL_NAMES:
            raise ModelError(f"no ComfyUI name for the Wan module {module!r} (ComfyUI's Wan layout covers attention "
                             f"and ffn of blocks.N: {sorted(WAN_ORIGINAL_NAMES)})")  # fmt: skip
        name = f"diffusion_model.blocks.{block}.{WAN_ORIGINAL_NAMES[rest]}"
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
        out[f"{name}.alpha"] = torch.tensor(lora_scale(module, a.shape[0], config) * a.shape[0])
    return out


def diffusers_keys(state: dict, prefix: str, config: dict) -> dict[str, torch.Tensor]:
    """The Diffusers keys unchanged (ComfyUI maps ``transformer.*`` itself for SD3 and FLUX); alpha baked into B."""
    out = {}
    for module, (a, b) in lora_modules(state, prefix).items():
        out[f"{prefix}.{module}.lora_A.weight"] = a
        out[f"{prefix}.{module}.lora_B.weight"] = b * lora_scale(module, a.shape[0], config)
    return out


# family -> format -> (denoiser key prefix in the Diffusers file, conversion)
LAYOUTS = {
    "sd": {"kohya": ("unet", to_kohya), "comfyui": ("unet", to_kohya)},
    "sdxl": {"kohya": ("unet", to_kohya), "comfyui": ("unet", to_kohya)},
    "sd3": {"comfyui": ("transformer", diffusers_keys)},
    "flux": {"comfyui": ("transformer", diffusers_keys)},
    "wan": {"comfyui": ("transformer", to_wan_comfyui)},
    "cogvideox": {},
}


def formats_of(family: str) -> list[str]:
    """The formats :func:`write_lora_format` writes for ``family``."""
    return ["diffusers", *LAYOUTS.get(family, {})]


def check_format(family: str, fmt: str) -> None:
    """A clear :class:`ModelError` unless :func:`write_lora_format` can write ``fmt`` for ``family``."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown LoRA format {fmt!r}; one of {', '.join(FORMATS)}")
    if family not in LAYOUTS:
        raise ModelError(f"no LoRA layouts known for the {family!r} family; known: {', '.join(LAYOUTS)}")
    if fmt not in formats_of(family):
        has = [f for f, layouts in LAYOUTS.items() if fmt in layouts]
        raise ModelError(f"the {family} family has no {fmt} LoRA layout that Diffusers reads back "
                         f"(formats for {family}: {', '.join(formats_of(family))}; {fmt} exists for "
                         f"{', '.join(has)}); see docs/lora_formats.md")  # fmt: skip


def convert_lora(state: dict[str, torch.Tensor], family: str, fmt: str, config: dict) -> dict[str, torch.Tensor]:
    """A Diffusers-format LoRA state (keys ``unet.*`` / ``transformer.*``) of ``family`` in layout ``fmt``.

    ``config``: the adapter's peft settings (``lora_alpha``, ``alpha_pattern``, ``use_rslora``). Raises
    :class:`ModelError` for a family without that layout, or a state that is not a LoRA of ``family``'s denoiser.
    """
    check_format(family, fmt)
    if fmt == "diffusers":
        return dict(state)
    prefix, convert = LAYOUTS[family][fmt]
    return {k: v.contiguous() for k, v in convert(state, prefix, config).items()}


def read_diffusers_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    """``(tensors, peft settings, family)`` of an exported LoRA folder or file (family from visalign_lora.json)."""
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
    from safetensors.torch import load_file

    path = Path(path)
    file = lora_file(path)
    state = load_file(file)
    metadata = _load_sft_state_dict_metadata(str(file)) or {}
    prefix = next(iter(state)).split(".", 1)[0] if state else ""
    config = {k[len(prefix) + 1 :]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    info = path / "visalign_lora.json" if path.is_dir() else None
    family = json.loads(info.read_text()).get("family") if info is not None and info.exists() else None
    return state, config, family


def write_lora_format(directory: str | os.PathLike, fmt: str, family: str | None = None) -> Path:
    """Write the exported LoRA in ``directory`` as ``lora_<fmt>.safetensors`` beside its Diffusers file.

    Returns the file to give the UI (the Diffusers file itself for ``fmt="diffusers"``). ``family``: the family the
    LoRA is meant for (default: the one its visalign_lora.json names); a LoRA of another family is an error.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    state, config, saved_family = read_diffusers_lora(directory)
    if family and saved_family and family != saved_family:
        raise ModelError(f"LoRA {directory} was trained for the {saved_family} family, not {family}")
    family = family or saved_family
    if family is None:
        raise ModelError(f"{directory} does not name its model family (no visalign_lora.json)")
    converted = convert_lora(state, family, fmt, config)
    if fmt == "diffusers":
        return lora_file(directory)
    out = directory / f"lora_{fmt}.safetensors"
    save_file(converted, str(out), metadata={"format": "pt", "visalign_format": fmt, "visalign_family": family})
    return out
