"""Bad input gives one clear error each: unknown model, unsupported family, foreign LoRA, xformers on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from visalign.attention import AttentionBackendError
from visalign.errors import VisalignError
from visalign.models import ModelError, load_model


def test_unknown_hub_id_offline():
    with pytest.raises(ModelError, match=r"'nobody/no-such-model' not found.*HF_HUB_OFFLINE"):
        load_model("nobody/no-such-model")


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nothing" / "here")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        load_model(tmp_path)


def test_single_file_is_explained(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"0")
    with pytest.raises(ModelError, match="from_single_file"):
        load_model(f)


def test_unsupported_pipeline_family(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    expected = r"unsupported pipeline family 'KandinskyPipeline'.*supported: .*sd \(StableDiffusionPipeline\)"
    with pytest.raises(ModelError, match=expected):
        load_model(tmp_path)


def test_lora_of_another_family_is_refused(tiny_pipeline_dir, tmp_path):
    sd = load_model(tiny_pipeline_dir("sd"))
    sd.add_lora(rank=2)
    sd.save_lora(tmp_path / "sd-lora")
    flux = load_model(tiny_pipeline_dir("flux"))
    with pytest.raises(ModelError, match="trained for the sd family; this model is flux"):
        flux.load_lora(tmp_path / "sd-lora")
    # without visalign's sidecar file, the key check still refuses it
    (tmp_path / "sd-lora" / "visalign_lora.json").unlink()
    with pytest.raises(ModelError, match="made for another model family"):
        flux.load_lora(tmp_path / "sd-lora")
    assert flux.adapter_names == []


def test_missing_lora(tiny_pipeline_dir, tmp_path):
    model = load_model(tiny_pipeline_dir("sd"))
    with pytest.raises(ModelError, match="LoRA not found"):
        model.load_lora(tmp_path / "no-lora")


def test_save_lora_is_atomic_and_names_the_adapter(tiny_pipeline_dir, tmp_path):
    model = load_model(tiny_pipeline_dir("sd"))
    with pytest.raises(ModelError, match="no LoRA adapter named 'default'"):
        model.save_lora(tmp_path / "lora")
    model.add_lora(rank=2)
    model.save_lora(tmp_path / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "visalign_lora.json",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_xformers_without_cuda(tiny_pipeline_dir):
    with pytest.raises(AttentionBackendError, match="needs a CUDA device.*--attention sdpa"):
        load_model(tiny_pipeline_dir("sd"), attention="xformers")
    assert issubclass(AttentionBackendError, VisalignError)


def test_unknown_attention_backend(tiny_pipeline_dir):
    with pytest.raises(ModelError, match="unknown attention backend 'flash9'"):
        load_model(tiny_pipeline_dir("sd"), attention="flash9")


def test_unknown_dtype(tiny_pipeline_dir):
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        load_model(tiny_pipeline_dir("sd"), dtype="fp8")


def test_set_adapters_none_without_any_adapter_is_the_base(tiny_pipeline_dir):
    model = load_model(tiny_pipeline_dir("sd"))
    model.set_adapters(None)
    assert model.adapter_names == []
