"""The loss registry: :class:`LossSpec`, ``register``, ``get``, ``available``, and hyper-parameter checks.

A loss is registered with its kind and a check; tensor arguments are recognised by name (``TENSOR_INPUTS``),
every other keyword argument is a hyper-parameter with a default, validated before any tensor is seen.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from visalign.errors import ConfigError

Tensor = torch.Tensor
LossOutput = tuple[Tensor, dict[str, Tensor]]

# Every tensor argument a loss may take. Anything else in a loss signature is a hyper-parameter.
TENSOR_INPUTS = frozenset(
    {
        "chosen_logratios", "rejected_logratios",  # r = log pi - log pi_ref, [B]
        "chosen_logps", "rejected_logps",  # summed policy log-likelihoods, [B]
        "ref_chosen_logps", "ref_rejected_logps",  # summed reference log-likelihoods, [B]
        "chosen_lengths", "rejected_lengths",  # completion token counts, [B]
        "preference_probs",  # soft labels P(chosen > rejected), [B]
        "chosen_errors", "rejected_errors",  # per-sample mean denoising errors, [B]
        "logratios", "desirable", "kl_logratios",  # unpaired (KTO, NPO): [N], [N] bool, [M]
        "logps", "lengths", "scores", "errors",  # listwise: [B, K] each
    }
)  # fmt: skip

KINDS = ("pairwise", "reference_free", "unpaired", "listwise", "errors", "sft")
# Losses whose per-sample values line up (one per pair) and so can be summed with weights.
_PAIR_LAYOUT = {"pairwise", "reference_free", "errors", "sft"}

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the pure function plus what it needs, read from its signature.

    Attributes:
        name: registry name (TRL's ``loss_type`` where the two overlap).
        fn: the pure function ``fn(**tensors, **params) -> (losses, metrics)``.
        kind: one of ``pairwise``, ``reference_free``, ``unpaired``, ``listwise``, ``errors``, ``sft``.
        summary: one line for ``visalign`` help and error messages.
        inputs: required tensor arguments.
        optional_inputs: tensor arguments that may be omitted (``None``).
        params: hyper-parameters and their defaults.
        check: validates hyper-parameters (raises :class:`ConfigError`); also called by ``fn`` itself.
    """

    name: str
    fn: Callable[..., LossOutput]
    kind: str
    summary: str
    inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    params: Mapping[str, Any]
    check: Callable[..., None]

    def __call__(self, **kwargs: Any) -> LossOutput:
        return self.fn(**kwargs)

    def validate(self, **params: Any) -> None:
        """Check hyper-parameters (defaults filled in) without tensors: fail at config time, not step 1000."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ConfigError(f"loss {self.name!r} has no parameter {unknown}; its parameters: {sorted(self.params)}")
        self.check(**{**self.params, **params})


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, kind: str, check: Callable[..., None] | None = None) -> Callable:
    """Register a loss function under ``name``. Its arguments must be keyword-only.

    Tensor arguments are recognised by name (``TENSOR_INPUTS``); the others are hyper-parameters and must
    have defaults. The function's first docstring line becomes its summary.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def decorator(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        inputs, optional, params = [], [], {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"loss {name!r}: argument {p.name!r} must be keyword-only")
            if p.name in TENSOR_INPUTS:
                (inputs if p.default is inspect.Parameter.empty else optional).append(p.name)
            elif p.default is inspect.Parameter.empty:
                raise TypeError(f"loss {name!r}: hyper-parameter {p.name!r} needs a default")
            else:
                params[p.name] = p.default
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = LossSpec(
            name, fn, kind, summary, tuple(inputs), tuple(optional), dict(params), check or _checker(name)
        )
        return fn

    return decorator


def available(kind: str | None = None) -> list[str]:
    """Sorted names of the registered losses (of one ``kind`` if given)."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get(name: str) -> LossSpec:
    """The registered loss ``name``; an unknown name raises :class:`ConfigError` listing the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available())}") from None


# --------------------------------------------------------------------------------------------------------------
# Hyper-parameter checks
# --------------------------------------------------------------------------------------------------------------


def _positive(loss: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"loss {loss!r}: {name} must be a positive number, got {value!r}")


def _check_f(loss: str, f_divergence_type: str, f_alpha_divergence_coef: float) -> None:
    if f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(
            f"loss {loss!r}: f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}"
        )
    if not math.isfinite(f_alpha_divergence_coef):
        raise ConfigError(f"loss {loss!r}: f_alpha_divergence_coef must be finite, got {f_alpha_divergence_coef!r}")


def _checker(loss: str, **extra: Callable[[Any], str | None]) -> Callable[..., None]:
    """A check for ``loss``: beta > 0, a valid f-divergence if the loss takes one, plus per-parameter rules.

    Each rule maps a value to an error message (or ``None`` when the value is fine).
    """

    def check(**params: Any) -> None:
        if "beta" in params:
            _positive(loss, "beta", params["beta"])
        if "f_divergence_type" in params:
            _check_f(loss, params["f_divergence_type"], params["f_alpha_divergence_coef"])
        for key, rule in extra.items():
            message = rule(params[key])
            if message:
                raise ConfigError(f"loss {loss!r}: {key} {message}, got {params[key]!r}")

    return check


def _positive_rule(v: float) -> str | None:
    return None if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else "must be > 0"
