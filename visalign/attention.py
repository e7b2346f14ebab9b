"""Attention backend checks. PyTorch SDPA is the default everywhere; xformers is opt-in and CUDA-only."""

from __future__ import annotations

import torch

from .errors import VisalignError


class AttentionBackendError(VisalignError):
    """The requested attention backend cannot run here."""


def check_xformers(device: torch.device | str) -> None:
    """Raise a clear error unless xformers can run on ``device``.

    xformers kernels need CUDA and a wheel built for the installed torch; a mismatched wheel imports but
    its ops fail to load, so a tiny attention call is tried before the backend is accepted.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise AttentionBackendError(
            f"attention backend 'xformers' needs a CUDA device (model is on {device}); use --attention sdpa"
        )
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise AttentionBackendError(
            "attention backend 'xformers' requested but xformers is not installed: "
            "pip install 'visalign[xformers]' (a wheel built for your torch), or use --attention sdpa"
        ) from e
    q = torch.randn(1, 8, 1, 16, device=device, dtype=torch.float16)
    try:
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:  # a wheel built for another torch imports but cannot run its kernels
        raise AttentionBackendError(
            f"xformers is installed but its kernels do not run with torch {torch.__version__} ({type(e).__name__}); "
            "install an xformers wheel built for this torch, or use --attention sdpa"
        ) from e
