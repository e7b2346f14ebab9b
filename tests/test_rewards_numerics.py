"""Numerics of the scorers against the reference pipelines, on the same tiny random weights.

* HPS preprocessing equals HPSv2's transform (ToTensor -> ResizeMaxSize -> Normalize, copied below from
  ``hpsv2/src/open_clip/transform.py``) on constructed non-square images, and HPS scores equal HPSv2's formula.
* ``clip`` equals open_clip's own ``create_model_and_transforms`` pipeline (by name + weights file, and from an
  open_clip folder such as ``toy-clip``) and a direct transformers ``CLIPModel`` + ``CLIPProcessor`` pipeline.
* ``pickscore`` equals ``logit_scale.exp() * cos`` computed with transformers' ``CLIPImageProcessor``.
* ``aesthetic`` and ``imagereward`` load checkpoints in the original key layout and equal functional
  re-implementations of the original forward passes (LAION MLP; BLIP ViT + BERT cross-attention + MLP).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reward_models import build_reward
from reward_models.encoders import TINY_OPEN_CLIP, HFCLIPTower, OpenCLIPTower
from reward_models.preprocess import OPENAI_MEAN, OPENAI_STD

PROMPTS = ["a red circle on the left", "a blue square"]


def _uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------- HPS
class HPSv2ResizeMaxSize(torch.nn.Module):
    """``ResizeMaxSize`` of hpsv2/src/open_clip/transform.py (tensor input, as HPSv2 applies it after ToTensor)."""

    def __init__(self, max_size, fill=0):
        super().__init__()
        self.max_size = max_size
        self.fill = fill

    def forward(self, img):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tvF

        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = tvF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
            img = tvF.pad(img, padding=padding, fill=self.fill)
        return img


def hpsv2_preprocess(size: int):
    """HPSv2's ``image_transform(size, is_train=False, resize_longest_max=True)`` (PIL image in)."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    return Compose(
        [lambda im: im.convert("RGB"), ToTensor(), HPSv2ResizeMaxSize(size), Normalize(OPENAI_MEAN, OPENAI_STD)]
    )


@pytest.mark.parametrize("hw", [(300, 200), (150, 231), (97, 225), (512, 301), (64, 64)])
def test_hps_preprocessing_equals_hpsv2(hw):
    from PIL import Image

    from reward_models.hps import hps_transform

    array = _uint8_images(1, *hw)[0]
    ref = hpsv2_preprocess(224)(Image.fromarray(array.numpy()))
    ours = hps_transform(224)(array.permute(2, 0, 1)[None].float() / 255)[0]
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the padding is black before normalisation, on the short side only, centred
    h, w = hw
    black = ((torch.zeros(3) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)).view(3, 1, 1)
    if w < h:
        new_w = round(w * 224 / h)
        left = (224 - new_w) // 2
        assert torch.allclose(ours[:, :, :left], black.expand(3, 224, left))


def test_hps_without_antialias_reproduces_old_torchvision(monkeypatch):
    """torchvision < 0.17 did not antialias tensor resizes; HPSv2 was trained and benchmarked that way."""
    from PIL import Image
    from torchvision.transforms import functional as tvF

    from reward_models.hps import hps_transform

    resize = tvF.resize
    monkeypatch.setattr(tvF, "resize", lambda img, size, mode: resize(img, size, mode, antialias=False))
    array = _uint8_images(1, 512, 301)[0]
    ref = hpsv2_preprocess(224)(Image.fromarray(array.numpy()))
    monkeypatch.setattr(tvF, "resize", resize)
    ours = hps_transform(224, antialias=False)(array.permute(2, 0, 1)[None].float() / 255)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert (hps_transform(224)(array.permute(2, 0, 1)[None].float() / 255)[0] - ref).abs().max() > 0.05


