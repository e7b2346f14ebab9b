"""``oracle``: the shapes world's exact judge as a reward (evaluation only; not differentiable).

Wraps :func:`visalign.toyworld.judge_images` / :func:`~visalign.toyworld.judge_videos` (docs/shapes_world.md).
``score="strict"`` (default): 1 when every attribute the caption names is right, else 0; ``score="partial"``:
the fraction of the named attributes that are right (images: colour, shape and position when named; videos:
colour, shape, direction and temporal consistency); ``score="dense"``: the partial score with shape as a credit
that falls linearly from 1 inside the caption's fill-ratio band to 0 at 0.15 outside it, and for videos per-frame
fractions and the displacement over the 6 px threshold instead of the 0/1 verdicts: a training signal that moves
before any verdict flips (a rounded square earns more the sharper its corners); ``score="color" | "shape" |
"position" | "direction" | "consistent"``: that attribute alone, 0/1 (``valid=False`` where the caption does
not name it), e.g. to build preference data about one attribute (the layout and fidelity sets of
timestep-segment experts). Components hold each attribute as 0/1 (NaN where the caption names no position). A
prompt outside the shapes-world grammar cannot be judged: ``valid=False``. It measures what trainers are meant
to learn: train on it only as a rule-based reward (as GenEval's is), and judge on seeds the run never saw.
"""

from __future__ import annotations

import math

import torch

from .base import Reward, RewardOutput
from .specs import BUILTIN_SPECS

IMAGE_ATTRIBUTES = ("object", "color_ok", "shape_ok", "position_ok")
VIDEO_ATTRIBUTES = ("object", "color_ok", "shape_ok", "direction_ok", "consistent")
SINGLE = {"color": "color_ok", "shape": "shape_ok", "position": "position_ok", "direction": "direction_ok",
          "consistent": "consistent"}  # fmt: skip


class OracleReward(Reward):
    """The shapes-world oracle.

    Args:
        score: ``"strict"``, ``"partial"``, ``"dense"`` or one attribute (``"color"``, ``"shape"``, ``"position"``,
            ``"direction"``, ``"consistent"``).
        batch_size: media per chunk.
        shape_width: with ``score="dense"``, how far outside the named shape's fill-ratio band the shape credit
            falls to 0 (0.15; smaller tells a nearly right shape, e.g. a square with rounded corners, from a right
            one).
    """

    def __init__(self, score: str = "strict", batch_size: int = 64, shape_width: float = 0.15):
        if score not in ("strict", "partial", "dense", *SINGLE):
            names = ", ".join(SINGLE)
            raise ValueError(f"score must be 'strict', 'partial', 'dense' or one of {names}, got {score!r}")
        if shape_width <= 0:
            raise ValueError(f"shape_width must be > 0, got {shape_width}")
        super().__init__(BUILTIN_SPECS["oracle"], batch_size)
        self.score, self.shape_width = score, float(shape_width)

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        from visalign.toyworld import CaptionError, judge_images, judge_videos, parse_caption, parse_video_caption
        from visalign.toyworld.oracle import dense_score

        video = media.ndim == 5
        parse = parse_video_caption if video else parse_caption
        attributes = VIDEO_ATTRIBUTES if video else IMAGE_ATTRIBUTES
        single = SINGLE.get(self.score)
        if single is not None and single not in attributes:
            raise ValueError(f"oracle score {self.score!r} applies to {'images' if video else 'videos'} only")
        ok = []
        for p in prompts:
            try:
                parse(p)
                ok.append(True)
            except CaptionError:
                ok.append(False)
        keep = [i for i, good in enumerate(ok) if good]
        judge = judge_videos if video else judge_images
        verdicts = dict(zip(keep, judge(media[keep], [prompts[i] for i in keep]))) if keep else {}
        scores, comps = [], {a: [] for a in attributes}
        for i in range(len(prompts)):
            v = verdicts.get(i)
            values = {a: math.nan if v is None or getattr(v, a) is None else float(getattr(v, a)) for a in attributes}
            for a in attributes:
                comps[a].append(values[a])
            if v is None:
                scores.append(0.0)
            elif self.score == "strict":
                scores.append(float(v.strict))
            elif self.score == "dense":
                scores.append(dense_score(v, parse(prompts[i]), self.shape_width))
            elif single is not None:
                named = not math.isnan(values[single])
                scores.append(values[single] if named else 0.0)
                ok[i] = ok[i] and named
            else:
                named = [values[a] for a in attributes if a != "object" and not math.isnan(values[a])]
                scores.append(sum(named) / len(named))
        device = media.device
        return RewardOutput(
            torch.tensor(scores, device=device),
            {a: torch.tensor(c, device=device) for a, c in comps.items()},
            torch.tensor(ok, device=device),
        )


def load_oracle(score: str = "strict", batch_size: int = 64, shape_width: float = 0.15) -> OracleReward:
    """The oracle (no weights)."""
    return OracleReward(score, batch_size, shape_width).freeze()


def random_oracle(size: str = "tiny", score: str = "strict") -> OracleReward:
    """The oracle has no weights: the same as :func:`load_oracle`."""
    return load_oracle(score)
