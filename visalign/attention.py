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


# one PyTorch SDPA kernel for the denoiser (``--attention sdpa-flash`` ...); plain ``sdpa`` lets PyTorch choose
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
CPU_SDPA_BACKENDS = ("sdpa-flash", "sdpa-math")


def use_sdpa_backend(module: torch.nn.Module, backend: str, device: torch.device | str) -> None:
    """Run every forward of ``module`` under ``torch.nn.attention.sdpa_kernel`` with the one kernel ``backend``
    names (hooks on ``module``, so reward models and text encoders keep PyTorch's choice). A kernel that cannot
    take an input fails loudly ("No available kernel") instead of falling back. Under gradient checkpointing the
    recompute in backward runs outside the forward and takes PyTorch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend not in SDPA_BACKENDS:
        raise AttentionBackendError(f"unknown SDPA backend {backend!r}; choose one of {', '.join(SDPA_BACKENDS)}")
    if torch.device(device).type != "cuda" and backend not in CPU_SDPA_BACKENDS:
        raise AttentionBackendError(
            f"attention backend {backend!r} needs a CUDA device (model is on {device}); on a CPU use "
            f"{' or '.join(CPU_SDPA_BACKENDS)} (or plain sdpa)"
        )
    kernel = getattr(SDPBackend, SDPA_BACKENDS[backend])
    active = []

    def enter(mod, args):
        context = sdpa_kernel([kernel])
        context.__enter__()
        active.append(context)

    def leave(mod, args, out):
        active.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
