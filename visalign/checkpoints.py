"""Checkpoint files that can be trusted: a manifest of sizes and checksums written last, and pickle-free loading.

A checkpoint folder is *complete* when its ``manifest.json`` exists and every file it lists has the listed size
and SHA-256; anything else (a truncated file, a missing one, no manifest) makes it incomplete, and
:func:`verify` says which file and why. Tensors are stored as safetensors, the RNG states of Python and NumPy as
JSON inside the safetensors header, and the optimizer and LR-scheduler states (tensors, numbers, lists) load with
``torch.load(weights_only=True)``: no file of a checkpoint can run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visalign.errors import VisalignError

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


class CheckpointError(VisalignError):
    """A checkpoint is incomplete or damaged, or a file of it cannot be loaded safely."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: str | os.PathLike) -> None:
    """Flush a written file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike) -> Path:
    """List every file of ``folder`` (size, SHA-256) in ``manifest.json``, written last (flushed, then renamed
    into place): a folder whose manifest is there holds every file the manifest names, whole."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            fsync(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256(p)}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=2))
    fsync(tmp)
    os.replace(tmp, folder / MANIFEST)
    fsync(folder)
    return folder / MANIFEST


def verify(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``folder`` that does not match its manifest."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    if not manifest.is_file() and (folder / "rng-0.pt").is_file():
        raise CheckpointError(
            f"{folder} was written by an earlier visalign, without a {MANIFEST} and with pickled RNG states "
            "(rng-N.pt), which are not loaded: start the run again"
        )
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is incomplete: no {MANIFEST} (its write did not finish)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} is damaged ({e})") from e
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path} is damaged: {size} bytes, the manifest says {want['size']}")
        if sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path} is damaged: its SHA-256 does not match the manifest")


def is_complete(folder: str | os.PathLike) -> str | None:
    """``None`` when ``folder`` is a complete checkpoint, else why not."""
    try:
        verify(folder)
    except CheckpointError as e:
        return str(e)
    return None


# ----------------------------------------------------------------- the trained state
def save_trainable(folder: str | os.PathLike, weights: dict, optimizer: dict, rank: int | None = None) -> None:
    """The trainable weights (safetensors) and the optimizer state: ``trainable.safetensors`` and ``optimizer.pt``,
    or with ``rank`` one process's slice of a sharded run (``trainable-RANK.safetensors``, ``optimizer-RANK.pt``)."""
    from safetensors.torch import save_file

    suffix = "" if rank is None else f"-{rank}"
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()}, Path(folder) / f"trainable{suffix}.safetensors"
    )
    save_torch(optimizer, Path(folder) / f"optimizer{suffix}.pt")


def load_trainable(folder: str | os.PathLike, rank: int | None = None) -> tuple[dict, dict]:
    """What :func:`save_trainable` wrote: ``(weights, optimizer state)``."""
    from safetensors.torch import load_file

    suffix = "" if rank is None else f"-{rank}"
    return load_file(Path(folder) / f"trainable{suffix}.safetensors"), load_torch(
        Path(folder) / f"optimizer{suffix}.pt"
    )


# ----------------------------------------------------------------- pickle-free state files
def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of a state that holds only tensors, numbers, strings and containers of them (an optimizer's or
    LR scheduler's ``state_dict``): :func:`load_torch` reads it back without unpickling code."""
    torch.save(obj, path)


def load_torch(path: str | os.PathLike) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path} cannot be loaded safely (weights only, no pickled code): {e}") from e


def save_rng(state: dict[str, Any], path: str | os.PathLike) -> None:
    """The RNG states of :func:`trainers.base.rng_state` as safetensors: torch's (and CUDA's) as byte tensors,
    Python's and NumPy's as JSON in the header."""
    from safetensors.torch import save_file

    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    meta = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]),
    }
    tensors = {"torch": state["torch"].contiguous()}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.cpu().contiguous()
    save_file(tensors, path, metadata=meta)


def load_rng(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
        version, internal, gauss = json.loads(meta["python"])
        name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    except Exception as e:  # noqa: BLE001 - a damaged file: safetensors, JSON or a missing key
        raise CheckpointError(f"{path} is not a readable RNG state: {e}") from e
    state = {
        "python": (version, tuple(internal), gauss),
        "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors["torch"],
    }
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state
