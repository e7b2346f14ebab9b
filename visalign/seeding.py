"""Per-example random streams: every draw a training example needs comes from a generator seeded by the run's
seed and the example's own coordinates, never from a process's global RNG.

So N processes with batch B draw exactly what one process with batch N*B draws (world-size invariance), a cache
built by any number of processes holds the same bytes, and a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib

import torch


def example_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (a hash, so nearby keys give unrelated streams)."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def example_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`example_seed` (draw on the CPU, then move: identical on every device)."""
    return torch.Generator().manual_seed(example_seed(seed, *keys))


def example_generators(seed: int, indices, *keys: int | str) -> list[torch.Generator]:
    """One generator per example index (a list, as Diffusers' ``randn_tensor`` takes for per-sample noise)."""
    return [example_generator(seed, *keys, int(i)) for i in indices]
