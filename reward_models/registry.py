"""The reward registry and spec strings: ``build_reward("hps-v2.1:1.0,clip(model=ViT-B-32):0.5")``.

Spec grammar (whitespace around separators is ignored)::

    spec   := term ("," term)*
    term   := NAME ["(" args ")"] [":" WEIGHT]      hps-v2.1   clip(model=ViT-B-32,hessel=true):0.5
            | NAME ":" ARG                          sugar for NAME(ARG), when ARG is not a number
    args   := arg ("," arg)*
    arg    := KEY "=" VALUE | VALUE                 VALUE: true/false, none, int, float, 'quoted' or "quoted"
                                                    text, or bare text (may hold balanced parentheses, so a
                                                    value can itself be a spec: video(reward=clip(hessel=true)))

A single term without a weight builds that reward itself; anything else (several terms, or a weight) builds a
:class:`~reward_models.compose.Composite` (weighted sum, default weight 1; optional normalisation). Options are
the keyword arguments of the reward's loader (e.g. :func:`reward_models.hps.load_hps`); unknown options are an
error that lists the accepted ones. Keyword arguments of :func:`build_reward` are options of a single-term
spec. Loaders resolve hub ids or local paths when called; nothing downloads at import.

Every entry also has a ``random`` builder: the same architecture with random weights (``size="tiny"`` for
tests and CPU benchmarks, ``"full"`` for the published shapes), used by :func:`build_random_reward`.

Adding a reward: a loader ``load_x(**options) -> Reward``, a ``random_x(size="tiny", **options) -> Reward``,
a :class:`~reward_models.base.RewardSpec`, and one :func:`register_reward` call (built-ins: the table below).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Reward, RewardSpec, RewardSpecError, UnknownRewardError, place
from .specs import BUILTIN_SPECS


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: its spec, its loader and random builder (callables or ``"module:function"``)."""

    spec: RewardSpec
    load: Callable[..., Reward] | str
    random: Callable[..., Reward] | str | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, RewardEntry] = {}


