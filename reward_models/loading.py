"""Resolving reward checkpoints: a local file, a file inside a local folder, or a file of a Hub repository.

Nothing here runs at import; the Hub is contacted only when a loader is called with a hub id (and fails with
a :class:`CheckpointError` naming the file and the way to pass a local path when it cannot be reached).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .base import CheckpointError


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    return " (HF_HUB_OFFLINE is set and the file is not in the local cache)" if offline else ""


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` reads as a Hub repo id (``org/name``) rather than a local path."""
    text = str(name)
    if Path(text).exists() or text.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(text)) and not text.endswith(CHECKPOINT_SUFFIXES)


def resolve_file(source: str | os.PathLike, filename: str | None = None, *, what: str = "checkpoint") -> Path:
    """Path of a checkpoint file.

    Args:
        source: a local file; a local folder holding ``filename``; or a Hub repo id holding ``filename``.
        filename: file name inside a folder or repo (``None``: ``source`` must be a file).
        what: what the file is, for error messages (``"HPS checkpoint"``).

    Raises:
        CheckpointError: the file does not exist locally and the Hub cannot provide it.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    if path.is_dir():
        if filename and (path / filename).is_file():
            return path / filename
        raise CheckpointError(f"{what} not found: {path} has no {filename or 'checkpoint file'}")
    if filename is None or not is_hub_id(source):
        raise CheckpointError(f"{what} not found: {source} (pass an existing file or folder)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), filename))
    except Exception as e:  # offline, unknown repo, missing file: all mean "cannot resolve"
        raise CheckpointError(
            f"{what} not found: no local file {source!r}, and the Hub could not provide {source}/{filename}"
            f"{_offline_hint()}; download it and pass the local path"
        ) from e


def resolve_url(url: str, filename: str, *, what: str = "checkpoint") -> Path:
    """Download ``url`` once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``) and return the path."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as e:
        raise CheckpointError(f"{what} not found locally and could not be downloaded from {url}: {e}") from e
    return target


def load_state_dict(path: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file (``state_dict`` key unwrapped).

    Raises:
        CheckpointError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str, ignore: tuple[str, ...] = ()):
    """Load ``state`` into ``module``; every parameter must be present and fit, extra keys must be ``ignore``d.

    Args:
        ignore: key prefixes that may be in the checkpoint without being used.

    Raises:
        CheckpointError: missing keys, unexpected keys, or shape mismatches.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore)]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:2]})")
        raise CheckpointError(f"{what} does not fit the architecture: " + "; ".join(parts))
    module.load_state_dict({k: state[k] for k in own}, strict=True)
