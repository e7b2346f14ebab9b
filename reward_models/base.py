"""The reward protocol: one call signature, one output type, one media convention for every scorer.

```
reward(media, prompts) -> RewardOutput(scores [B] float32, components {name: [B]}, valid [B] bool)
media: float tensor in [0, 1], RGB, channel-first; images [B, 3, H, W], videos [B, T, 3, H, W]
reward.spec: name, modalities, needs_prompt, differentiable, pairwise, nominal_range
```

A reward is a :class:`Reward` (a ``torch.nn.Module``): ``.to(device, dtype)`` moves and casts it like any
module. :meth:`Reward.forward` validates the input (one clear :class:`RewardInputError` per problem), splits the
batch into chunks of ``batch_size``, calls the scorer's :meth:`Reward.score_batch` per chunk, and returns float32
scores on the device of the input media. The graph from pixels to scores is kept only when the media require
grad and the reward is differentiable; otherwise scoring runs without autograd (less memory).

Scorers return **raw** scores (the checkpoint's own scale); scaling and normalising are explicit wrappers
(:mod:`reward_models.compose`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from visalign.config import resolve_dtype as config_resolve_dtype
from visalign.errors import VisalignError

MODALITIES = ("image", "video")


# ----------------------------------------------------------------------------------------------- errors
class RewardError(VisalignError):
    """A reward problem the user can fix (base class of the errors below)."""


class UnknownRewardError(RewardError):
    """A reward name that is not registered; the message lists the registered ones."""


class RewardSpecError(RewardError):
    """A malformed reward spec string or an invalid option."""


class RewardInputError(RewardError):
    """Media or prompts that break the protocol (shape, dtype, value range, counts)."""


class CheckpointError(RewardError):
    """A checkpoint that is missing, unreadable or does not fit the architecture."""


# ----------------------------------------------------------------------------------------------- spec / output
@dataclass(frozen=True)
class RewardSpec:
    """What a reward is, without building it.

    Attributes:
        name: registry name (``"hps-v2.1"``).
        modalities: which media it scores directly: ``("image",)``, ``("video",)`` or both.
        needs_prompt: whether each sample needs its prompt.
        differentiable: whether scores carry gradients to the input pixels.
        pairwise: whether it compares two samples (judges); pointwise rewards are ``False``.
        nominal_range: the typical range of raw scores of the published checkpoint (for plots and for choosing
            an affine scale); not a bound. ``None`` when unknown.
        description: one line for ``list_rewards``.
    """

    name: str
    modalities: tuple[str, ...] = ("image",)
    needs_prompt: bool = True
    differentiable: bool = True
    pairwise: bool = False
    nominal_range: tuple[float, float] | None = None
    description: str = ""

    def __post_init__(self):
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")


@dataclass
class RewardOutput:
    """Scores of a batch.

    Attributes:
        scores: ``[B]`` float32 raw scores.
        components: named ``[B]`` tensors (members of a composite, sub-scores, un-rescaled values).
        valid: ``[B]`` bool; ``False`` where the reward could not score a sample (its score is then meaningless,
            e.g. an unparsable judge answer). Defaults to all ``True``.
    """

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None

    def __post_init__(self):
        if self.scores.ndim != 1:
            raise ValueError(f"scores must have shape [B], got {tuple(self.scores.shape)}")
        self.scores = self.scores.float()
        if self.valid is None:
            self.valid = torch.ones(self.scores.shape, dtype=torch.bool, device=self.scores.device)
        for name, value in self.components.items():
            if value.shape != self.scores.shape:
                shape, expected = tuple(value.shape), tuple(self.scores.shape)
                raise ValueError(f"component {name!r} has shape {shape}, expected {expected}")

    def __len__(self) -> int:
        return self.scores.shape[0]

    def to(self, device: torch.device | str) -> RewardOutput:
        return RewardOutput(
            self.scores.to(device),
            {k: v.to(device) for k, v in self.components.items()},
            self.valid.to(device),
        )

    def detach(self) -> RewardOutput:
        return RewardOutput(self.scores.detach(), {k: v.detach() for k, v in self.components.items()}, self.valid)

    @staticmethod
    def cat(outputs: Sequence[RewardOutput]) -> RewardOutput:
        """Concatenate chunk outputs along the batch (components must have the same names in every chunk)."""
        if len(outputs) == 1:
            return outputs[0]
        names = list(outputs[0].components)
        return RewardOutput(
            torch.cat([o.scores for o in outputs]),
            {n: torch.cat([o.components[n] for o in outputs]) for n in names},
            torch.cat([o.valid for o in outputs]),
        )


# ----------------------------------------------------------------------------------------------- validation
def media_modality(media: torch.Tensor, name: str = "reward") -> str:
    """Check the media convention and return ``"image"`` or ``"video"``.

    Raises:
        RewardInputError: not a float tensor, wrong rank or channel count, NaN, or values outside ``[0, 1]``.
    """
    if not isinstance(media, torch.Tensor):
        raise RewardInputError(f"{name}: media must be a torch.Tensor, got {type(media).__name__}")
    if not media.is_floating_point():
        raise RewardInputError(
            f"{name}: media must be float in [0, 1], got dtype {media.dtype} (for uint8 use media.float() / 255)"
        )
    if media.ndim == 4 and media.shape[1] == 3:
        modality = "image"
    elif media.ndim == 5 and media.shape[2] == 3:
        modality = "video"
    else:
        raise RewardInputError(
            f"{name}: expected images [B, 3, H, W] or videos [B, T, 3, H, W] (RGB, channel-first), "
            f"got shape {tuple(media.shape)}"
        )
    if media.numel():
        lo, hi = torch.aminmax(media.detach())
        lo, hi = float(lo), float(hi)
        if lo != lo or hi != hi:
            raise RewardInputError(f"{name}: media contain NaN")
        if lo < 0.0 or hi > 1.0:
            hint = " (pixels in [-1, 1]? use (x + 1) / 2)" if lo < 0 else " (pixels in [0, 255]? divide by 255)"
            raise RewardInputError(f"{name}: media must be in [0, 1], got min {lo:.4g}, max {hi:.4g}{hint}")
    return modality


def check_prompts(prompts: Sequence[str] | None, count: int, spec: RewardSpec) -> list[str] | None:
    """Check that there is one string prompt per sample (or none, for rewards that need none)."""
    if prompts is None:
        if spec.needs_prompt:
            raise RewardInputError(f"{spec.name} needs one prompt per sample; got no prompts")
        return None
    if isinstance(prompts, str):
        raise RewardInputError(f"{spec.name}: prompts must be a list of strings, one per sample (got one string)")
    prompts = list(prompts)
    if len(prompts) != count:
        raise RewardInputError(
            f"{spec.name}: got {count} media but {len(prompts)} prompts; pass one prompt per sample"
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RewardInputError(f"{spec.name}: prompt {i} is {type(p).__name__}, not str")
    return prompts


# ----------------------------------------------------------------------------------------------- protocol
class Reward(nn.Module):
    """Base class of every reward: validation, chunking, device/dtype and autograd handling.

    Subclasses set ``spec`` (pass it to ``__init__``) and implement :meth:`score_batch`. Parameters are frozen
    (``requires_grad=False``) and the module is in eval mode after :meth:`freeze`, which loaders call.

    Args:
        spec: the reward's metadata.
        batch_size: media per forward chunk (memory bound; results do not depend on it).
    """

    def __init__(self, spec: RewardSpec, batch_size: int = 16):
        super().__init__()
        if batch_size < 1:
            raise RewardSpecError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.batch_size = int(batch_size)
        # follows .to(device, dtype) even for rewards without parameters (the oracle)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    # ---------------------------------------------------------------- device / dtype
    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the scorer's network (preprocessing always runs in float32)."""
        return self._anchor.dtype

    def freeze(self) -> Reward:
        """Frozen, eval-mode reward (what every loader returns)."""
        self.requires_grad_(False)
        return self.eval()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        # cached text embeddings live on the old device / dtype
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, TextEmbeddingCache):
                    value.clear()
        return out

    # ---------------------------------------------------------------- scoring
    def forward(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        """Score a batch.

        Args:
            media: images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]``, float in ``[0, 1]``, any device.
            prompts: ``B`` prompts (required when ``spec.needs_prompt``).

        Returns:
            :class:`RewardOutput` with float32 scores on ``media.device``.
        """
        modality = media_modality(media, self.spec.name)
        if modality not in self.spec.modalities:
            hint = f"; wrap it: video(reward={self.spec.name})" if modality == "video" else ""
            kinds = " and ".join(f"{m}s" for m in self.spec.modalities)
            raise RewardInputError(f"{self.spec.name} scores {kinds}, not {modality}s{hint}")
        prompts = check_prompts(prompts, media.shape[0], self.spec)
        if media.shape[0] == 0:
            empty = torch.zeros(0, device=media.device)
            return RewardOutput(empty)
        grad = torch.is_grad_enabled() and media.requires_grad and self.spec.differentiable
        outputs = []
        with torch.set_grad_enabled(grad):
            for start in range(0, media.shape[0], self.batch_size):
                stop = start + self.batch_size
                out = self.score_batch(media[start:stop], None if prompts is None else prompts[start:stop])
                outputs.append(out if isinstance(out, RewardOutput) else RewardOutput(out))
        return RewardOutput.cat(outputs).to(media.device)

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput | torch.Tensor:
        """Score one chunk (already validated). Returns ``[b]`` scores or a :class:`RewardOutput`."""
        raise NotImplementedError

    def pixels(self, media: torch.Tensor) -> torch.Tensor:
        """Media on the reward's device in float32 (preprocessing precision), keeping the graph."""
        return media.to(device=self.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, batch_size={self.batch_size}"


class TextEmbeddingCache:
    """Embeddings of prompts, computed once per unique prompt (least recently used ones are dropped).

    Text never needs gradients (rewards differentiate with respect to pixels), so entries are computed under
    ``torch.no_grad``. The owning :class:`Reward` clears the cache when it moves to another device or dtype.

    Args:
        encode: ``list[str] -> [N, D]`` tensor.
        max_size: number of prompts kept.
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_size: int = 4096):
        self.encode = encode
        self.max_size = max_size
        self._store: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[len(prompts), D]`` embeddings."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            with torch.no_grad():
                new = self.encode(missing)
            for prompt, emb in zip(missing, new):
                self._store[prompt] = emb.detach()
        out = torch.stack([self._store[p] for p in prompts])
        for p in dict.fromkeys(prompts):
            self._store.move_to_end(p)
        while len(self._store) > self.max_size:
            self._store.popitem(last=False)
        return out


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``torch.bfloat16`` / ``None`` to a torch dtype (or ``None``)."""
    return config_resolve_dtype(dtype, RewardSpecError)


def place(reward: Reward, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Reward:
    """Move a (frozen) reward to ``device`` and cast its floating weights to ``dtype`` (``None`` keeps them)."""
    dtype = resolve_dtype(dtype)
    if device is not None:
        reward = reward.to(device=device)
    if dtype is not None:
        reward = reward.to(dtype=dtype)
    return reward
