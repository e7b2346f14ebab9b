"""The oracle: an exact, programmatic judge of whether an image (or video) matches its caption (docs/shapes_world.md).

Images:

1. Foreground = pixels whose max channel difference from the background exceeds 0.15 (on ``[0, 1]``).
   No object if the largest 4-connected foreground component has fewer than 40 pixels; more than one
   component of at least 40 pixels is "several objects" and fails every attribute.
2. Colour = the palette entry nearest (Euclidean RGB) to the per-channel median of the component.
3. Shape = fill ratio of the component in its bounding box: >= 0.90 square, 0.62-0.90 circle, < 0.62 triangle.
4. Position = centroid (pixel indices, x right, y down): left x < 24, right x > 40, top y < 24, bottom y > 40.

Per sample the oracle reports each attribute and ``strict`` (every attribute the caption names is right);
:func:`summarize` aggregates object rate, colour / shape / position accuracy and strict accuracy on
held-in and held-out captions separately.

Videos (8 frames of 32x32, component >= 12 px): per-frame colour and shape; direction = sign of the centroid
displacement from the first to the last frame along the named axis, at least 6 px; temporal consistency =
the same colour and shape in >= 7 of 8 frames. Where the specification leaves a choice, this module decides:
a video's ``object`` needs exactly one object in >= 7 frames, its colour (shape) is right when the caption's
colour (shape) is the most common one over the frames, and ``strict`` needs object, colour, shape,
direction and consistency.

Connected components are labelled for a whole batch at once (min-label propagation with pointer jumping,
in numpy), so 1,000 images take well under a second.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .captions import (
    BACKGROUND,
    PALETTE,
    SHAPES,
    Caption,
    VideoCaption,
    parse_caption,
    parse_video_caption,
)
from .render import POSITION_HIGH, POSITION_LOW

FOREGROUND_THRESHOLD = 0.15
MIN_PIXELS = 40
MIN_PIXELS_VIDEO = 12
SQUARE_MIN_FILL = 0.90
CIRCLE_MIN_FILL = 0.62
VIDEO_MIN_DISPLACEMENT = 6.0
VIDEO_MIN_CONSISTENT_FRAMES = 7

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float64)


# ----------------------------------------------------------------------------------------------- pixels
def to_hwc_float(media) -> np.ndarray:
    """Images to ``[..., H, W, 3]`` float32 in ``[0, 1]``.

    Torch tensors follow the visalign convention (channel-first ``[..., 3, H, W]``); numpy arrays the PIL
    convention (channel-last ``[..., H, W, 3]``). uint8 is divided by 255; floats must be in ``[0, 1]``.
    """
    if isinstance(media, torch.Tensor):
        array = media.detach().cpu()
        array = (array.float() / 255 if array.dtype == torch.uint8 else array.float()).movedim(-3, -1).numpy()
    else:
        array = np.asarray(media)
        array = array.astype(np.float32) / 255 if array.dtype == np.uint8 else array.astype(np.float32)
    if array.shape[-1] != 3:
        raise ValueError(f"expected RGB images (3 channels), got shape {tuple(array.shape)}")
    return array


def foreground(images: np.ndarray) -> np.ndarray:
    """``[..., H, W]`` bool: max channel difference from the background above 0.15 (images ``[..., H, W, 3]``)."""
    background = np.asarray(BACKGROUND, dtype=np.float32) / 255
    return np.abs(images - background).max(axis=-1) > FOREGROUND_THRESHOLD


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a batch of masks.

    Args:
        mask: ``[N, H, W]`` bool.

    Returns:
        ``[N, H, W]`` int64: for a foreground pixel, the flat index (into ``mask.ravel()``) of the first pixel
        of its component; ``-1`` for background. Equal labels mean the same component.
    """
    n, h, w = mask.shape
    sentinel = n * h * w
    flat_index = np.arange(sentinel, dtype=np.int64).reshape(n, h, w)
    labels = np.where(mask, flat_index, sentinel)
    while True:
        # hook: take the smallest label among the 4 neighbours (background holds the sentinel, never smaller)
        new = labels.copy()
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new = np.where(mask, new, sentinel)
        # jump: a label is the index of a pixel of the same component whose own label is no larger
        flat = np.append(new.ravel(), sentinel)
        while True:
            jumped = flat[flat]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat[:-1].reshape(n, h, w)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, -1)


@dataclass
class ObjectStats:
    """Measurements of the largest foreground component of each image (``[N]`` arrays)."""

    n_objects: np.ndarray  # components with at least min_pixels
    pixels: np.ndarray  # size of the largest component
    median_rgb: np.ndarray  # [N, 3] per-channel median, 0-255
    fill_ratio: np.ndarray
    cx: np.ndarray
    cy: np.ndarray


