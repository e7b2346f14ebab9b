"""The shapes world: exact renderers, caption grammar and splits, the oracle, and the toy-model recipes.

See ``docs/shapes_world.md`` (the specification) and ``assets/toyworld/README.md`` (the shipped models and their
figures). Importing this package is light (numpy and torch only); the model recipes import Diffusers lazily.
"""

import json
from pathlib import Path

from .captions import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    HELD_OUT_COMBINATIONS,
    PALETTE,
    POSITIONS,
    SHAPES,
    Caption,
    CaptionError,
    VideoCaption,
    all_captions,
    all_video_captions,
    caption_texts,
    parse_caption,
    parse_video_caption,
)
from .oracle import ImageVerdict, VideoVerdict, judge_images, judge_videos, summarize
from .render import Scene, VideoScene, render_images, render_videos

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DIRECTIONS",
    "HELD_OUT_COMBINATIONS",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "Caption",
    "CaptionError",
    "ImageVerdict",
    "Scene",
    "VideoCaption",
    "VideoScene",
    "VideoVerdict",
    "all_captions",
    "all_video_captions",
    "caption_texts",
    "judge_images",
    "judge_videos",
    "parse_caption",
    "parse_video_caption",
    "render_images",
    "render_videos",
    "sampling_defaults",
    "summarize",
]


def sampling_defaults(model_dir) -> dict:
    """The ``sampling`` block of a shapes-world model's ``toyworld.json`` (empty for other pipelines)."""
    info = Path(model_dir) / "toyworld.json"
    if not info.is_file():
        return {}
    return json.loads(info.read_text()).get("sampling") or {}
