"""``imagereward``: ImageReward v1.0 (Xu et al., 2023) on transformers' BLIP components.

The original (``ImageReward/ImageReward.py``) is BLIP's ViT-L/16 image encoder (timm-style blocks, LayerNorm
eps 1e-6, a final norm over all tokens), BLIP's BERT text encoder in "multimodal" mode (bidirectional
self-attention + cross-attention to all image tokens; ``med_config.json``: BERT-base, vocab 30524,
``encoder_width`` 1024), and an MLP on the ``[CLS]`` state:

```
image_embeds = visual_encoder(x)                                   # [B, 197, 1024]
h = text_encoder(ids, mask, encoder_hidden_states=image_embeds)    # [B, 35, 768]
r = (MLP(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072
```

transformers' ``BlipVisionModel`` is the same ViT (``qkv``/``projection`` layout, ``last_hidden_state`` after
the final norm) and ``BlipTextModel`` is the port of BLIP's ``med.py`` (built with ``is_decoder=True`` so its
layers have cross-attention, called with ``is_decoder=False`` for bidirectional attention), so the published
``ImageReward.pt`` loads by renaming keys (:func:`convert_imagereward_state_dict`). Tokenizer: BERT
``bert-base-uncased`` with BLIP's added ``[DEC]``/``[ENC]`` tokens; the prompt keeps its ``[CLS]`` (ImageReward
does not swap in ``[ENC]``), padded to 35 tokens. Preprocessing: shortest side to 224 bicubic, center crop,
OpenAI mean/std (tensor ops; the original resizes PIL images, which differs by a fraction of a grey level).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .aesthetic import LinearMLP
from .base import CheckpointError, Reward, RewardOutput
from .loading import is_hub_id, load_into, load_state_dict, resolve_file
from .preprocess import OPENAI_MEAN, OPENAI_STD, ImageTransform
from .specs import BUILTIN_SPECS

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_LENGTH = 35

# med_config.json of THUDM/ImageReward (used when the checkpoint comes without it)
MED_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "vocab_size": 30524,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
    "encoder_width": 1024,
}
# BLIP create_vit('large', 224)
VIT_LARGE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
}


def blip_configs(med: dict, vit: dict, tokenizer=None):
    """``(BlipVisionConfig, BlipTextConfig)`` of BLIP's ViT (LayerNorm eps 1e-6) and its BERT with cross-attention.

    Special-token ids come from ``tokenizer`` when given (else BERT-base's: pad 0, sep 102, ``[DEC]`` 30522).
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    ids = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        }
    vision = BlipVisionConfig(**vit, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=med.get("encoder_width", vit["hidden_size"]),
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
        **ids,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BLIP text encoder with cross-attention + linear MLP head (raw, unstandardised)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = LinearMLP(text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``[B, 3, S, S]`` normalised pixels and ``[B, L]`` tokens -> ``[B]`` raw rewards."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return self.mlp(text.last_hidden_state[:, 0, :]).float()


def convert_imagereward_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of the original ``ImageReward.pt`` to :class:`ImageRewardModel`'s.

    ``blip.visual_encoder.*`` (BLIP ViT) -> ``vision.*`` (``BlipVisionModel``), ``blip.text_encoder.*`` (med
    BERT) -> ``text.*`` (same names in ``BlipTextModel``), ``mlp.*`` unchanged; the unused BLIP projections
    (``blip.vision_proj``, ``blip.text_proj``) are dropped.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder.") :]
            k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k, k)
            k = k.replace("patch_embed.proj.", "embeddings.patch_embedding.")
            k = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", k)
            k = k.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
            k = k.replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection.")
            k = re.sub(r"^norm\.", "post_layernorm.", k)
            out["vision." + k] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            out[key] = value
    return out


def blip_tokenizer(source="google-bert/bert-base-uncased"):
    """BERT tokenizer with BLIP's special tokens (``[DEC]`` as bos, ``[ENC]`` additional), as ``init_tokenizer``."""
    from transformers import BertTokenizer

    tokenizer = source if isinstance(source, BertTokenizer) else BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tiny_bert_tokenizer():
    """A word-level BERT tokenizer (specials, shapes-world words, letters) for tiny offline models."""
    import string

    from transformers import BertTokenizer

    from visalign.offline_tokenizers import WORDS

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = list(dict.fromkeys(WORDS)) + list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens += words + ["##" + c for c in string.ascii_lowercase + string.digits]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})