def measure(images: np.ndarray, min_pixels: int) -> ObjectStats:
    """Find and measure the largest component of each image.

    Args:
        images: ``[N, H, W, 3]`` float in ``[0, 1]``.
        min_pixels: smallest component that counts as an object.
    """
    n, h, w, _ = images.shape
    mask = foreground(images)
    labels = label_components(mask)
    fg = labels[mask]
    roots, sizes = np.unique(fg, return_counts=True)
    image_of_root = roots // (h * w)
    n_objects = np.bincount(image_of_root[sizes >= min_pixels], minlength=n)
    largest = np.full(n, -1, dtype=np.int64)
    pixels = np.zeros(n, dtype=np.int64)
    order = np.lexsort((-sizes, image_of_root))  # per image, largest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = image_of_root[order][1:] != image_of_root[order][:-1]
    largest[image_of_root[order][first]] = roots[order][first]
    pixels[image_of_root[order][first]] = sizes[order][first]
    median = np.full((n, 3), np.nan)
    fill = np.full(n, np.nan)
    cx = np.full(n, np.nan)
    cy = np.full(n, np.nan)
    for i in np.nonzero(largest >= 0)[0]:
        ys, xs = np.nonzero(labels[i] == largest[i])
        median[i] = np.median(images[i, ys, xs], axis=0) * 255
        fill[i] = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        cx[i], cy[i] = xs.mean(), ys.mean()
    return ObjectStats(n_objects, pixels, median, fill, cx, cy)


def nearest_color(rgb: np.ndarray) -> str:
    """Palette name nearest (Euclidean) to an RGB triple in 0-255."""
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def shape_of(fill_ratio: float) -> str:
    """Shape from the fill ratio (ideal square 1.0, circle pi/4, triangle 0.5)."""
    if fill_ratio >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill_ratio >= CIRCLE_MIN_FILL else "triangle"


SHAPE_BANDS = {
    "square": (SQUARE_MIN_FILL, math.inf),
    "circle": (CIRCLE_MIN_FILL, SQUARE_MIN_FILL),
    "triangle": (0.0, CIRCLE_MIN_FILL),
}
SHAPE_CREDIT_WIDTH = 0.15


def shape_credit(fill_ratio: float | None, shape: str, width: float = SHAPE_CREDIT_WIDTH) -> float:
    """1 when the fill ratio lies in ``shape``'s band, falling linearly to 0 at ``width`` outside it (0 without an
    object): how near a drawn object is to the named shape, for rewards that must move before the verdict flips."""
    if fill_ratio is None or math.isnan(fill_ratio):
        return 0.0
    low, high = SHAPE_BANDS[shape]
    gap = max(low - fill_ratio, fill_ratio - high, 0.0)
    return max(0.0, 1.0 - gap / width)


def direction_sign(direction: str) -> float:
    """+1 for the directions that increase a pixel coordinate (right, down), -1 for left and up."""
    return 1.0 if direction in ("right", "down") else -1.0


def dense_score(
    verdict: ImageVerdict | VideoVerdict, caption: Caption | VideoCaption, width: float = SHAPE_CREDIT_WIDTH
) -> float:
    """The oracle's graded verdict, with shape as :func:`shape_credit` of the fill ratio instead of 0/1 (credit
    falling to 0 at ``width`` outside the named shape's band).

    Images: the mean of colour (0/1), shape credit and, when named, position (0/1); 0 without one object.
    Videos: the mean of the fraction of frames with the caption's colour, the mean shape credit over the frames,
    the mean of their product, and the displacement along the named direction over the 6 px threshold (clipped
    to ``[0, 1]``).
    """
    if isinstance(verdict, ImageVerdict):
        if not verdict.object:
            return 0.0
        parts = [float(verdict.color_ok), shape_credit(verdict.fill_ratio, caption.shape, width)]
        if verdict.position_ok is not None:
            parts.append(float(verdict.position_ok))
        return sum(parts) / len(parts)
    frames = len(verdict.colors)
    color = [float(c == caption.color) for c in verdict.colors]
    shape = [shape_credit(f, caption.shape, width) for f in verdict.fill_ratios]
    both = sum(c * s for c, s in zip(color, shape)) / frames
    progress = 0.0
    if verdict.displacement is not None:
        progress = direction_sign(caption.direction) * verdict.displacement / VIDEO_MIN_DISPLACEMENT
        progress = min(max(progress, 0.0), 1.0)
    return (sum(color) / frames + sum(shape) / frames + both + progress) / 4


def horizontal_of(cx: float) -> str | None:
    return "left" if cx < POSITION_LOW else "right" if cx > POSITION_HIGH else None


def vertical_of(cy: float) -> str | None:
    return "top" if cy < POSITION_LOW else "bottom" if cy > POSITION_HIGH else None


