"""``visalign export --format kohya|comfyui``: each layout loads through plain Diffusers' own reader for it and
gives the pipeline the same output as the Diffusers-format LoRA; alpha survives; wrong families are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model

from visalign.models import ModelError
from visalign.models.lora_formats import convert_lora, formats_of, read_diffusers_lora, write_lora_format

# (tiny pipeline, format): every layout written, per family; the rest is refused (test_families_without_a_layout)
LAYOUTS = [("sd", "kohya"), ("sd-v", "comfyui"), ("sdxl", "kohya"), ("sd3", "comfyui"), ("flux", "comfyui"),
           ("wan", "comfyui")]  # fmt: skip
KEY_START = {"sd": "lora_unet_", "sd-v": "lora_unet_", "sdxl": "lora_unet_", "sd3": "transformer.",
             "flux": "transformer.", "wan": "diffusion_model.blocks."}  # fmt: skip


def exported_lora(name, directory, rank=4, alpha=8.0, seed=0):
    """A tiny ``name`` model's LoRA with random (non-zero) A and B, saved in Diffusers format to ``directory``."""
    model = tiny_model(name)
    model.add_lora(rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_lora(directory)
    return directory


def pipeline_output(path, lora=None, name="sd"):
    """Two denoising steps of the saved tiny pipeline ``path`` (with ``lora``: a folder or a state dict)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))  # eval mode: no dropout in the text encoders
    if lora is not None:
        pipe.load_lora_weights(lora)
    extra = {"num_frames": 5} if name == "wan" else {}
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0), **extra)  # fmt: skip
    return out[0]


@pytest.mark.parametrize("name,fmt", LAYOUTS)
def test_each_layout_loads_in_plain_diffusers_and_matches_the_diffusers_lora(name, fmt, tiny_pipeline_dir, tmp_path):
    folder = exported_lora(name, tmp_path / "lora")
    file = write_lora_format(folder, fmt)
    assert file == folder / f"lora_{fmt}.safetensors"
    state = load_file(file)
    assert all(k.startswith(KEY_START[name]) for k in state)
    base = tiny_pipeline_dir(name)
    expected = pipeline_output(base, folder, name)
    got = pipeline_output(base, state, name)  # Diffusers' reader for that layout (kohya, ComfyUI Wan, ...)
    plain = pipeline_output(base, None, name)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("alpha", [2.0, 16.0])
def test_alpha_over_rank_round_trips_through_kohya(alpha, tiny_pipeline_dir, tmp_path):
    folder = exported_lora("sd", tmp_path / "lora", rank=4, alpha=alpha)
    state = load_file(write_lora_format(folder, "kohya"))
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    assert len(alphas) == len(downs) > 0 and all(float(v) == alpha for v in alphas.values())
    assert all(state[k].shape[0] == 4 for k in downs)
    original = load_file(folder / "pytorch_lora_weights.safetensors")
    some = next(k for k in original if k.endswith("lora_B.weight"))
    kohya_up = "lora_unet_" + some[len("unet.") : -len(".lora_B.weight")].replace(".", "_") + ".lora_up.weight"
    assert torch.equal(state[kohya_up], original[some])  # weights unscaled; the scale is alpha / rank in the UI
    base = tiny_pipeline_dir("sd")
    assert torch.allclose(pipeline_output(base, state), pipeline_output(base, folder), atol=1e-5)


def test_wan_comfyui_keeps_alpha_and_uses_wans_own_module_names(tmp_path):
    state = load_file(write_lora_format(exported_lora("wan", tmp_path / "lora", alpha=2.0), "comfyui"))
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in state
    assert "diffusion_model.blocks.0.cross_attn.o.lora_B.weight" in state
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {2.0}


def test_families_without_a_layout_and_loras_of_another_family_are_refused(tmp_path):
    assert formats_of("cogvideox") == ["diffusers"]
    cog = exported_lora("cogvideox", tmp_path / "cog")
    for fmt in ("kohya", "comfyui"):
        with pytest.raises(ModelError, match=f"cogvideox family has no {fmt} LoRA layout"):
            write_lora_format(cog, fmt)
    assert write_lora_format(cog, "diffusers") == cog / "pytorch_lora_weights.safetensors"
    wan = exported_lora("wan", tmp_path / "wan")
    with pytest.raises(ModelError, match="wan family has no kohya LoRA layout.*kohya exists for sd, sdxl"):
        write_lora_format(wan, "kohya")
    with pytest.raises(ModelError, match="trained for the wan family, not sdxl"):
        write_lora_format(wan, "kohya", family="sdxl")
    state, config, _ = read_diffusers_lora(wan)
    with pytest.raises(ModelError, match="not a unet LoRA weight: this LoRA is for another family"):
        convert_lora(state, "sdxl", "kohya", config)
    flux, _, _ = read_diffusers_lora(exported_lora("flux", tmp_path / "flux"))
    with pytest.raises(ModelError, match="no ComfyUI name for the Wan module"):
        convert_lora(flux, "wan", "comfyui", config)
    with pytest.raises(ModelError, match="unknown LoRA format 'a1111'"):
        convert_lora(state, "wan", "a1111", config)
    assert not list(tmp_path.glob("*/lora_*.safetensors"))


def test_trainers_write_the_format_with_their_final_export(tiny_pipeline_dir, tmp_path):
    """--lora_format kohya on a training run: RUN/final holds the kohya file beside the Diffusers one, and a format
    the family lacks is refused before any training."""
    from trainers.base import Trainer
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from visalign.data import PreferenceWriter

    writer = PreferenceWriter(tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    for prompt in ("a red circle", "a blue square"):
        writer.append(prompt, torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g))
    kw = dict(data=str(tmp_path / "d"), max_steps=1, batch_size=2, lora_rank=4, resolution=32, report_to="none",
              progress=False, learning_rate=1e-2)  # fmt: skip
    cfg = DiffusionDPOConfig(model=str(tiny_pipeline_dir("sd")), output_dir=str(tmp_path / "run"),
                             lora_format="kohya", **kw)  # fmt: skip
    Trainer(DiffusionDPO(cfg)).train()
    kohya = load_file(str(tmp_path / "run" / "final" / "lora_kohya.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert "lora_kohya.safetensors" in (tmp_path / "run" / "final" / "README.md").read_text()
    with pytest.raises(ModelError, match="the cogvideox family has no kohya LoRA layout"):
        DiffusionDPO(DiffusionDPOConfig(model=str(tiny_pipeline_dir("cogvideox")), output_dir=str(tmp_path / "c"),
                                        lora_format="kohya", **kw))  # fmt: skip
    assert not (tmp_path / "c").exists()