class ImageReward(Reward):
    """ImageReward score ``(MLP(h_cls) - mean) / std`` (``components["raw"]``: before standardising).

    Args:
        model: :class:`ImageRewardModel`.
        tokenizer: BLIP's BERT tokenizer (:func:`blip_tokenizer`).
        transform: pixel transform (default: shortest side to the ViT input size, center crop, OpenAI mean/std).
        batch_size: images per forward chunk.
    """

    def __init__(self, model: ImageRewardModel, tokenizer, transform: ImageTransform | None = None, batch_size=16):
        super().__init__(BUILTIN_SPECS["imagereward"], batch_size)
        self.model = model
        self.tokenizer = tokenizer
        size = model.vision.config.image_size
        self.transform = transform or ImageTransform(size, "shortest", "bicubic", OPENAI_MEAN, OPENAI_STD)

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        pixels = self.transform(self.pixels(media)).to(self.dtype)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        ).to(self.device)
        raw = self.model(pixels, tokens.input_ids, tokens.attention_mask)
        return RewardOutput((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, {"raw": raw})


def _med_config(checkpoint: str | None) -> dict:
    source = checkpoint or IMAGEREWARD_REPO
    path = Path(source)
    if path.is_file():
        path = path.parent
    if path.is_dir():
        file = path / "med_config.json"
        return {**MED_CONFIG, **json.loads(file.read_text())} if file.is_file() else dict(MED_CONFIG)
    if is_hub_id(source):
        file = resolve_file(source, "med_config.json", what="med_config.json")
        return {**MED_CONFIG, **json.loads(file.read_text())}
    return dict(MED_CONFIG)


def load_imagereward(
    checkpoint: str | None = None,
    tokenizer: str = "google-bert/bert-base-uncased",
    vit: dict | None = None,
    batch_size: int = 16,
) -> ImageReward:
    """ImageReward from ``ImageReward.pt``.

    Args:
        checkpoint: the ``.pt`` file, a folder holding ``ImageReward.pt`` (and ``med_config.json``), or a hub
            repo (default ``THUDM/ImageReward``).
        tokenizer: BERT tokenizer hub id or folder (``bert-base-uncased``).
        vit: BLIP ViT shape (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``image_size``, ``patch_size``); default ViT-L/16 at 224, ImageReward's.
        batch_size: images per forward chunk.

    Raises:
        CheckpointError: missing checkpoint, missing tokenizer, or weights that do not fit.
    """
    path = resolve_file(checkpoint or IMAGEREWARD_REPO, IMAGEREWARD_FILE, what="ImageReward checkpoint")
    try:
        tok = blip_tokenizer(tokenizer)
    except Exception as e:
        raise CheckpointError(f"cannot load the BERT tokenizer {tokenizer!r} for ImageReward: {e}") from e
    vision_cfg, text_cfg = blip_configs(_med_config(checkpoint), vit or VIT_LARGE, tok)
    model = ImageRewardModel(vision_cfg, text_cfg)
    state = convert_imagereward_state_dict(load_state_dict(path, what="ImageReward checkpoint"))
    load_into(model, state, what=f"ImageReward checkpoint {path}", ignore=("text.embeddings.position_ids",))
    return ImageReward(model, tok, batch_size=batch_size).freeze()


def random_imagereward(size: str = "tiny", seed: int = 0) -> ImageReward:
    """ImageReward with random weights: tiny BLIP (``"tiny"``) or the published shapes (``"full"``)."""
    torch.manual_seed(seed)
    tokenizer = blip_tokenizer(tiny_bert_tokenizer())
    if size == "tiny":
        med = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "vocab_size": len(tokenizer),
            "encoder_width": 32,
        }
        vit = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        }
    else:
        med, vit = {**MED_CONFIG, "vocab_size": max(len(tokenizer), MED_CONFIG["vocab_size"])}, VIT_LARGE
    vision_cfg, text_cfg = blip_configs(med, vit, tokenizer)
    return ImageReward(ImageRewardModel(vision_cfg, text_cfg).eval(), tokenizer).freeze()
