"""Image preprocessing in torch (differentiable), matching the published pipelines of each scorer.

Every function takes a batch ``[B, 3, H, W]`` float in ``[0, 1]`` and keeps the autograd graph. Resizing goes
through ``torchvision.transforms.functional.resize`` on tensors (bicubic/bilinear with antialias), i.e. the
exact operation torchvision, open_clip and transformers' torchvision image processors apply to tensors.
Pipelines that resize PIL images instead (the original PickScore/ImageReward processors) differ from any
tensor resize by a fraction of a grey level; no resize happens when the input already has the target size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tv_resize(
    images: torch.Tensor, size: tuple[int, int], interpolation: str, antialias: bool = True
) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvF

    if tuple(images.shape[-2:]) == tuple(size):
        return images
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return tvF.resize(images, list(size), interpolation=mode, antialias=antialias)


def resize_shortest(
    images: torch.Tensor, size: int, interpolation: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resize so the shortest side is ``size`` (long side ``int(size * long / short)``, torchvision's rule)."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if h <= w else (new_long, new_short)
    return _tv_resize(images, new, interpolation, antialias)


def center_crop(images: torch.Tensor, size: int, rounding: Literal["round", "floor"] = "round") -> torch.Tensor:
    """Crop the central ``size x size`` square.

    ``rounding="round"`` places odd margins as torchvision's ``CenterCrop`` (Python ``round``, used by
    open_clip); ``"floor"`` as transformers' image processors (``int((h - size) / 2)``).
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size}x{size} from {h}x{w}")
    if rounding == "round":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = int((h - size) / 2.0), int((w - size) / 2.0)
    return images[..., top : top + size, left : left + size]


def resize_longest_pad(
    images: torch.Tensor, size: int, interpolation: str = "bicubic", fill: float = 0.0, antialias: bool = True
) -> torch.Tensor:
    """Resize so the longest side is ``size``, then pad the short side (centred) to a square.

    This is HPSv2's ``ResizeMaxSize`` (``hpsv2/src/open_clip/transform.py``): new size
    ``round(dim * size / longest)`` (Python ``round``), bicubic on the ``[0, 1]`` tensor, padding
    ``[left, top, right, bottom] = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]`` with
    ``fill`` (0 = black, before normalisation). HPSv2 skips both steps when the longest side already equals
    ``size`` (and then fails on non-square input); here a square result is always produced.

    ``antialias``: torchvision applies antialiasing to tensor resizes by default since 0.17 (what HPSv2's code
    does with the pinned torchvision); with torchvision < 0.17, the 2023 setup HPSv2 was trained and benchmarked
    with, tensor resizes were not antialiased. ``antialias=False`` reproduces that.
    """
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    images = _tv_resize(images, (new_h, new_w), interpolation, antialias)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return images


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (``[B, 3, H, W]``)."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """Resize, crop/pad and normalise a batch ``[B, 3, H, W]`` in ``[0, 1]`` to the model's input.

    Attributes:
        size: output side (square).
        resize: ``"shortest"`` (resize shortest side, center crop: CLIP), ``"longest"`` (resize longest side,
            pad: HPS), ``"squash"`` (resize both sides to ``size``, aspect not kept).
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        mean, std: per-channel normalisation.
        crop_rounding: center-crop margin rounding (see :func:`center_crop`).
        fill: padding value in ``[0, 1]`` units for ``"longest"``.
        resize_size: for ``"shortest"``, the shortest side before cropping when it differs from ``size``
            (DINOv2's processor: 256, then a 224 crop).
        antialias: antialiased downscaling (torchvision's default for tensors since 0.17).
    """

    size: int
    resize: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    crop_rounding: Literal["round", "floor"] = "round"
    fill: float = 0.0
    resize_size: int | None = None
    antialias: bool = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize == "shortest":
            images = resize_shortest(images, self.resize_size or self.size, self.interpolation, self.antialias)
            images = center_crop(images, self.size, self.crop_rounding)
        elif self.resize == "longest":
            images = resize_longest_pad(images, self.size, self.interpolation, self.fill, self.antialias)
        elif self.resize == "squash":
            images = _tv_resize(images, (self.size, self.size), self.interpolation, self.antialias)
        else:
            raise ValueError(f"unknown resize mode {self.resize!r}")
        return normalize(images, self.mean, self.std)

    @classmethod
    def from_open_clip(cls, model) -> ImageTransform:
        """The inference transform open_clip builds for ``model`` (its ``preprocess_cfg``), as tensors ops."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"non-square open_clip input size {size} is not supported")
            size = size[0]
        interpolation = cfg.get("interpolation", "bicubic")
        return cls(
            size=int(size),
            resize=cfg.get("resize_mode", "shortest"),
            interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
            mean=tuple(cfg.get("mean", OPENAI_MEAN)),
            std=tuple(cfg.get("std", OPENAI_STD)),
            crop_rounding="round",
            fill=float(cfg.get("fill_color", 0)) / 255.0,
        )

    @classmethod
    def from_hf_processor(cls, processor) -> ImageTransform:
        """The transform of a transformers (v5) image processor: shortest-edge resize + center crop, or a fixed
        size. Its ``size``/``crop_size`` are ``SizeDict``s; center-crop margins are placed as it does (floor)."""
        crop = processor.crop_size if processor.do_center_crop else None
        interpolation = "bilinear" if int(processor.resample) == 2 else "bicubic"
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        shortest = processor.size.shortest_edge
        if shortest is not None:
            side = _side(crop) if crop else int(shortest)
            return cls(side, "shortest", interpolation, mean, std, crop_rounding="floor", resize_size=int(shortest))
        return cls(_side(processor.size), "squash", interpolation, mean, std)


def _side(size) -> int:
    if size.height != size.width:
        raise ValueError(f"non-square input size {size.height}x{size.width} is not supported")
    return int(size.height)
