"""The encoded-pair cache: VAE latents and text conditioning of every pair, in shards on disk, read memory-mapped.

Layout of one cache entry ``CACHE_DIR/KEY/``: ``shard-00000.safetensors`` ... (``shard_size`` pairs each:
``chosen``, ``rejected`` latents, ``labels``, ``prompt_index`` into the shard's own unique prompts, and one
``cond.NAME`` tensor per conditioning input; with ``flip`` also ``chosen_flip`` / ``rejected_flip``, the latents
of the mirrored images), and ``meta.json``, written last, which marks the entry complete.

* Building: every process encodes the shards ``k`` with ``k % world == rank``, each written to a temporary file
  and renamed into place, so a build killed half-way resumes from the shards already there, and two runs
  building the same entry at once publish identical files. The VAE's posterior sample of each image comes from
  a generator seeded by (seed, row), so the bytes do not depend on the number of processes or the batch size.
* Reading: a shard is opened with ``safetensors.safe_open`` (memory-mapped) and one row sliced out per item; at
  most :data:`OPEN_SHARDS` shards are open at once per process. Memory does not grow with the dataset.
* The key covers the model's source, family, VAE and text-encoder configs and dtype, the data's fingerprint
  (the file's bytes or the Arrow dataset's fingerprint, and the pairs kept), the resolution and ``flip``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .data import DataError, PreferenceDataset
from .seeding import example_generators

CACHE_VERSION = 2
OPEN_SHARDS = 16


def cache_key(model, dataset: PreferenceDataset, *, flip: bool = False) -> str:
    """Changes when the model (source, family, VAE and text encoders' configs), resolution, flip or data change."""
    parts = {
        "version": CACHE_VERSION,
        "family": model.family,
        "source": str(model.source),
        "vae": dict(model.vae.config),
        "dtype": str(model.dtype),
        "data": dataset.fingerprint(),
        "flip": bool(flip),
    }
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        component = getattr(model.pipe, name, None)
        if component is not None:
            parts[name] = (
                component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
            )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def flip_media(media: torch.Tensor) -> torch.Tensor:
    """Mirror images ``[..., H, W]`` (and every frame of a video) left to right."""
    return media.flip(-1)


class EncodedPairs(torch.utils.data.Dataset):
    """A complete cache entry as a dataset. Items: ``{"chosen", "rejected"`` latents, ``"cond": {name: tensor}``,
    ``"label"``, ``"prompt"``, ``"index"}`` (and ``"chosen_flip"``, ``"rejected_flip"`` when built with ``flip``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.n, self.shard_size, self.flip = meta["n"], meta["shard_size"], meta["flip"]
        self._open: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._open:
            path = self.folder / shard_name(k)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise DataError(f"{path}: cannot read this cache shard ({e}); delete the folder to rebuild it") from e
            self._open[k] = (handle, json.loads(handle.metadata()["prompts"]))
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        handle, prompts = self._shard(i // self.shard_size)
        j = i % self.shard_size
        p = int(handle.get_slice("prompt_index")[j : j + 1][0])
        item = {
            "chosen": handle.get_slice("chosen")[j : j + 1][0],
            "rejected": handle.get_slice("rejected")[j : j + 1][0],
            "cond": {k[5:]: handle.get_slice(k)[p : p + 1][0] for k in handle.keys() if k.startswith("cond.")},
            "label": float(handle.get_slice("labels")[j : j + 1][0]),
            "prompt": prompts[p],
            "index": i,
        }
        if self.flip:
            item["chosen_flip"] = handle.get_slice("chosen_flip")[j : j + 1][0]
            item["rejected_flip"] = handle.get_slice("rejected_flip")[j : j + 1][0]
        return item

    @staticmethod
    def collate(rows: list[dict]) -> dict:
        batch = {
            k: torch.stack([r[k] for r in rows]) for k in ("chosen", "rejected", "chosen_flip", "rejected_flip")
            if k in rows[0]
        }  # fmt: skip
        batch["cond"] = {k: torch.stack([r["cond"][k] for r in rows]) for k in rows[0]["cond"]}
        batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.float32)
        batch["prompt"] = [r["prompt"] for r in rows]
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        return batch


def storage_dtype(model) -> torch.dtype:
    """Latents and conditioning are stored in the model's half dtype when it has one (training casts to it)."""
    return model.dtype if model.dtype in (torch.float16, torch.bfloat16) else torch.float32


def encode_media(model, media: torch.Tensor, indices, seed: int, which: str) -> torch.Tensor:
    """Latents of ``media`` with each row's posterior sample drawn from its own generator (row ``indices``)."""
    generators = example_generators(seed, indices, "vae", which)
    return model.encode(media.to(model.device, torch.float32), generator=generators)


def encode_shard(model, dataset: PreferenceDataset, k: int, shard_size: int, *, batch_size: int, seed: int,
                 flip: bool) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
    """The tensors and unique prompts of shard ``k``: pairs ``[k * shard_size, (k + 1) * shard_size)``."""
    rows = range(k * shard_size, min((k + 1) * shard_size, len(dataset)))
    dtype = storage_dtype(model)
    out: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    prompts: list[str] = []
    prompt_of: dict[str, int] = {}
    labels, prompt_index = [], []
    with torch.no_grad():
        for start in range(rows.start, rows.stop, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, rows.stop))]
            indices = [dataset.source_row(i) for i in range(start, start + len(items))]
            for key in ("chosen", "rejected"):
                media = torch.stack([it[key] for it in items])
                out[key].append(encode_media(model, media, indices, seed, key).to("cpu", dtype))
                if flip:
                    flipped = encode_media(model, flip_media(media), indices, seed, key + "_flip")
                    out[key + "_flip"].append(flipped.to("cpu", dtype))
            for it in items:
                labels.append(it["label"])
                prompt_index.append(prompt_of.setdefault(it["prompt"], len(prompt_of)))
                if len(prompt_of) > len(prompts):
                    prompts.append(it["prompt"])
        for start in range(0, len(prompts), batch_size):
            for name, v in model.encode_prompt(prompts[start : start + batch_size]).items():
                out["cond." + name].append(v.to("cpu", dtype))
    tensors = {k: torch.cat(v).contiguous() for k, v in out.items()}
    tensors["labels"] = torch.tensor(labels, dtype=torch.float32)
    tensors["prompt_index"] = torch.tensor(prompt_index, dtype=torch.long)
    return tensors, prompts


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def encode_pairs(
    model,
    dataset: PreferenceDataset,
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    seed: int = 0,
    shard_size: int = 1024,
    flip: bool = False,
    progress: bool = True,
    state=None,
) -> EncodedPairs:
    """Encode every pair into the cache entry under ``cache_dir`` (or open it when complete) and return it.

    Under several processes (``state``: accelerate's ``PartialState``, default the current one) each encodes its
    share of the shards; all wait for the last one. ``cache_dir`` must be a folder every process can read (on
    several machines: a shared filesystem, or train with ``--cache none``).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if state is None:
        from .distributed import process_state

        state = process_state()
    target = Path(cache_dir) / cache_key(model, dataset, flip=flip)
    if (target / "meta.json").is_file():
        return EncodedPairs(target)
    target.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(dataset) // shard_size)
    mine = [k for k in range(n_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not (target / shard_name(k)).is_file()]
    bar = tqdm(todo, desc=f"encoding pairs (rank {state.process_index})", disable=not progress)
    for k in bar:
        tensors, prompts = encode_shard(model, dataset, k, shard_size, batch_size=batch_size, seed=seed, flip=flip)
        meta = {"prompts": json.dumps(prompts), "shard": str(k), "rank": str(state.process_index)}
        _write_atomic(target / shard_name(k), lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
    state.wait_for_everyone()
    missing = [shard_name(k) for k in range(n_shards) if not (target / shard_name(k)).is_file()]
    if missing:
        raise DataError(
            f"{target}: {len(missing)} cache shards written by other processes are not visible here (first: "
            f"{missing[0]}); put --cache_dir on a filesystem every machine shares, or train with --cache none"
        )
    if state.is_main_process:
        meta = {"n": len(dataset), "shard_size": shard_size, "flip": flip, "shards": n_shards,
                "source": str(model.source), "data": dataset.name}  # fmt: skip
        _write_atomic(target / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    state.wait_for_everyone()
    return EncodedPairs(target)