def test_hps_pads_when_the_longest_side_is_already_224():
    """HPSv2 skips resize and pad here and returns a non-square tensor its ViT rejects; we pad like any other."""
    from PIL import Image

    from reward_models.hps import hps_transform

    array = _uint8_images(1, 97, 224)[0]
    ref = hpsv2_preprocess(224)(Image.fromarray(array.numpy()))
    assert ref.shape == (3, 97, 224)
    ours = hps_transform(224)(array.permute(2, 0, 1)[None].float() / 255)[0]
    top = (224 - 97) // 2
    torch.testing.assert_close(ours[:, top : top + 97], ref, rtol=0, atol=1e-6)


def test_hps_score_equals_hpsv2_formula():
    from PIL import Image

    from reward_models.hps import random_hps

    reward = random_hps("tiny")
    arrays = _uint8_images(2, 45, 30)
    media = arrays.permute(0, 3, 1, 2).float() / 255
    model, tokenizer = reward.tower.model, reward.tower.tokenizer
    with torch.no_grad():
        images = torch.stack([hpsv2_preprocess(32)(Image.fromarray(a.numpy())) for a in arrays])
        out = model(images, tokenizer(PROMPTS))  # open_clip CLIP forward: normalised features
        image_features, text_features = out[0], out[1]
        ref = torch.diagonal(image_features @ text_features.T)
    torch.testing.assert_close(reward(media, PROMPTS).scores, ref, rtol=1e-5, atol=1e-5)


def test_hps_loads_its_checkpoint_layout(tmp_path, monkeypatch):
    """A whole-model state dict under "state_dict", as HPS_v2.1_compressed.pt; the reward reproduces the model."""
    import open_clip

    from reward_models import hps

    tower = OpenCLIPTower.random("tiny", seed=3)
    folder = tmp_path / "xswu-HPSv2"
    folder.mkdir()
    torch.save({"state_dict": tower.model.state_dict()}, folder / hps.HPS_FILES["v2.1"])
    monkeypatch.setattr(hps, "HPS_ARCH", "visalign-tiny-hps")
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "visalign-tiny-hps.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config_dir)
    reward = build_reward("hps-v2.1", checkpoint=str(folder))
    assert reward.spec.name == "hps-v2.1" and reward.version == "v2.1"
    for a, b in zip(reward.tower.model.state_dict().values(), tower.model.state_dict().values()):
        assert torch.equal(a, b)
    media = torch.rand(2, 3, 32, 32)
    ref = hps.HPSReward(tower, "v2.1")(media, PROMPTS).scores
    torch.testing.assert_close(reward(media, PROMPTS).scores, ref)