def register_reward(
    spec: RewardSpec,
    load: Callable[..., Reward] | str,
    random: Callable[..., Reward] | str | None = None,
    *,
    fixed: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> RewardEntry:
    """Register a reward under ``spec.name``.

    Args:
        spec: metadata.
        load: ``load(*args, **options) -> Reward`` from published weights (or ``"module:function"``).
        random: ``random(size="tiny", **options) -> Reward`` with random weights (for tests and benchmarks).
        fixed: keyword arguments always passed to both (e.g. ``{"version": "v2.0"}``); users cannot override.
        replace: allow re-registering an existing name.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", spec.name):
        raise ValueError(f"reward names are lower-case [a-z0-9._-], got {spec.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"reward {spec.name!r} is already registered")
    entry = RewardEntry(spec, load, random, dict(fixed or {}))
    _REGISTRY[spec.name] = entry
    return entry


for _name, _module, _load, _random, _fixed in [
    ("clip", "clip", "load_clip", "random_clip", {}),
    ("hps-v2", "hps", "load_hps", "random_hps", {"version": "v2.0"}),
    ("hps-v2.1", "hps", "load_hps", "random_hps", {"version": "v2.1"}),
    ("pickscore", "pickscore", "load_pickscore", "random_pickscore", {}),
    ("aesthetic", "aesthetic", "load_aesthetic", "random_aesthetic", {}),
    ("imagereward", "imagereward", "load_imagereward", "random_imagereward", {}),
    ("discriminator", "discriminator", "load_discriminator", "random_discriminator", {}),
    ("video", "video", "load_video", "random_video", {}),
    ("temporal-consistency", "video", "load_temporal_consistency", "random_temporal_consistency", {}),
    ("oracle", "oracle", "load_oracle", "random_oracle", {}),
    ("stats", "stats", "load_stats", "random_stats", {}),
    ("vlm-judge", "vlm_judge", "load_vlm_judge", "random_vlm_judge", {}),
    ("openai-judge", "openai_judge", "load_openai_judge", "random_openai_judge", {}),
    ("remote", "remote", "load_remote", "random_remote", {}),
]:
    register_reward(
        BUILTIN_SPECS[_name], f"reward_models.{_module}:{_load}", f"reward_models.{_module}:{_random}", fixed=_fixed
    )


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def reward_spec(name: str) -> RewardSpec:
    """Metadata of a registered reward (without building it)."""
    return _entry(name).spec


def _entry(name: str) -> RewardEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownRewardError(f"unknown reward {name!r}{hint}; registered rewards: {', '.join(list_rewards())}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------------------------- parsing
@dataclass
class RewardTerm:
    """One term of a spec string: ``name(args, key=value):weight``."""

    name: str
    args: list[Any]
    options: dict[str, Any]
    weight: float | None
    text: str  # the term without its weight, used as the component name in composites


def _split_top_level(text: str, sep: str, spec: str) -> list[str]:
    """Split at ``sep`` outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise RewardSpecError(f"unbalanced ')' in reward spec {spec!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise RewardSpecError(f"unclosed {'quote' if quote else '('} in reward spec {spec!r}")
    parts.append(text[start:])
    return parts


def _value(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_term(term: str, spec: str) -> RewardTerm:
    term = term.strip()
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", term)
    if not match:
        raise RewardSpecError(f"expected a reward name at {term!r} in reward spec {spec!r}")
    name, rest = match.group(0), term[match.end() :].strip()
    args, options, weight, body = [], {}, None, name
    if rest.startswith("("):
        close = _matching_paren(rest, spec)
        inner, rest = rest[1:close], rest[close + 1 :].strip()
        body = f"{name}({inner})"
        for item in _split_top_level(inner, ",", spec) if inner.strip() else []:
            key_value = _split_top_level(item, "=", spec)
            if len(key_value) == 1:
                if options:
                    raise RewardSpecError(f"positional value {item.strip()!r} after key=value options in {term!r}")
                args.append(_value(item))
                continue
            key, value = key_value[0].strip(), "=".join(key_value[1:])
            if not key.isidentifier():
                raise RewardSpecError(f"bad option name {key!r} in {term!r}")
            if key in options:
                raise RewardSpecError(f"option {key!r} given twice in {term!r}")
            options[key] = _value(value)
        if rest:
            if not rest.startswith(":") or _float(rest[1:]) is None:
                raise RewardSpecError(f"expected ':WEIGHT' after {body!r}, got {rest!r} in reward spec {spec!r}")
            weight = _float(rest[1:])
    elif rest.startswith(":"):
        value = rest[1:].strip()
        if _float(value) is not None:
            weight = _float(value)
        elif value:
            args.append(_value(value))
            body = term
        else:
            raise RewardSpecError(f"empty weight after {name!r} in reward spec {spec!r}")
    elif rest:
        raise RewardSpecError(f"unexpected {rest!r} after {name!r} in reward spec {spec!r}")
    return RewardTerm(name, args, options, weight, body)


def _matching_paren(text: str, spec: str) -> int:
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise RewardSpecError(f"unclosed '(' in reward spec {spec!r}")


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """Parse a spec string into terms (see the module docstring for the grammar)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError("empty reward spec; name a reward, e.g. 'hps-v2.1' (see list_rewards())")
    terms = []
    for part in _split_top_level(spec, ",", spec):
        if not part.strip():
            raise RewardSpecError(f"empty term in reward spec {spec!r}")
        terms.append(_parse_term(part, spec))
    return terms


# ----------------------------------------------------------------------------------------------- building
def _resolve(ref: Callable | str) -> Callable:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _call(entry: RewardEntry, ref: Callable | str, args: list, options: dict) -> Reward:
    clash = sorted(set(options) & set(entry.fixed))
    if clash:
        raise RewardSpecError(f"{entry.spec.name} fixes {clash}; use another registered name instead")
    fn = _resolve(ref)
    kwargs = {**entry.fixed, **options}
    signature = inspect.signature(fn)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        accepted = [p for p in signature.parameters if p not in entry.fixed]
        raise RewardSpecError(f"{entry.spec.name}: {e}; accepted options: {', '.join(accepted)}") from None
    return fn(*args, **kwargs)


def _build_term(term: RewardTerm, options: dict, size: str | None) -> Reward:
    entry = _entry(term.name)
    opts = {**term.options, **options}
    if size is None:
        return _call(entry, entry.load, term.args, opts)
    if entry.random is None:
        raise RewardSpecError(f"{term.name} has no random-weight builder")
    return _call(entry, entry.random, term.args, {"size": size, **opts})


def _build(spec, size, device, dtype, normalize, stats, options) -> Reward:
    if isinstance(spec, Reward):
        if options:
            raise RewardSpecError("options cannot be applied to an already built reward")
        return place(spec, device, dtype)
    from .compose import Composite

    terms = parse_reward_spec(spec)
    if len(terms) == 1 and terms[0].weight is None and normalize == "none" and not stats:
        return place(_build_term(terms[0], options, size), device, dtype)
    if options:
        raise RewardSpecError(
            f"keyword options {sorted(options)} apply to single-reward specs; put options in each term's "
            "parentheses, e.g. 'clip(model=ViT-B-32):0.5'"
        )
    labels = [t.name for t in terms]
    labels = [t.name if labels.count(t.name) == 1 else t.text for t in terms]
    members = [
        (label, _build_term(t, {}, size), 1.0 if t.weight is None else t.weight) for label, t in zip(labels, terms)
    ]
    return place(Composite(members, normalize, stats), device, dtype)


def build_reward(
    spec: str | Reward,
    *,
    device=None,
    dtype=None,
    normalize: str = "none",
    stats: dict[str, tuple[float, float]] | None = None,
    **options,
) -> Reward:
    """Build a reward (or a weighted composite) from a spec string, with published weights.

    Args:
        spec: spec string (grammar in the module docstring) or an already built reward.
        device: where to put it (``None``: CPU, as loaded).
        dtype: weights dtype (``"bf16"``, ``torch.float16``, ...; ``None`` keeps float32). Preprocessing and
            the returned scores are float32 whatever the dtype.
        normalize: composite normalisation (``"none"``, ``"normalise-then-sum"``, ``"sum-then-normalise"``).
        stats: fixed statistics for that normalisation (see :class:`~reward_models.compose.Composite`).
        **options: loader options of a single-term spec (``build_reward("hps-v2.1", checkpoint=path)``).

    Raises:
        UnknownRewardError: a name that is not registered (the message lists the registered ones).
        RewardSpecError: a malformed spec or an unknown option.
        CheckpointError: weights that cannot be found or loaded.
    """
    return _build(spec, None, device, dtype, normalize, stats, options)


def build_random_reward(
    spec: str,
    size: str = "tiny",
    *,
    device=None,
    dtype=None,
    normalize: str = "none",
    stats: dict[str, tuple[float, float]] | None = None,
    **options,
) -> Reward:
    """Like :func:`build_reward`, with random weights of the same architecture (``size``: ``"tiny"``/``"full"``)."""
    if size not in ("tiny", "full"):
        raise RewardSpecError(f"size must be 'tiny' or 'full', got {size!r}")
    return _build(spec, size, device, dtype, normalize, stats, options)
