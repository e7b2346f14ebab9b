"""Exact renderers of the shapes world: 64x64 images and 8-frame 32x32 videos (docs/shapes_world.md).

Rasterisation samples each pixel at its centre ``(j + 0.5, i + 0.5)`` with no anti-aliasing, so every pixel
is either the background (240, 240, 240) or the object's palette colour and the oracle's thresholds hold
exactly. Objects sit on the integer pixel grid: a shape of side ``s`` at an integer top-left corner is the
same mask wherever it is, so a caption's position constraint (on the centroid) is met exactly, without
rejection sampling. Videos move along a straight line at 1.5-2.5 px per frame and are rasterised at the
rounded position of each frame (sub-pixel offsets would change a small shape's fill ratio).

Seeding: sample ``i`` of a render with seed ``s`` uses ``numpy.random.default_rng((s, i))``, so any sample
regenerates alone, whatever the batch.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .captions import BACKGROUND, PALETTE, Caption, VideoCaption, parse_caption, parse_video_caption

IMAGE_SIZE = 64
IMAGE_OBJECT_SIZES = (16, 30)  # inclusive bounding-box side range, pixels
VIDEO_SIZE = 32
VIDEO_FRAMES = 8
VIDEO_OBJECT_SIZES = (8, 14)
VIDEO_SPEEDS = (1.5, 2.5)  # pixels per frame
# centroid thresholds of a named position (x right, y down, pixel indices)
POSITION_LOW, POSITION_HIGH = 24.0, 40.0
# rendered positions keep this clearance from the thresholds, so ground truth is never borderline
POSITION_MARGIN = 1.0


@functools.cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """The ``[size, size]`` bool mask of a shape whose bounding box is the whole array.

    Circle: disc inscribed in the box. Square: the box. Triangle: upward isosceles, apex at the top centre,
    base along the bottom edge. A pixel is inside when its centre is (half-open edges: a square is exactly
    ``size`` pixels wide).
    """
    v, u = np.mgrid[0:size, 0:size] + 0.5
    half = size / 2
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = (u - half) ** 2 + (v - half) ** 2 < half**2
    elif shape == "triangle":
        mask = np.abs(u - half) < v / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


@functools.cache
def mask_centroid(shape: str, size: int) -> tuple[float, float]:
    """Centroid ``(x, y)`` of :func:`shape_mask` in pixel indices relative to its top-left corner."""
    ys, xs = np.nonzero(shape_mask(shape, size))
    return float(xs.mean()), float(ys.mean())


@dataclass(frozen=True)
class Scene:
    """One rendered image: what is drawn where.

    Attributes:
        caption: the caption it was drawn for.
        color, shape: the object's attributes.
        size: bounding-box side in pixels.
        x, y: top-left corner of the bounding box (pixel indices).
        cx, cy: centroid of the drawn pixels (pixel indices; x right, y down).
    """

    caption: str
    color: str
    shape: str
    size: int
    x: int
    y: int
    cx: float
    cy: float

    def to_dict(self) -> dict:
        return asdict(self)


def _allowed_range(offset: float, size: int, canvas: int, bound: str | None) -> np.ndarray:
    """Integer corner coordinates that keep the object inside and its centroid on the named side."""
    corners = np.arange(0, canvas - size + 1)
    centroid = corners + offset
    if bound == "low":
        corners = corners[centroid < POSITION_LOW - POSITION_MARGIN]
    elif bound == "high":
        corners = corners[centroid > POSITION_HIGH + POSITION_MARGIN]
    return corners


def sample_scene(caption: Caption | str, rng: np.random.Generator) -> Scene:
    """Draw a scene for ``caption``: size uniform in 16-30, position uniform among those that satisfy it."""
    caption = parse_caption(caption) if isinstance(caption, str) else caption
    size = int(rng.integers(IMAGE_OBJECT_SIZES[0], IMAGE_OBJECT_SIZES[1] + 1))
    ox, oy = mask_centroid(caption.shape, size)
    x_bound = {"left": "low", "right": "high"}.get(caption.position or "")
    y_bound = {"top": "low", "bottom": "high"}.get(caption.position or "")
    xs = _allowed_range(ox, size, IMAGE_SIZE, x_bound)
    ys = _allowed_range(oy, size, IMAGE_SIZE, y_bound)
    x, y = int(rng.choice(xs)), int(rng.choice(ys))
    return Scene(caption.text, caption.color, caption.shape, size, x, y, x + ox, y + oy)


def draw(shape: str, color: str, size: int, x: int, y: int, canvas: int) -> np.ndarray:
    """``[canvas, canvas, 3]`` uint8: the background with one object at top-left ``(x, y)``."""
    return paint(shape_mask(shape, size), color, x, y, canvas)


def paint(mask: np.ndarray, color: str, x: int, y: int, canvas: int) -> np.ndarray:
    """``[canvas, canvas, 3]`` uint8: the background with ``mask`` (``[h, w]`` bool) in ``color`` at top-left
    ``(x, y)``."""
    h, w = mask.shape
    if x < 0 or y < 0 or x + w > canvas or y + h > canvas:
        raise ValueError(f"object of size {w}x{h} at ({x}, {y}) does not fit a {canvas}x{canvas} canvas")
    image = np.empty((canvas, canvas, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[y : y + h, x : x + w][mask] = PALETTE[color]
    return image


def draw_scene(scene: Scene) -> np.ndarray:
    """``[64, 64, 3]`` uint8 image of a scene."""
    return draw(scene.shape, scene.color, scene.size, scene.x, scene.y, IMAGE_SIZE)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[..., H, W, 3]`` uint8 to ``[..., 3, H, W]`` float32 in ``[0, 1]`` (the visalign media convention)."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 255


def render_images(captions: list[str | Caption], seed: int, start: int = 0) -> tuple[torch.Tensor, list[Scene]]:
    """Render one image per caption; image ``k`` uses ``default_rng((seed, start + k))``.

    Returns:
        ``[N, 3, 64, 64]`` float32 in ``[0, 1]`` and the ``N`` scenes.
    """
    scenes = [sample_scene(c, np.random.default_rng((seed, start + k))) for k, c in enumerate(captions)]
    empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    images = np.stack([draw_scene(s) for s in scenes]) if scenes else empty
    return to_tensor(images), scenes


# ----------------------------------------------------------------------------------------------- videos
@dataclass(frozen=True)
class VideoScene:
    """One rendered video: the object, its speed and the top-left corner in each frame.

    Attributes:
        xs, ys: per-frame top-left corners (pixel indices, after rounding the straight-line trajectory).
        speed: pixels per frame along the direction of motion.
    """

    caption: str
    color: str
    shape: str
    direction: str
    size: int
    speed: float
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def sample_video_scene(caption: VideoCaption | str, rng: np.random.Generator) -> VideoScene:
    """Draw a straight-line motion for ``caption`` that keeps the object inside every frame."""
    caption = parse_video_caption(caption) if isinstance(caption, str) else caption
    size = int(rng.integers(VIDEO_OBJECT_SIZES[0], VIDEO_OBJECT_SIZES[1] + 1))
    speed = float(rng.uniform(*VIDEO_SPEEDS))
    travel = speed * (VIDEO_FRAMES - 1)
    room = VIDEO_SIZE - size  # the largest corner coordinate
    sign = 1.0 if caption.direction in ("right", "down") else -1.0
    # rounding must not push the last frame outside: keep half a pixel of slack at the far end
    low, high = (0.0, room - travel - 0.5) if sign > 0 else (travel, room - 0.5)
    start = float(rng.uniform(low, max(low, high)))
    along = tuple(int(np.floor(start + sign * speed * f + 0.5)) for f in range(VIDEO_FRAMES))
    across = (int(rng.integers(0, room + 1)),) * VIDEO_FRAMES
    xs, ys = (along, across) if caption.direction in ("left", "right") else (across, along)
    return VideoScene(caption.text, caption.color, caption.shape, caption.direction, size, speed, xs, ys)


def draw_video(scene: VideoScene) -> np.ndarray:
    """``[8, 32, 32, 3]`` uint8 frames of a video scene."""
    return np.stack([draw(scene.shape, scene.color, scene.size, x, y, VIDEO_SIZE) for x, y in zip(scene.xs, scene.ys)])


def render_videos(
    captions: list[str | VideoCaption], seed: int, start: int = 0
) -> tuple[torch.Tensor, list[VideoScene]]:
    """Render one video per caption; video ``k`` uses ``default_rng((seed, start + k))``.

    Returns:
        ``[N, 8, 3, 32, 32]`` float32 in ``[0, 1]`` and the ``N`` scenes.
    """
    scenes = [sample_video_scene(c, np.random.default_rng((seed, start + k))) for k, c in enumerate(captions)]
    shape = (0, VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3)
    videos = np.stack([draw_video(s) for s in scenes]) if scenes else np.zeros(shape, np.uint8)
    return to_tensor(videos), scenes


# ----------------------------------------------------------------------------------------------- near misses
# A near-miss square's fill ratio stays in this range: under the oracle's 0.90 for a square (docs/shapes_world.md), and
# near it (a circle's is 0.785)
NEAR_MISS_FILL = (0.72, 0.88)


def near_miss_square_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A square spoilt the way generators spoil one: rounded corners, a tilt, wavy edges, or a mix.

    The shape is not in the world (the renderer draws exact shapes only); toy-clip can learn from it that
    "square" means sharp, straight, axis-aligned edges. Parameters are redrawn until the mask's fill ratio
    in its bounding box is within :data:`NEAR_MISS_FILL`, so a near miss is never a square by the oracle.

    Returns:
        a bool mask cropped to its bounding box (about ``size`` wide; a tilt makes it wider).
    """
    from .oracle import label_components  # the oracle imports this module's position thresholds

    n = size + 8
    v, u = np.mgrid[0:n, 0:n] + 0.5 - n / 2  # pixel centres about the middle
    half = size / 2
    while True:
        kind = rng.choice(["round", "tilt", "wave", "mix"])
        theta = np.deg2rad(rng.uniform(3, 20)) * rng.choice([-1, 1]) if kind in ("tilt", "mix") else 0.0
        radius = half * rng.uniform(0.5, 1.0) if kind in ("round", "mix") else 0.0
        x = u * np.cos(theta) + v * np.sin(theta)
        y = -u * np.sin(theta) + v * np.cos(theta)
        h = np.full_like(x, half)
        if kind in ("wave", "mix"):  # each edge bows in or out
            amp, phase = size * rng.uniform(0.02, 0.07), rng.uniform(0, 2 * np.pi)
            along = np.where(np.abs(x) > np.abs(y), y, x) / half  # position along the nearest edge, in [-1, 1]
            h = h + amp * np.sin(np.pi * (along + 1) / 2 + phase)
        dx = np.maximum(np.abs(x) - (h - radius), 0)
        dy = np.maximum(np.abs(y) - (h - radius), 0)
        mask = (dx**2 + dy**2 <= radius**2) & (np.abs(x) < h) & (np.abs(y) < h)
        labels = label_components(mask[None])[0]  # one piece: the oracle measures the largest component
        if len(np.unique(labels[mask])) != 1:
            continue
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        if NEAR_MISS_FILL[0] <= mask.mean() < NEAR_MISS_FILL[1]:
            return mask


def draw_near_miss(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """``[64, 64, 3]`` uint8: a near-miss square (:func:`near_miss_square_mask`) in ``scene``'s colour, centred
    where the scene's square is (shifted inside the canvas when a tilt makes it wider)."""
    mask = near_miss_square_mask(scene.size, rng)
    h, w = mask.shape
    x = int(np.clip(round(scene.x + (scene.size - w) / 2), 0, IMAGE_SIZE - w))
    y = int(np.clip(round(scene.y + (scene.size - h) / 2), 0, IMAGE_SIZE - h))
    return paint(mask, scene.color, x, y, IMAGE_SIZE)