# ----------------------------------------------------------------------------------------------- clip (open_clip)
@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """A tiny open_clip config registered by name + its weights file, and the same model as an open_clip folder."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open-clip")
    (root / "visalign-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(root / "visalign-tiny-clip.json")
    torch.manual_seed(1)
    model = open_clip.create_model("visalign-tiny-clip", pretrained=None)
    weights = root / "weights.pt"
    torch.save(model.state_dict(), weights)
    folder = root / "folder"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    preprocess = {"size": 32, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "resize_mode": "shortest"}
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return weights, folder


def _open_clip_reference(model_name: str, pretrained: str | None, media: torch.Tensor, prompts, hessel=False):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    with torch.no_grad():
        images = torch.stack([preprocess(m) for m in media])  # torchvision transforms on [3, H, W] tensors
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    cos = (img * txt).sum(-1)
    return 2.5 * cos.clamp(min=0) if hessel else cos


def test_clip_open_clip_by_name_and_file_equals_open_clip(open_clip_files):
    weights, _ = open_clip_files
    media = torch.rand(2, 3, 41, 56, generator=torch.Generator().manual_seed(0))
    reward = build_reward(f"clip(model=visalign-tiny-clip,pretrained={weights})")
    ref = _open_clip_reference("visalign-tiny-clip", str(weights), media, PROMPTS)
    torch.testing.assert_close(reward(media, PROMPTS).scores, ref, rtol=1e-5, atol=1e-6)

    hessel = build_reward(f"clip(model=visalign-tiny-clip,pretrained={weights},hessel=true)")
    out = hessel(media, PROMPTS)
    torch.testing.assert_close(out.scores, 2.5 * ref.clamp(min=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.components["cosine"], ref, rtol=1e-5, atol=1e-6)


def test_clip_open_clip_folder_equals_open_clip(open_clip_files):
    """The layout of the shipped toy-clip: open_clip_config.json + open_clip_model.safetensors."""
    _, folder = open_clip_files
    media = torch.rand(2, 3, 48, 32, generator=torch.Generator().manual_seed(1))
    reward = build_reward("clip", model=str(folder))
    ref = _open_clip_reference(f"local-dir:{folder}", None, media, PROMPTS)
    torch.testing.assert_close(reward(media, PROMPTS).scores, ref, rtol=1e-5, atol=1e-6)


TOY_CLIP = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "toy-clip"


@pytest.mark.skipif(not (TOY_CLIP / "open_clip_config.json").is_file(), reason="assets/toyworld/toy-clip not built")
def test_clip_loads_the_shipped_toy_clip():
    from visalign.toyworld import render_images

    media, _ = render_images(["a red circle", "a blue square"], seed=0)
    reward = build_reward("clip", model=str(TOY_CLIP))
    ref = _open_clip_reference(f"local-dir:{TOY_CLIP}", None, media, ["a red circle", "a blue square"])
    torch.testing.assert_close(reward(media, ["a red circle", "a blue square"]).scores, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- transformers CLIP
@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("hf-clip")
    tower = HFCLIPTower.random("tiny", seed=2)
    tower.model.save_pretrained(folder)
    tower.tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _hf_reference(folder, media, prompts, logit_scale: bool):
    from transformers import CLIPImageProcessor, CLIPModel

    from visalign.offline_tokenizers import clip_tokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokens = clip_tokenizer()(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        # float input in [0, 1], no rescale: the processor's torchvision resize/crop/normalise on our exact pixels
        pixels = processor(images=list(media), do_rescale=False, return_tensors="pt").pixel_values
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    return model.logit_scale.exp() * cos if logit_scale else cos


def test_clip_transformers_equals_direct_computation(hf_clip_dir):
    media = torch.rand(2, 3, 45, 38, generator=torch.Generator().manual_seed(2))
    reward = build_reward("clip", model=str(hf_clip_dir))
    assert type(reward.tower).__name__ == "HFCLIPTower"
    ref = _hf_reference(hf_clip_dir, media, PROMPTS, logit_scale=False)
    torch.testing.assert_close(reward(media, PROMPTS).scores, ref, rtol=1e-5, atol=1e-6)


def test_pickscore_equals_direct_transformers_computation(hf_clip_dir):
    media = torch.rand(3, 3, 37, 50, generator=torch.Generator().manual_seed(3))
    prompts = PROMPTS + ["a green triangle moving up " * 20]  # longer than 77 tokens: truncated
    reward = build_reward(f"pickscore(model={hf_clip_dir})")
    out = reward(media, prompts)
    ref = _hf_reference(hf_clip_dir, media, prompts, logit_scale=True)
    torch.testing.assert_close(out.scores, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores, reward.tower.model.logit_scale.exp() * out.components["cosine"])


@pytest.mark.parametrize("processor_name", ["BitImageProcessor", "ViTImageProcessor"])
def test_transforms_of_transformers_processors_equal_the_processors(processor_name):
    """DINOv2's convention (shortest side 256, crop 224, ImageNet stats) and a fixed-size ViT processor."""
    import transformers

    from reward_models.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

    kwargs = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True}
    if processor_name == "ViTImageProcessor":
        kwargs = {"size": {"height": 32, "width": 32}}
    processor = getattr(transformers, processor_name)(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **kwargs)
    media = torch.rand(2, 3, 57, 45, generator=torch.Generator().manual_seed(7))
    ref = processor(images=list(media), do_rescale=False, return_tensors="pt").pixel_values
    torch.testing.assert_close(ImageTransform.from_hf_processor(processor)(media), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- aesthetic
def test_aesthetic_loads_original_weights_and_equals_reference(open_clip_files, tmp_path):
    import numpy as np
    import open_clip

    _, folder = open_clip_files
    torch.manual_seed(4)
    # the original module: layers.{0,2,4,6,7} with dropouts between (improved-aesthetic-predictor)
    original = torch.nn.Sequential(
        torch.nn.Linear(16, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in original.state_dict().items()}, path)
    reward = build_reward(f"aesthetic(checkpoint={path},clip_model={folder})")

    media = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(5))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    with torch.no_grad():
        emb = model.eval().encode_image(torch.stack([preprocess(m) for m in media])).numpy()
        emb = emb / np.linalg.norm(emb, 2, axis=-1, keepdims=True)  # the original's normalized()
        ref = original(torch.from_numpy(emb)).squeeze(-1)
    torch.testing.assert_close(reward(media).scores, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- imagereward
TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def _original_imagereward_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the key layout of ImageReward.pt (BLIP ViT + med BERT + MLP + unused projections)."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    d, dt, ff, L = 32, 32, 64, 2
    v = "blip.visual_encoder."
    s = {
        v + "cls_token": t(1, 1, d),
        v + "pos_embed": t(1, 17, d),
        v + "patch_embed.proj.weight": t(d, 3, 8, 8),
        v + "patch_embed.proj.bias": t(d),
        v + "norm.weight": 1 + t(d),
        v + "norm.bias": t(d),
        "blip.vision_proj.weight": t(8, d),
        "blip.vision_proj.bias": t(8),
        "blip.text_proj.weight": t(8, dt),
        "blip.text_proj.bias": t(8),
    }
    for i in range(L):
        p = f"blip.visual_encoder.blocks.{i}."
        s.update(
            {
                p + "norm1.weight": 1 + t(d),
                p + "norm1.bias": t(d),
                p + "attn.qkv.weight": t(3 * d, d),
                p + "attn.qkv.bias": t(3 * d),
                p + "attn.proj.weight": t(d, d),
                p + "attn.proj.bias": t(d),
                p + "norm2.weight": 1 + t(d),
                p + "norm2.bias": t(d),
                p + "mlp.fc1.weight": t(ff, d),
                p + "mlp.fc1.bias": t(ff),
                p + "mlp.fc2.weight": t(d, ff),
                p + "mlp.fc2.bias": t(d),
            }
        )
    e = "blip.text_encoder.embeddings."
    s.update(
        {
            e + "word_embeddings.weight": t(vocab, dt),
            e + "position_embeddings.weight": t(64, dt),
            e + "LayerNorm.weight": 1 + t(dt),
            e + "LayerNorm.bias": t(dt),
            e + "position_ids": torch.arange(64)[None],
        }
    )
    for i in range(L):
        p = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in (("attention", dt), ("crossattention", d)):
            s.update(
                {
                    p + f"{att}.self.query.weight": t(dt, dt),
                    p + f"{att}.self.query.bias": t(dt),
                    p + f"{att}.self.key.weight": t(dt, kv),
                    p + f"{att}.self.key.bias": t(dt),
                    p + f"{att}.self.value.weight": t(dt, kv),
                    p + f"{att}.self.value.bias": t(dt),
                    p + f"{att}.output.dense.weight": t(dt, dt),
                    p + f"{att}.output.dense.bias": t(dt),
                    p + f"{att}.output.LayerNorm.weight": 1 + t(dt),
                    p + f"{att}.output.LayerNorm.bias": t(dt),
                }
            )
        s.update(
            {
                p + "intermediate.dense.weight": t(ff, dt),
                p + "intermediate.dense.bias": t(ff),
                p + "output.dense.weight": t(dt, ff),
                p + "output.dense.bias": t(dt),
                p + "output.LayerNorm.weight": 1 + t(dt),
                p + "output.LayerNorm.bias": t(dt),
            }
        )
    for k, (o, i) in zip((0, 2, 4, 6, 7), ((1024, dt), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s[f"mlp.layers.{k}.weight"] = t(o, i, scale=0.05)
        s[f"mlp.layers.{k}.bias"] = t(o, scale=0.05)
    return s


def _attention(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def _reference_imagereward(s, pixels, ids, mask, heads=2):
    """BLIP VisionTransformer (vit.py) + med.py BertModel (multimodal) + MLP, written from the original keys."""
    lin = lambda x, p: F.linear(x, s[p + ".weight"], s[p + ".bias"])  # noqa: E731
    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)  # noqa: E731
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[v + "pos_embed"]
    for i in range(2):
        p = f"{v}blocks.{i}."
        h = ln(x, p + "norm1", 1e-6)
        q, k, val = lin(h, p + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, val, heads), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)
    e = "blip.text_encoder.embeddings."
    h = s[e + "word_embeddings.weight"][ids] + s[e + "position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, e + "LayerNorm", 1e-12)
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py get_extended_attention_mask
    for i in range(2):
        p = f"blip.text_encoder.encoder.layer.{i}."
        a = _attention(
            lin(h, p + "attention.self.query"),
            lin(h, p + "attention.self.key"),
            lin(h, p + "attention.self.value"),
            heads,
            ext,
        )
        h = ln(lin(a, p + "attention.output.dense") + h, p + "attention.output.LayerNorm", 1e-12)
        c = _attention(
            lin(h, p + "crossattention.self.query"),
            lin(image, p + "crossattention.self.key"),
            lin(image, p + "crossattention.self.value"),
            heads,
        )
        h = ln(lin(c, p + "crossattention.output.dense") + h, p + "crossattention.output.LayerNorm", 1e-12)
        ff = lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense")
        h = ln(ff + h, p + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for k in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{k}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_loads_original_checkpoint_and_equals_reference(tmp_path):
    from reward_models.imagereward import blip_tokenizer, load_imagereward, tiny_bert_tokenizer

    tok_dir = tmp_path / "bert"
    tiny_bert_tokenizer().save_pretrained(tok_dir)
    tokenizer = blip_tokenizer(str(tok_dir))
    state = _original_imagereward_state(len(tokenizer))
    ckpt = tmp_path / "ImageReward"
    ckpt.mkdir()
    torch.save(state, ckpt / "ImageReward.pt")
    med = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "vocab_size": len(tokenizer),
        "encoder_width": 32,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "add_cross_attention": True,
    }
    (ckpt / "med_config.json").write_text(json.dumps(med))
    reward = load_imagereward(str(ckpt), tokenizer=str(tok_dir), vit=TINY_VIT)

    media = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(6))
    prompts = ["a red circle on the left", "a blue square moving up"]
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (tokens.input_ids[:, 0] == tokenizer.cls_token_id).all()  # ImageReward keeps [CLS], no [ENC]
    with torch.no_grad():
        from reward_models.preprocess import ImageTransform

        pixels = ImageTransform(32, "shortest", "bicubic", OPENAI_MEAN, OPENAI_STD)(media)
        ref = _reference_imagereward(state, pixels, tokens.input_ids, tokens.attention_mask)
    out = reward(media, prompts)
    torch.testing.assert_close(out.scores, ref, rtol=1e-4, atol=1e-5)
    assert out.scores.std() > 1e-3  # the weights are not degenerate: the comparison means something


def test_imagereward_rejects_a_checkpoint_of_another_shape(tmp_path):
    from reward_models import CheckpointError
    from reward_models.imagereward import load_imagereward, tiny_bert_tokenizer

    tok_dir = tmp_path / "bert"
    tiny_bert_tokenizer().save_pretrained(tok_dir)
    vocab = len(tiny_bert_tokenizer()) + 2
    state = _original_imagereward_state(vocab)
    del state["blip.visual_encoder.norm.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    med = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "vocab_size": vocab,
        "encoder_width": 32,
    }
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(CheckpointError, match=r"1 missing .*post_layernorm.weight"):
        load_imagereward(str(tmp_path / "ImageReward.pt"), tokenizer=str(tok_dir), vit=TINY_VIT)
