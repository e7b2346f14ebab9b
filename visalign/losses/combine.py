"""Weighted sums of registered losses: ``"sigmoid:1.0,bco_pair:0.5,sft"`` -> one validated objective."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from visalign.errors import ConfigError, VisalignError

from .registry import _PAIR_LAYOUT, TENSOR_INPUTS, LossOutput, Tensor, available, get


def parse_loss_spec(spec: str | Sequence[str | tuple[str, float]]) -> list[tuple[str, float]]:
    """``"sigmoid:1.0,bco_pair:0.5,sft"`` or ``[("sigmoid", 1.0), "sft"]`` -> ``[(name, weight), ...]``.

    A missing weight is 1.0. Unknown names, repeated names, non-numeric or negative weights raise
    :class:`ConfigError`.
    """
    if isinstance(spec, str):
        items: list[str | tuple[str, float]] = [p for p in (s.strip() for s in spec.split(",")) if p]
    else:
        items = list(spec)
    if not items:
        raise ConfigError(f"empty loss specification {spec!r}; available losses: {', '.join(available())}")
    terms: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, str):
            name, _, weight_text = item.partition(":")
            name = name.strip()
            try:
                weight = float(weight_text) if weight_text.strip() else 1.0
            except ValueError:
                raise ConfigError(f"loss {name!r}: weight {weight_text.strip()!r} is not a number") from None
        else:
            name, weight = item
        get(name)  # unknown names list the available ones
        if not (math.isfinite(float(weight)) and float(weight) >= 0):
            raise ConfigError(f"loss {name!r}: weight must be a finite number >= 0, got {weight!r}")
        if name in (n for n, _ in terms):
            raise ConfigError(f"loss {name!r} appears twice in {spec!r}; give it once with the summed weight")
        terms.append((name, float(weight)))
    return terms


def _layout(kind: str) -> str:
    return "pair" if kind in _PAIR_LAYOUT else kind


@dataclass
class PreferenceLoss:
    """A validated weighted sum of registered losses: ``losses = sum_k w_k loss_k`` per sample.

    Hyper-parameters are shared like TRL's config: each one goes to every term that takes it (``beta`` to all),
    and its value is checked against each term's rules when the object is built. All terms must share one
    sample layout (pairs, unpaired examples, or lists).

    Attributes:
        terms: ``[(name, weight), ...]``.
        params: the shared hyper-parameters given.
    """

    terms: list[tuple[str, float]]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.specs = [get(name) for name, _ in self.terms]
        layouts = {_layout(s.kind) for s in self.specs}
        if len(layouts) > 1:
            kinds = ", ".join(f"{s.name} ({s.kind})" for s in self.specs)
            raise ConfigError(f"losses {kinds} cannot be summed: they score different units (pairs, examples, lists)")
        accepted = {p for s in self.specs for p in s.params}
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ConfigError(f"no loss in {self.names} takes parameter(s) {unknown}; they take {sorted(accepted)}")
        for s in self.specs:
            s.validate(**{k: v for k, v in self.params.items() if k in s.params})

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.terms]

    @property
    def inputs(self) -> set[str]:
        """Tensor inputs that at least one term requires."""
        return {i for s in self.specs for i in s.inputs}

    def __call__(self, **inputs: Tensor) -> LossOutput:
        """Evaluate every term on the tensors it takes.

        Args:
            **inputs: tensors by name (``TENSOR_INPUTS``); each term receives the ones in its signature.

        Returns:
            ``[B]`` weighted per-sample losses; metrics merged (the first term's value wins on a shared key)
            plus ``loss/<name>`` = each term's unweighted batch mean.
        """
        unknown = sorted(set(inputs) - TENSOR_INPUTS)
        if unknown:
            raise VisalignError(f"unknown loss input(s) {unknown}; known inputs: {sorted(TENSOR_INPUTS)}")
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for (name, weight), spec in zip(self.terms, self.specs):
            missing = [i for i in spec.inputs if i not in inputs]
            if missing:
                raise VisalignError(f"loss {name!r} needs input(s) {missing}; got {sorted(inputs)}")
            kwargs = {k: v for k, v in inputs.items() if k in spec.inputs or k in spec.optional_inputs}
            kwargs.update({k: v for k, v in self.params.items() if k in spec.params})
            losses, term_metrics = spec.fn(**kwargs)
            if total is not None and losses.shape != total.shape:
                raise VisalignError(f"loss {name!r} returned shape {list(losses.shape)}, others {list(total.shape)}")
            total = weight * losses if total is None else total + weight * losses
            for key, value in term_metrics.items():
                metrics.setdefault(key, value)
            metrics[f"loss/{name}"] = losses.detach().mean()
        assert total is not None
        return total, metrics


def build(spec: str | Sequence[str | tuple[str, float]], **params: Any) -> PreferenceLoss:
    """Build a (weighted sum of) loss(es) from ``"name:weight,..."`` or ``[(name, weight), ...]``, validated now.

    Example: ``build("sigmoid:1.0,bco_pair:0.5,sft:1.0", beta=0.1)`` (the MPO-style mix of TRL's docs).
    """
    return PreferenceLoss(parse_loss_spec(spec), dict(params))
