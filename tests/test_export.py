"""``visalign export``: a training checkpoint as the same Diffusers LoRA the run exports at its end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model
from tiny.rewards import Brightness

from apps.export import export_checkpoint
from apps.export import main as export_main
from trainers.base import Trainer
from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from trainers.grpo import GRPO, GRPOConfig
from visalign.config import ConfigError
from visalign.data import PreferenceWriter
from visalign.models import ModelError, load_model

LORA = "pytorch_lora_weights.safetensors"


def same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dpo_run(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    writer = PreferenceWriter(root / "pairs")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        writer.append(["a red circle", "a blue square"][i % 2], torch.rand(3, 32, 32, generator=g),
                      torch.rand(3, 32, 32, generator=g))  # fmt: skip
    cfg = DiffusionDPOConfig(model=str(tiny_pipeline_dir("sd")), data=str(root / "pairs"),
                             output_dir=str(root / "run"), max_steps=3, batch_size=2, learning_rate=1e-2,
                             lora_rank=4, lora_alpha=8, resolution=32, report_to="none", progress=False,
                             checkpoint_every=2, keep_checkpoints=5, cache_dir=str(root / "cache"))  # fmt: skip
    Trainer(DiffusionDPO(cfg)).train()
    return root / "run"


def test_the_last_checkpoint_exports_the_final_lora(dpo_run, tmp_path):
    out = export_main(["--checkpoint", str(dpo_run / "checkpoints" / "step-000003"), "--out", str(tmp_path / "lora")])
    assert same_tensors(out / LORA, dpo_run / "final" / LORA)
    assert "step 3 of" in (out / "README.md").read_text()


def test_an_earlier_checkpoint_differs_and_loads_in_plain_diffusers(dpo_run, tiny_pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    out = export_checkpoint(dpo_run / "checkpoints" / "step-000002", tmp_path / "lora2")
    assert not same_tensors(out / LORA, dpo_run / "final" / LORA)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipeline_dir("sd")))
    pipe.load_lora_weights(str(out))
    saved = load_file(out / LORA)
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert len(loaded) == sum("lora_B" in k for k in saved) > 0
    assert any(p.abs().sum() > 0 for p in loaded.values())  # B moved off zero in two steps


def test_a_checkpoint_is_not_a_lora_and_bad_folders_are_named(dpo_run, tiny_pipeline_dir, tmp_path):
    model = load_model(str(tiny_pipeline_dir("sd")))
    with pytest.raises(ModelError, match="training checkpoint, not a LoRA.*visalign export"):
        model.load_lora(dpo_run / "checkpoints" / "step-000002")
    with pytest.raises(ConfigError, match="not a complete training checkpoint: no trainable.safetensors.*use it"):
        export_checkpoint(dpo_run / "final", tmp_path / "x")
    with pytest.raises(ModelError, match="does not fit this sd3 adapter.*unexpected keys"):  # a UNet's LoRA
        export_checkpoint(dpo_run / "checkpoints" / "step-000002", tmp_path / "x", model=tiny_model("sd3"))
    with pytest.raises(ConfigError, match="is not a folder"):
        export_checkpoint(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_grpo_checkpoint_exports_its_ema_like_the_final_export(tmp_path, prompt_file):
    cfg = GRPOConfig(model="tiny-sd3", reward="test-brightness", prompts=prompt_file, output_dir=str(tmp_path / "run"),
                     max_steps=3, batch_size=2, group_size=2, steps=3, guidance=3.0, resolution=32, lora_rank=4,
                     lora_alpha=4.0, learning_rate=1e-2, report_to="none", progress=False, ema_decay=0.5)  # fmt: skip
    Trainer(GRPO(cfg, model=tiny_model("sd3"), reward=Brightness())).train()
    run = tmp_path / "run"
    out = export_checkpoint(run / "checkpoints" / "step-000003", tmp_path / "lora", model=tiny_model("sd3"))
    assert same_tensors(out / LORA, run / "final" / LORA)
    assert "(EMA weights)" in (out / "README.md").read_text()
    live = load_file(run / "checkpoints" / "step-000003" / "trainable.safetensors")
    exported = load_file(out / LORA)
    b_live = next(v for k, v in live.items() if "lora_B" in k and "/" not in k)
    assert not any(torch.equal(b_live, v) for k, v in exported.items() if "lora_B" in k)  # the EMA, not the live B


def unet_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 4, generator=g)
    cond = model.encode_prompt(["a red circle"])
    with torch.no_grad():
        return model.predict(x, torch.tensor([500.0]), cond)


def test_fuse_folds_the_lora_into_a_pipeline_that_plain_diffusers_loads(dpo_run, tiny_pipeline_dir, tmp_path):
    """``--fuse``: base + LoRA in the weights, no peft layers; the same from a checkpoint and from ``RUN/final``."""
    from diffusers import DiffusionPipeline

    base = str(tiny_pipeline_dir("sd"))
    fused = export_main(["--checkpoint", str(dpo_run / "checkpoints" / "step-000003"), "--fuse",
                         "--out", str(tmp_path / "fused")])  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(str(fused))
    assert not [n for n, _ in pipe.unet.named_parameters() if "lora" in n]
    with_lora = load_model(base)
    with_lora.load_lora(dpo_run / "final")
    expected = unet_output(with_lora)
    with_lora.set_adapters(None)
    plain = unet_output(with_lora)
    got = unet_output(load_model(str(fused)))
    assert (got - expected).abs().max() < 1e-5 < (got - plain).abs().max()
    assert "fused" in (fused / "README.md").read_text()
    again = export_main(["--lora", str(dpo_run / "final"), "--fuse", "--out", str(tmp_path / "fused2")])
    assert same_tensors(again / "unet" / "diffusion_pytorch_model.safetensors",
                        fused / "unet" / "diffusion_pytorch_model.safetensors")  # fmt: skip


def test_fuse_refuses_what_it_cannot_fuse(dpo_run, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match="give one of --checkpoint"):
        export_main(["--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="add --fuse"):
        export_main(["--lora", str(dpo_run / "final"), "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="names the base of --lora"):
        export_main(["--checkpoint", str(dpo_run / "final"), "--model", "m", "--out", str(tmp_path / "x")])
    with pytest.raises(ModelError, match="no LoRA adapter to fuse"):
        load_model(str(tiny_pipeline_dir("sd"))).fuse_lora()
    assert not (tmp_path / "x").exists()


def test_format_kohya_adds_the_a1111_file_that_plain_diffusers_reads_the_same(dpo_run, tiny_pipeline_dir, tmp_path):
    """``--format kohya``: the Diffusers LoRA plus ``lora_kohya.safetensors``; the card names format and base."""
    step = str(dpo_run / "checkpoints" / "step-000003")
    out = export_main(["--checkpoint", step, "--format", "kohya", "--out", str(tmp_path / "k")])
    assert same_tensors(out / LORA, dpo_run / "final" / LORA)
    kohya = load_file(out / "lora_kohya.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # the run's lora_alpha
    card = (out / "README.md").read_text()
    assert "kohya format" in card and "lora_kohya.safetensors" in card and str(tiny_pipeline_dir("sd")) in card
    with_kohya, with_diffusers = load_model(str(tiny_pipeline_dir("sd"))), load_model(str(tiny_pipeline_dir("sd")))
    with_kohya.pipe.load_lora_weights(kohya)  # plain Diffusers' kohya reader
    with_diffusers.load_lora(out)
    assert torch.allclose(unet_output(with_kohya), unet_output(with_diffusers), atol=1e-5)
    converted = export_main(["--lora", str(dpo_run / "final"), "--format", "comfyui", "--out", str(tmp_path / "c")])
    assert same_tensors(converted / "lora_comfyui.safetensors", out / "lora_kohya.safetensors")
    assert "comfyui format" in (converted / "README.md").read_text()
    fused = export_main(["--checkpoint", step, "--fuse", "--format", "kohya", "--out", str(tmp_path / "f")])
    assert same_tensors(fused / "unet" / "diffusion_pytorch_model.safetensors",
                        export_main(["--checkpoint", step, "--fuse", "--out", str(tmp_path / "f2")])
                        / "unet" / "diffusion_pytorch_model.safetensors")  # fmt: skip
    assert "Diffusers layout" in (fused / "README.md").read_text()


def test_format_a_family_lacks_is_refused_before_writing(dpo_run, tmp_path):
    cog = tiny_model("cogvideox")
    cog.add_lora(rank=4)
    cog.save_lora(tmp_path / "cog")
    with pytest.raises(ModelError, match="cogvideox family has no comfyui LoRA layout"):
        export_main(["--lora", str(tmp_path / "cog"), "--format", "comfyui", "--out", str(tmp_path / "x")])
    with pytest.raises(ModelError, match="cogvideox family has no kohya LoRA layout"):
        export_checkpoint(dpo_run / "checkpoints" / "step-000002", tmp_path / "x", model=tiny_model("cogvideox"),
                          fmt="kohya")  # fmt: skip
    with pytest.raises(SystemExit):
        export_main(["--lora", str(tmp_path / "cog"), "--format", "a1111", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