def position_holds(position: str, cx: float, cy: float) -> bool:
    """Whether a centroid satisfies a named position."""
    return {
        "left": horizontal_of(cx) == "left",
        "right": horizontal_of(cx) == "right",
        "top": vertical_of(cy) == "top",
        "bottom": vertical_of(cy) == "bottom",
    }[position]


# ----------------------------------------------------------------------------------------------- images
@dataclass
class ImageVerdict:
    """The oracle's findings for one image.

    ``color``/``shape``/``cx``/``cy`` describe the largest component (``None`` without one); the ``*_ok``
    fields are ``False`` whenever ``object`` is (no object, or several objects); ``position_ok`` is ``None``
    for captions that name no position.
    """

    caption: str
    split: str
    object: bool
    n_objects: int
    pixels: int
    color: str | None
    shape: str | None
    fill_ratio: float | None
    cx: float | None
    cy: float | None
    horizontal: str | None
    vertical: str | None
    color_ok: bool
    shape_ok: bool
    position_ok: bool | None
    strict: bool

    def to_dict(self) -> dict:
        return asdict(self)


def judge_images(images, captions: list[str | Caption]) -> list[ImageVerdict]:
    """Judge a batch of images against their captions.

    Args:
        images: ``[N, 3, H, W]`` torch tensor (float in ``[0, 1]`` or uint8) or ``[N, H, W, 3]`` numpy array.
        captions: ``N`` captions of the shapes world.
    """
    pixels = to_hwc_float(images)
    if pixels.ndim == 3:
        pixels = pixels[None]
    parsed = [parse_caption(c) if isinstance(c, str) else c for c in captions]
    if len(parsed) != pixels.shape[0]:
        raise ValueError(f"got {pixels.shape[0]} images but {len(parsed)} captions")
    stats = measure(pixels, MIN_PIXELS)
    verdicts = []
    for i, cap in enumerate(parsed):
        verdicts.append(_verdict(cap, stats, i))
    return verdicts


def _verdict(cap: Caption, stats: ObjectStats, i: int) -> ImageVerdict:
    found = stats.pixels[i] > 0 and not np.isnan(stats.fill_ratio[i])
    color = nearest_color(stats.median_rgb[i]) if found else None
    shape = shape_of(float(stats.fill_ratio[i])) if found else None
    cx = float(stats.cx[i]) if found else None
    cy = float(stats.cy[i]) if found else None
    one = int(stats.n_objects[i]) == 1
    color_ok = one and color == cap.color
    shape_ok = one and shape == cap.shape
    position_ok = None if cap.position is None else bool(one and position_holds(cap.position, cx, cy))
    return ImageVerdict(
        caption=cap.text,
        split=cap.split,
        object=one,
        n_objects=int(stats.n_objects[i]),
        pixels=int(stats.pixels[i]),
        color=color,
        shape=shape,
        fill_ratio=float(stats.fill_ratio[i]) if found else None,
        cx=cx,
        cy=cy,
        horizontal=horizontal_of(cx) if found else None,
        vertical=vertical_of(cy) if found else None,
        color_ok=bool(color_ok),
        shape_ok=bool(shape_ok),
        position_ok=position_ok,
        strict=bool(color_ok and shape_ok and position_ok is not False),
    )


# ----------------------------------------------------------------------------------------------- videos
@dataclass
class VideoVerdict:
    """The oracle's findings for one video (per-frame lists have one entry per frame, ``None`` = no object)."""

    caption: str
    split: str
    frames_with_object: int
    colors: list[str | None]
    shapes: list[str | None]
    fill_ratios: list[float | None]
    displacement: float | None  # along the named axis, signed (x right, y down)
    object: bool
    color_ok: bool
    shape_ok: bool
    direction_ok: bool
    consistent: bool
    strict: bool

    def to_dict(self) -> dict:
        return asdict(self)


def judge_videos(videos, captions: list[str | VideoCaption]) -> list[VideoVerdict]:
    """Judge a batch of videos against their captions.

    Args:
        videos: ``[N, F, 3, H, W]`` torch tensor (float in ``[0, 1]`` or uint8) or ``[N, F, H, W, 3]`` numpy.
        captions: ``N`` video captions.
    """
    pixels = to_hwc_float(videos)
    if pixels.ndim != 5:
        raise ValueError(f"expected a batch of videos [N, F, ...], got shape {tuple(pixels.shape)}")
    n, f = pixels.shape[:2]
    parsed = [parse_video_caption(c) if isinstance(c, str) else c for c in captions]
    if len(parsed) != n:
        raise ValueError(f"got {n} videos but {len(parsed)} captions")
    stats = measure(pixels.reshape(n * f, *pixels.shape[2:]), MIN_PIXELS_VIDEO)
    return [_video_verdict(cap, stats, i, f) for i, cap in enumerate(parsed)]


