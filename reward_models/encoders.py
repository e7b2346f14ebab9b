"""Image/text towers shared by the scorers: open_clip CLIP, transformers CLIP, and frozen feature encoders.

Each tower owns its preprocessing (:class:`~reward_models.preprocess.ImageTransform`, in torch) and takes
pixels in ``[0, 1]``; casting to the weights' dtype happens after preprocessing, which runs in float32.
Loaders resolve a hub id or a local path when called (never at import); ``random_*`` builders make the same
architectures with random weights (tiny for tests, full size for benchmarks).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import CheckpointError
from .loading import is_hub_id
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, ImageTransform

# tiny architectures for tests and CPU benchmarks (same classes as the published checkpoints)
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------- open_clip
class OpenCLIPTower(nn.Module):
    """An open_clip ``CLIP`` with its tokenizer and inference transform.

    Args:
        model: ``open_clip.CLIP`` (or ``CustomTextCLIP``).
        tokenizer: ``list[str] -> LongTensor [B, L]`` (open_clip tokenizer).
        transform: pixel transform; default: the one open_clip builds for ``model`` (its ``preprocess_cfg``).
    """

    def __init__(self, model: nn.Module, tokenizer, transform: ImageTransform | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform or ImageTransform.from_open_clip(model)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` (float32) -> ``[B, D]`` image embeddings (not normalised)."""
        x = self.transform(pixels).to(_param_dtype(self.model))
        return self.model.encode_image(x)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``N`` prompts -> ``[N, D]`` text embeddings (not normalised)."""
        tokens = self.tokenizer(prompts).to(_param_device(self.model))
        return self.model.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @classmethod
    def load(cls, model: str | os.PathLike, pretrained: str | None = None, **kwargs) -> OpenCLIPTower:
        """Load by open_clip name + ``pretrained`` (tag or file), or ``hf-hub:org/repo`` / a local folder.

        A local folder is open_clip's Hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``),
        e.g. the shipped ``assets/toyworld/toy-clip``.

        Raises:
            CheckpointError: unknown model name, missing file or folder, unreachable Hub.
        """
        import open_clip

        name = str(model)
        if Path(name).is_dir():
            if not (Path(name) / "open_clip_config.json").is_file():
                raise CheckpointError(f"{name} is not an open_clip folder: it has no open_clip_config.json")
            if not any(p.suffix in (".safetensors", ".bin", ".pth", ".pt") for p in Path(name).iterdir()):
                raise CheckpointError(f"open_clip folder {name} has no weights file (open_clip_model.safetensors)")
            name = f"local-dir:{name}"
            pretrained = None
        elif not name.startswith(("hf-hub:", "local-dir:")):
            if name not in open_clip.list_models():
                raise CheckpointError(
                    f"unknown open_clip model {name!r}: pass a name from open_clip.list_models(), "
                    "'hf-hub:org/repo' or a local open_clip folder"
                )
            tags = open_clip.list_pretrained_tags_by_model(name)
            if not pretrained:
                # open_clip would silently build random weights: a reward without weights is never intended
                raise CheckpointError(f"open_clip model {name} needs pretrained=TAG or a weights file; tags: {tags}")
            if not Path(pretrained).is_file() and pretrained not in tags:
                raise CheckpointError(
                    f"pretrained weights {pretrained!r} for {name} not found: not a file and not a tag of {tags}"
                )
        try:
            net = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"cannot load open_clip model {name!r} (pretrained={pretrained!r}): {e}") from e
        return cls(net, open_clip.get_tokenizer(name))

    @classmethod
    def random(cls, config: str | dict = "tiny", transform: ImageTransform | None = None, seed: int = 0, **kw):
        """Random weights: ``"tiny"`` (:data:`TINY_OPEN_CLIP`), an open_clip model name, or a config dict."""
        import open_clip

        torch.manual_seed(seed)
        if config == "tiny":
            config = TINY_OPEN_CLIP
        if isinstance(config, str):
            net = open_clip.create_model(config, pretrained=None, **kw)
            tokenizer = open_clip.get_tokenizer(config)
        else:
            net = open_clip.CLIP(**config, **kw)
            tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
            size = config["vision_cfg"]["image_size"]
            transform = transform or ImageTransform(size)
        return cls(net, tokenizer, transform)


# ----------------------------------------------------------------------------------------------- transformers
class HFCLIPTower(nn.Module):
    """A transformers ``CLIPModel`` with its tokenizer and pixel transform.

    Args:
        model: ``transformers.CLIPModel``.
        tokenizer: a CLIP tokenizer (``visalign.offline_tokenizers.clip_tokenizer()`` is the exact CLIP BPE).
        transform: pixel transform (default: shortest side to the model's image size, bicubic, center crop
            as transformers' processors place it, OpenAI mean/std).
    """

    def __init__(self, model: nn.Module, tokenizer, transform: ImageTransform | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform or ImageTransform(model.config.vision_config.image_size, crop_rounding="floor")
        self.max_length = model.config.text_config.max_position_embeddings

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.transform(pixels).to(_param_dtype(self.model))
        # transformers 5: get_image_features returns an output object; the projected embedding is pooler_output
        return self.model.get_image_features(pixel_values=x).pooler_output

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(_param_device(self.model))
        out = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return out.pooler_output

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @classmethod
    def load(cls, source: str | os.PathLike, tokenizer=None, transform: ImageTransform | None = None) -> HFCLIPTower:
        """``CLIPModel.from_pretrained(source)``; tokenizer and processor from ``source`` when it has them.

        Without tokenizer files the exact CLIP BPE tokenizer is used (all OpenAI/LAION CLIP checkpoints share
        it); without a processor config, the default transform.

        Raises:
            CheckpointError: ``source`` is neither a local transformers folder nor a reachable hub id.
        """
        from transformers import CLIPModel

        source = str(source)
        if not Path(source).is_dir() and not is_hub_id(source):
            raise CheckpointError(f"CLIP model not found: {source} is neither a local folder nor a hub id")
        try:
            model = CLIPModel.from_pretrained(source)
        except Exception as e:
            raise CheckpointError(f"cannot load transformers CLIPModel from {source!r}: {e}") from e
        if tokenizer is None:
            tokenizer = _optional_tokenizer(source)
        if transform is None:
            transform = _optional_transform(source)
        return cls(model, tokenizer, transform)

    @classmethod
    def random(cls, size: str = "tiny", seed: int = 0, transform: ImageTransform | None = None) -> HFCLIPTower:
        """Random ``CLIPModel``: ``"tiny"`` or ``"clip-h"`` (the ViT-H/14 shape of PickScore and LAION CLIP-H)."""
        from transformers import CLIPConfig, CLIPModel

        from visalign.offline_tokenizers import clip_tokenizer

        torch.manual_seed(seed)
        ids = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
        if size == "tiny":
            text = {
                "vocab_size": 49408,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
                "projection_dim": 16,
                **ids,
            }
            vision = {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": 16,
            }
            proj = 16
        elif size == "clip-h":
            text = {
                "vocab_size": 49408,
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "max_position_embeddings": 77,
                "hidden_act": "gelu",
                **ids,
            }
            vision = {
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_hidden_layers": 32,
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
                "hidden_act": "gelu",
            }
            proj = 1024
        else:
            raise ValueError(f"unknown size {size!r}; use 'tiny' or 'clip-h'")
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
        return cls(CLIPModel(config).eval(), clip_tokenizer(), transform)


def _optional_tokenizer(source: str):
    """The tokenizer saved with a transformers checkpoint, else the exact CLIP BPE tokenizer."""
    from transformers import AutoTokenizer

    from visalign.offline_tokenizers import clip_tokenizer

    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return clip_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception:  # a hub repo without tokenizer files (e.g. weights-only fine-tunes): CLIP BPE is shared
        return clip_tokenizer()


def _optional_transform(source: str) -> ImageTransform | None:
    from transformers import AutoImageProcessor

    if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
        return None
    try:
        return ImageTransform.from_hf_processor(AutoImageProcessor.from_pretrained(source))
    except Exception:  # no processor config: the tower's default transform
        return None


# ----------------------------------------------------------------------------------------------- features
class FeatureEncoder(nn.Module):
    """A frozen image encoder: pixels ``[B, 3, H, W]`` in ``[0, 1]`` -> features ``[B, D]``.

    ``open_clip`` encoders return the projected image embedding; transformers vision models (DINO, DINOv2,
    ViT) the class token of the last hidden state (already layer-normed in those models); a transformers
    ``CLIPModel`` its projected image embedding.

    Args:
        model: the network.
        transform: its pixel transform.
        kind: ``"open_clip"`` or ``"transformers"``.
        source: how to rebuild it (saved with discriminator heads), e.g. ``"facebook/dinov2-base"``.
    """

    def __init__(self, model: nn.Module, transform, kind: str, source: str | None = None):
        super().__init__()
        if kind not in ("open_clip", "transformers"):
            raise ValueError(f"kind must be 'open_clip' or 'transformers', got {kind!r}")
        self.model = model
        self.transform = transform
        self.kind = kind
        self.source = source

    @property
    def dim(self) -> int:
        """Feature width ``D``."""
        if self.kind == "open_clip":
            return int(self.model.visual.output_dim)
        if self.model.config.model_type == "clip":
            return int(self.model.config.projection_dim)
        return int(self.model.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` (float32) -> ``[B, D]`` features."""
        x = self.transform(pixels).to(_param_dtype(self.model))
        if self.kind == "open_clip":
            return self.model.encode_image(x)
        from transformers import CLIPModel

        if isinstance(self.model, CLIPModel):
            return self.model.get_image_features(pixel_values=x).pooler_output
        return self.model(pixel_values=x).last_hidden_state[:, 0]

    @classmethod
    def load(cls, source: str, pretrained: str | None = None) -> FeatureEncoder:
        """``"open_clip:NAME"`` (+ ``pretrained`` tag/file) or an open_clip folder; else transformers ``AutoModel``.

        Raises:
            CheckpointError: the encoder cannot be found or loaded.
        """
        source = str(source)
        if source.startswith("open_clip:") or (Path(source) / "open_clip_config.json").is_file():
            tower = OpenCLIPTower.load(source.removeprefix("open_clip:"), pretrained)
            return cls(tower.model, tower.transform, "open_clip", source)
        from transformers import AutoModel

        if not Path(source).is_dir() and not is_hub_id(source):
            raise CheckpointError(f"feature encoder not found: {source} is neither a local folder nor a hub id")
        try:
            model = AutoModel.from_pretrained(source)
        except Exception as e:
            raise CheckpointError(f"cannot load feature encoder {source!r}: {e}") from e
        transform = _optional_transform(source) or _default_vision_transform(model.config)
        return cls(model, transform, "transformers", source)

    @classmethod
    def random(cls, kind: str = "dinov2", size: str = "tiny", seed: int = 0) -> FeatureEncoder:
        """Random encoder: ``kind`` ``"dinov2"`` or ``"open_clip"``; ``size`` ``"tiny"`` or ``"full"``
        (DINOv2-B/14 at 224 px; open_clip ViT-B-32)."""
        torch.manual_seed(seed)
        if kind == "open_clip":
            tower = OpenCLIPTower.random("tiny" if size == "tiny" else "ViT-B-32", seed=seed)
            return cls(tower.model, tower.transform, "open_clip", None)
        if kind != "dinov2":
            raise ValueError(f"unknown encoder kind {kind!r}")
        from transformers import Dinov2Config, Dinov2Model

        if size == "tiny":
            config = Dinov2Config(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
            )
        else:
            config = Dinov2Config(
                hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=14
            )
        model = Dinov2Model(config).eval()
        return cls(model, _default_vision_transform(config), "transformers", None)


def _default_vision_transform(config) -> ImageTransform:
    """ImageNet normalisation at the model's input size (for vision models saved without a processor)."""
    vision = config.vision_config if config.model_type == "clip" else config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    if vision.model_type in ("clip", "clip_vision_model"):
        return ImageTransform(size, mean=OPENAI_MEAN, std=OPENAI_STD, crop_rounding="floor")
    return ImageTransform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_rounding="floor")
