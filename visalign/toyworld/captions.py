"""The shapes world's vocabulary, caption grammar and held-in / held-out splits (docs/shapes_world.md).

Images: ``a {color} {shape}`` (18 captions, object anywhere) and ``a {color} {shape} on the {position}``
(72 captions): 90 in all. Videos: ``a {color} {shape} moving {direction}`` (72 captions).

Held-out combinations: every caption naming a ``purple triangle`` or a ``cyan square`` is never used for
pretraining or preference data; it measures compositional generalisation (10 image captions, 8 video captions).
The order of every list here is fixed: caption indices are stable across releases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import VisalignError

BACKGROUND: tuple[int, int, int] = (240, 240, 240)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 190),
    "cyan": (30, 185, 200),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
HELD_OUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("cyan", "square")})

SPLITS = ("held_in", "held_out")

_IMAGE_RE = re.compile(r"^a (\w+) (\w+)(?: on the (\w+))?$")
_VIDEO_RE = re.compile(r"^a (\w+) (\w+) moving (\w+)$")


class CaptionError(VisalignError):
    """A caption outside the shapes world's grammar."""


@dataclass(frozen=True)
class Caption:
    """An image caption: ``a {color} {shape}`` optionally ``on the {position}``."""

    color: str
    shape: str
    position: str | None = None

    @property
    def text(self) -> str:
        base = f"a {self.color} {self.shape}"
        return base if self.position is None else f"{base} on the {self.position}"

    @property
    def split(self) -> str:
        return "held_out" if (self.color, self.shape) in HELD_OUT_COMBINATIONS else "held_in"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class VideoCaption:
    """A video caption: ``a {color} {shape} moving {direction}``."""

    color: str
    shape: str
    direction: str

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"

    @property
    def split(self) -> str:
        return "held_out" if (self.color, self.shape) in HELD_OUT_COMBINATIONS else "held_in"

    def __str__(self) -> str:
        return self.text


def _check(word: str, allowed: tuple[str, ...], what: str, caption: str) -> None:
    if word not in allowed:
        raise CaptionError(f"caption {caption!r}: unknown {what} {word!r}; expected one of {', '.join(allowed)}")


def parse_caption(text: str) -> Caption:
    """Parse an image caption of the shapes world (exact grammar, lower case, single spaces)."""
    match = _IMAGE_RE.match(text.strip())
    if match is None:
        raise CaptionError(
            f"caption {text!r} is not in the shapes world's grammar: 'a {{color}} {{shape}}' or "
            "'a {color} {shape} on the {left|right|top|bottom}'"
        )
    color, shape, position = match.groups()
    _check(color, COLORS, "colour", text)
    _check(shape, SHAPES, "shape", text)
    if position is not None:
        _check(position, POSITIONS, "position", text)
    return Caption(color, shape, position)


def parse_video_caption(text: str) -> VideoCaption:
    """Parse a video caption ``a {color} {shape} moving {left|right|up|down}``."""
    match = _VIDEO_RE.match(text.strip())
    if match is None:
        raise CaptionError(
            f"caption {text!r} is not a shapes-world video caption: 'a {{color}} {{shape}} moving {{direction}}'"
        )
    color, shape, direction = match.groups()
    _check(color, COLORS, "colour", text)
    _check(shape, SHAPES, "shape", text)
    _check(direction, DIRECTIONS, "direction", text)
    return VideoCaption(color, shape, direction)


def all_captions(split: str | None = None) -> list[Caption]:
    """The 90 image captions (colour-major, then shape, then ``None, left, right, top, bottom``).

    Args:
        split: ``None`` for all 90, ``"held_in"`` (80) or ``"held_out"`` (10).
    """
    if split is not None and split not in SPLITS:
        raise CaptionError(f"unknown split {split!r}; expected one of {SPLITS}")
    captions = [Caption(c, s, p) for c in COLORS for s in SHAPES for p in (None, *POSITIONS)]
    return [c for c in captions if split is None or c.split == split]


def all_video_captions(split: str | None = None) -> list[VideoCaption]:
    """The 72 video captions; ``split`` as in :func:`all_captions` (64 held-in, 8 held-out)."""
    if split is not None and split not in SPLITS:
        raise CaptionError(f"unknown split {split!r}; expected one of {SPLITS}")
    captions = [VideoCaption(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    return [c for c in captions if split is None or c.split == split]


def caption_texts(split: str | None = None, video: bool = False) -> list[str]:
    """Caption strings of a split (see :func:`all_captions`)."""
    return [c.text for c in (all_video_captions(split) if video else all_captions(split))]