def _video_verdict(cap: VideoCaption, stats: ObjectStats, i: int, frames: int) -> VideoVerdict:
    idx = range(i * frames, (i + 1) * frames)
    present = [int(stats.n_objects[k]) == 1 for k in idx]
    colors = [nearest_color(stats.median_rgb[k]) if ok else None for k, ok in zip(idx, present)]
    shapes = [shape_of(float(stats.fill_ratio[k])) if ok else None for k, ok in zip(idx, present)]
    pairs = Counter((c, s) for c, s in zip(colors, shapes) if c is not None)
    consistent = bool(pairs) and pairs.most_common(1)[0][1] >= VIDEO_MIN_CONSISTENT_FRAMES
    top_color = Counter(c for c in colors if c is not None).most_common(1)
    top_shape = Counter(s for s in shapes if s is not None).most_common(1)
    has_object = sum(present) >= VIDEO_MIN_CONSISTENT_FRAMES
    color_ok = has_object and bool(top_color) and top_color[0][0] == cap.color
    shape_ok = has_object and bool(top_shape) and top_shape[0][0] == cap.shape
    displacement = None
    direction_ok = False
    first, last = idx[0], idx[-1]
    if present[0] and present[-1]:
        horizontal = cap.direction in ("left", "right")
        coord = stats.cx if horizontal else stats.cy
        displacement = float(coord[last] - coord[first])
        direction_ok = direction_sign(cap.direction) * displacement >= VIDEO_MIN_DISPLACEMENT
    return VideoVerdict(
        caption=cap.text,
        split=cap.split,
        frames_with_object=int(sum(present)),
        colors=colors,
        shapes=shapes,
        fill_ratios=[float(stats.fill_ratio[k]) if ok else None for k, ok in zip(idx, present)],
        displacement=displacement,
        object=bool(has_object),
        color_ok=bool(color_ok),
        shape_ok=bool(shape_ok),
        direction_ok=bool(direction_ok),
        consistent=bool(consistent),
        strict=bool(has_object and color_ok and shape_ok and direction_ok and consistent),
    )


# ----------------------------------------------------------------------------------------------- aggregates
IMAGE_METRICS = {
    "object_rate": "object",
    "color_acc": "color_ok",
    "shape_acc": "shape_ok",
    "position_acc": "position_ok",
    "strict_acc": "strict",
}
VIDEO_METRICS = {
    "object_rate": "object",
    "color_acc": "color_ok",
    "shape_acc": "shape_ok",
    "direction_acc": "direction_ok",
    "consistency": "consistent",
    "strict_acc": "strict",
}


def _aggregate(verdicts: list, metrics: dict[str, str]) -> dict:
    out: dict = {"n": len(verdicts)}
    for name, attr in metrics.items():
        values = [getattr(v, attr) for v in verdicts if getattr(v, attr) is not None]
        out[name] = float(np.mean(values)) if values else None
        if attr == "position_ok":
            out["n_positioned"] = len(values)
    return out


def summarize(verdicts: list[ImageVerdict] | list[VideoVerdict]) -> dict[str, dict]:
    """Aggregate verdicts: ``{"all": ..., "held_in": ..., "held_out": ..., "circle": ..., "square": ...}``.

    Each entry has ``n``, ``object_rate``, ``color_acc``, ``shape_acc``, ``strict_acc`` and, for images,
    ``position_acc`` (over the captions that name a position, ``n_positioned`` of them); for videos,
    ``direction_acc`` and ``consistency``. A rate is ``None`` when it has no samples. The shape entries
    (captions naming that shape, both splits) show where a model fails, e.g. squares drawn with round corners.
    """
    video = bool(verdicts) and isinstance(verdicts[0], VideoVerdict)
    metrics = VIDEO_METRICS if video else IMAGE_METRICS
    named = [(parse_video_caption if video else parse_caption)(v.caption).shape for v in verdicts]
    return {
        "all": _aggregate(verdicts, metrics),
        "held_in": _aggregate([v for v in verdicts if v.split == "held_in"], metrics),
        "held_out": _aggregate([v for v in verdicts if v.split == "held_out"], metrics),
        **{
            shape: _aggregate([v for v, n in zip(verdicts, named) if n == shape], metrics)
            for shape in SHAPES
            if shape in named
        },
    }


def flatten_summary(summary: dict[str, dict]) -> dict[str, float]:
    """:func:`summarize`'s figures as flat ``oracle/{group}/{metric}`` keys (``None`` and counts of positions
    dropped), as reports and logs hold them."""
    return {
        f"oracle/{group}/{k}": float(v)
        for group, values in summary.items()
        for k, v in values.items()
        if v is not None and k != "n_positioned"
    }
