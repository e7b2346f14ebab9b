"""Tensor plumbing the losses share: input checks (shape, batch size, lengths, dtype), TRL's reward metrics,
and the two formula pieces several losses use (the label-smoothed logistic loss, the token-mean NLL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visalign.errors import VisalignError

from .registry import Tensor


def _float(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (log-sigmoids of large margins lose everything in half precision); fp32/fp64 kept."""
    if not isinstance(t, Tensor):
        raise VisalignError(f"expected a torch.Tensor, got {type(t).__name__}")
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point() else t


def _batch(loss: str, **tensors: Tensor) -> tuple[Tensor, ...]:
    """Check that per-sample tensors are 1-D, non-empty and of one batch size; return them as floats."""
    sizes = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise VisalignError(f"loss {loss!r}: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 1:
            raise VisalignError(
                f"loss {loss!r}: {name} must have shape [B] (one value per sample), got {list(t.shape)}"
            )
        sizes[name] = t.shape[0]
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k} has {v}" for k, v in sizes.items())
        raise VisalignError(f"loss {loss!r}: batch sizes differ ({detail}); pass one value per pair for each")
    if sizes and next(iter(sizes.values())) == 0:
        raise VisalignError(f"loss {loss!r}: empty batch")
    return tuple(_float(t) for t in tensors.values())


def _lengths(loss: str, name: str, n: Tensor) -> Tensor:
    if bool((n <= 0).any()):
        index = int(torch.nonzero(n <= 0)[0, 0])
        raise VisalignError(
            f"loss {loss!r}: {name}[{index}] is {n[index].item()}: an empty completion has no log-likelihood to "
            "normalise; drop the row or give it at least one token"
        )
    return n


def _detach(**metrics: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


def _reward_metrics(beta: float, r_c: Tensor, r_r: Tensor) -> dict[str, Tensor]:
    """TRL's implicit-reward metrics: ``rewards/chosen = beta * r_c`` etc., batch means, detached."""
    chosen, rejected = beta * r_c.detach(), beta * r_r.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }


def _smoothed_sigmoid(x: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigma(x) - eps log sigma(-x)``: the label-smoothed (conservative) logistic loss."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-x)


def _token_mean_nll(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-sample ``-logps_i * B / sum(lengths)``: its batch mean is the token-level mean NLL.

    SFT, CPO and ORPO average the NLL over all completion tokens of the batch (a cross-entropy over tokens, as
    TRL computes it), not over samples; spreading it this way keeps one value per pair.
    """
    return -logps * (logps.shape[0] / lengths.sum())
