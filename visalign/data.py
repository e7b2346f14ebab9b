"""Preference data: reading, validating, writing, and caching encoded pairs.

Sources, all read into one schema (a :class:`PreferencePair` per row: ``prompt``, ``chosen``, ``rejected``,
``label`` = probability that ``chosen`` is preferred):

* Pick-a-Pic v2 (``caption, jpg_0, jpg_1, label_0``): ties (``label_0 = 0.5``) dropped, winner first;
* generic pairs (``prompt, chosen, rejected[, label]``), with media as paths (relative to the data file),
  bytes, or ``{"bytes": ..., "path": ...}`` as ``datasets`` stores images;
* any of these as a Hugging Face dataset id, a ``save_to_disk`` folder, ``.parquet``, ``.jsonl`` or a
  ``datasets.Dataset``. Videos are files (``.mp4``/``.gif``) or folders of frames.

Every row is checked when loaded; a bad row raises :class:`DataError` naming the source, the row and the
column. Decoded media are checked when read (corrupt file, sizes that differ within a pair).
:func:`encode_pairs` encodes each pair's latents and each unique prompt's conditioning once and caches them on
disk under a key of model, resolution and data, so training never re-encodes per epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import VisalignError

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov")
CACHE_VERSION = 1


class DataError(VisalignError):
    """Bad preference data: the message names the source, row and column."""


@dataclass
class PreferencePair:
    prompt: str
    chosen: Any  # path, bytes, PIL image or tensor
    rejected: Any
    label: float = 1.0  # P(chosen preferred): 1 for hard labels, in (0.5, 1] for soft ones
    meta: dict | None = None


# ----------------------------------------------------------------------------------------------- reading rows
def read_rows(source) -> tuple[list[dict], str, Path | None]:
    """Rows as dicts, a name for messages, and the folder that relative media paths start from.

    ``datasets`` is imported only for the sources that need it (parquet, saved datasets, hub ids).
    """
    if type(source).__module__.startswith("datasets"):  # a datasets.Dataset, without importing the library
        return list(source), "dataset", None
    if isinstance(source, (list, tuple)):
        return list(source), "rows", None
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from e
            return rows, str(path), path.parent
        if path.suffix == ".parquet":
            import datasets

            return list(datasets.Dataset.from_parquet(str(path))), str(path), path.parent
        raise DataError(f"{path}: unsupported data file; use .jsonl, .parquet, a dataset folder or a hub id")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            return list(datasets.load_from_disk(str(path))), str(path), path
        for name in ("pairs.jsonl", "data.jsonl", "train.jsonl"):
            if (path / name).exists():
                return read_rows(path / name)
        raise DataError(f"{path}: no pairs.jsonl, data.jsonl or saved dataset in this folder")
    import datasets

    try:
        return list(datasets.load_dataset(str(source), split="train")), str(source), None
    except Exception as e:
        raise DataError(f"preference data {source!r} not found: not a file, folder or reachable dataset id") from e


def _check_label(value, where: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: label {value!r} is not a number in [0, 1]") from e
    if not 0.0 <= label <= 1.0:
        raise DataError(f"{where}: label {label} is outside [0, 1]")
    return label


def rows_to_pairs(
    rows: list[dict], name: str, root: Path | None, *, drop_ties: bool = True, soft_labels: bool = False
) -> list[PreferencePair]:
    """Validate rows and turn them into pairs (winner first). ``soft_labels`` keeps fractional labels."""
    if not rows:
        raise DataError(f"{name}: the dataset is empty")
    first = rows[0]
    pickapic = all(c in first for c in PICKAPIC_COLUMNS)
    required = PICKAPIC_COLUMNS if pickapic else PAIR_COLUMNS
    pairs = []
    for i, row in enumerate(rows):
        where = f"{name}: row {i}"
        missing = [c for c in required if c not in row or row[c] is None]
        if missing:
            raise DataError(f"{where} has no column {missing[0]!r} (expected columns: {', '.join(required)})")
        if pickapic:
            prompt, a, b = row["caption"], row["jpg_0"], row["jpg_1"]
            label0 = _check_label(row["label_0"], where)
            if label0 not in (0.0, 0.5, 1.0) and not soft_labels:
                raise DataError(f"{where}: label_0 must be 0, 0.5 or 1, got {label0}")
            if label0 == 0.5 and drop_ties:
                continue
            chosen, rejected, label = (a, b, label0) if label0 >= 0.5 else (b, a, 1 - label0)
        else:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            label = _check_label(row.get("label", 1.0), where)
            if label < 0.5:
                chosen, rejected, label = rejected, chosen, 1 - label
            if label == 0.5 and drop_ties:
                continue
            if not soft_labels and label not in (0.5, 1.0):
                raise DataError(f"{where}: label must be 0, 0.5 or 1 (or pass soft_labels), got {row['label']}")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
        chosen, rejected = (_resolve(m, root, where) for m in (chosen, rejected))
        meta = {k: v for k, v in row.items() if k not in (*required, "label") and _jsonable(v)}
        pairs.append(PreferencePair(prompt, chosen, rejected, label, meta or None))
    if not pairs:
        raise DataError(f"{name}: no pairs left after dropping ties")
    return pairs


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _resolve(media, root: Path | None, where: str):
    if isinstance(media, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        media = media.get("bytes") or media.get("path")
    if isinstance(media, str):
        path = Path(media)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.exists():
            raise DataError(f"{where}: media file not found: {path}")
        return path
    return media


# ----------------------------------------------------------------------------------------------- media
def load_image(media, resolution: int | None = None, where: str = "") -> torch.Tensor:
    """Decode an image to ``[3, H, W]`` float in [0, 1]; with ``resolution``, resize the short side and center-crop
    (as Diffusion-DPO's training script does)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    if isinstance(media, torch.Tensor):
        image = media.float()
        if image.max() > 1.0:
            image = image / 255
    else:
        try:
            pil = (
                media
                if isinstance(media, Image.Image)
                else Image.open(io.BytesIO(media) if isinstance(media, (bytes, bytearray)) else media)
            )
            pil.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{where}: cannot decode image {media if isinstance(media, Path) else ''} ({e})") from e
        image = pil_to_tensor(pil.convert("RGB")).float() / 255
    if resolution is not None:
        image = center_crop(resize(image, resolution, antialias=True), [resolution, resolution]).clamp(0, 1)
    return image


def load_video(media, resolution: int | None = None, num_frames: int | None = None, where: str = "") -> torch.Tensor:
    """Decode a video (file, frame folder or ``[F, 3, H, W]`` tensor) to ``[F, 3, H, W]`` float in [0, 1]."""
    from .media import read_video

    if isinstance(media, torch.Tensor):
        frames = media.float()
    elif isinstance(media, Path) and media.is_dir():
        files = sorted(p for p in media.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise DataError(f"{where}: frame folder {media} holds no .png/.jpg frames")
        frames = torch.stack([load_image(f, where=where) for f in files])
    else:
        try:
            frames = read_video(media)
        except Exception as e:
            raise DataError(f"{where}: cannot decode video {media} ({e})") from e
    if num_frames is not None:
        if frames.shape[0] < num_frames:
            raise DataError(f"{where}: video has {frames.shape[0]} frames, fewer than num_frames={num_frames}")
        frames = frames[:num_frames]
    if resolution is not None:
        frames = torch.stack([load_image(f, resolution, where) for f in frames])
    return frames


def is_video(media) -> bool:
    if isinstance(media, torch.Tensor):
        return media.ndim == 4
    return isinstance(media, Path) and (media.suffix.lower() in VIDEO_SUFFIXES or media.is_dir())


class PreferenceDataset(torch.utils.data.Dataset):
    """Decoded preference pairs: ``{"prompt", "chosen", "rejected", "label", "index"}`` with media in [0, 1]."""

    def __init__(
        self,
        pairs: list[PreferencePair],
        *,
        resolution: int | None = None,
        num_frames: int | None = None,
        name: str = "data",
    ):
        self.pairs, self.resolution, self.num_frames, self.name = pairs, resolution, num_frames, name
        self.video = is_video(pairs[0].chosen)

    def __len__(self) -> int:
        return len(self.pairs)

    def media(self, index: int, which: str) -> torch.Tensor:
        where = f"{self.name}: row {index} ({which})"
        ref = getattr(self.pairs[index], which)
        if self.video:
            return load_video(ref, self.resolution, self.num_frames, where)
        return load_image(ref, self.resolution, where)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        chosen, rejected = self.media(index, "chosen"), self.media(index, "rejected")
        if chosen.shape != rejected.shape:
            raise DataError(
                f"{self.name}: row {index}: chosen is {tuple(chosen.shape)} but rejected is {tuple(rejected.shape)}; "
                "a pair must share one size (set a resolution to resize both)"
            )
        return {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "label": pair.label, "index": index}

    def fingerprint(self) -> str:
        """A hash of the rows (prompts, labels, media paths with sizes and times, or media bytes)."""
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.label]).encode())
            for m in (p.chosen, p.rejected):
                if isinstance(m, Path):
                    st = m.stat()
                    h.update(f"{m.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
                elif isinstance(m, (bytes, bytearray)):
                    h.update(hashlib.sha256(m).digest())
                elif isinstance(m, torch.Tensor):
                    h.update(m.detach().cpu().contiguous().numpy().tobytes())
                else:
                    h.update(repr(m).encode())
        h.update(f"{self.resolution}:{self.num_frames}".encode())
        return h.hexdigest()[:16]


def load_preference_data(
    source,
    *,
    resolution: int | None = None,
    num_frames: int | None = None,
    drop_ties: bool = True,
    soft_labels: bool = False,
    limit: int | None = None,
) -> PreferenceDataset:
    """Read and validate preference pairs from any supported source (see the module docstring)."""
    rows, name, root = read_rows(source)
    pairs = rows_to_pairs(rows[:limit] if limit else rows, name, root, drop_ties=drop_ties, soft_labels=soft_labels)
    return PreferenceDataset(pairs, resolution=resolution, num_frames=num_frames, name=name)


# ----------------------------------------------------------------------------------------------- writing
class PreferenceWriter:
    """Appends pairs to ``DIR/pairs.jsonl`` with media under ``DIR/media/``; each append is atomic.

    Media are written to a temporary file and renamed before the row is appended, and each row is one
    ``write`` of a whole line followed by ``fsync``, so a crash never leaves a row pointing at a missing file or a
    half line. Safe to share between threads (the comparison app's concurrent users).
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        (self.dir / "media").mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "pairs.jsonl"
        self._lock = threading.Lock()

    def _save(self, media: torch.Tensor, stem: str) -> str:
        from .media import save_image, save_video

        if media.ndim == 4:
            return str(save_video(media, self.dir / "media" / f"{stem}.mp4").relative_to(self.dir))
        return str(save_image(media, self.dir / "media" / f"{stem}.png").relative_to(self.dir))

    def append(self, prompt: str, chosen: torch.Tensor, rejected: torch.Tensor, label: float = 1.0, **meta) -> dict:
        if not 0.0 <= label <= 1.0:
            raise DataError(f"label must be in [0, 1], got {label}")
        with self._lock:
            n = sum(1 for _ in self.file.open()) if self.file.exists() else 0
            stem = f"{n:07d}-{os.urandom(3).hex()}"
            row = {
                "prompt": prompt,
                "chosen": self._save(chosen, stem + "-c"),
                "rejected": self._save(rejected, stem + "-r"),
                "label": label,
                **meta,
            }
            with self.file.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


# ----------------------------------------------------------------------------------------------- encoded cache
class EncodedPairs(torch.utils.data.Dataset):
    """Cached latents of each pair and conditioning of each unique prompt.

    Items: ``{"chosen": latents, "rejected": latents, "cond": {name: tensor}, "label": float, "prompt": str}``.
    """

    def __init__(
        self,
        latents_c: torch.Tensor,
        latents_r: torch.Tensor,
        prompt_index: torch.Tensor,
        conds: dict[str, torch.Tensor],
        prompts: list[str],
        labels: torch.Tensor,
    ):
        self.latents_c, self.latents_r, self.prompt_index = latents_c, latents_r, prompt_index
        self.conds, self.prompts, self.labels = conds, prompts, labels

    def __len__(self) -> int:
        return self.latents_c.shape[0]

    def __getitem__(self, i: int) -> dict:
        p = int(self.prompt_index[i])
        return {
            "chosen": self.latents_c[i],
            "rejected": self.latents_r[i],
            "cond": {k: v[p] for k, v in self.conds.items()},
            "label": float(self.labels[i]),
            "prompt": self.prompts[p],
        }

    @staticmethod
    def collate(rows: list[dict]) -> dict:
        return {
            "chosen": torch.stack([r["chosen"] for r in rows]),
            "rejected": torch.stack([r["rejected"] for r in rows]),
            "cond": {k: torch.stack([r["cond"][k] for r in rows]) for k in rows[0]["cond"]},
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.float32),
            "prompt": [r["prompt"] for r in rows],
        }


def cache_key(model, dataset: PreferenceDataset) -> str:
    """Changes when the model (source, family, VAE and text encoders' configs), resolution or data change."""
    parts = {
        "version": CACHE_VERSION,
        "family": model.family,
        "source": str(model.source),
        "vae": dict(model.vae.config),
        "dtype": str(model.dtype),
        "data": dataset.fingerprint(),
    }
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        component = getattr(model.pipe, name, None)
        if component is not None:
            parts[name] = (
                component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
            )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def encode_pairs(
    model,
    dataset: PreferenceDataset,
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> EncodedPairs:
    """Encode every pair's media and every unique prompt once; load from ``cache_dir`` when already there.

    The VAE posterior is sampled with a generator seeded per row, so a cache built twice is identical.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    target = Path(cache_dir) / cache_key(model, dataset) if cache_dir is not None else None
    if target is not None and (target / "meta.json").exists():
        meta = json.loads((target / "meta.json").read_text())
        t = load_file(target / "latents.safetensors")
        conds = load_file(target / "cond.safetensors")
        return EncodedPairs(t["chosen"], t["rejected"], t["prompt_index"], conds, meta["prompts"], t["labels"])
    prompts = sorted({p.prompt for p in dataset.pairs})
    index = {p: i for i, p in enumerate(prompts)}
    chunks_c, chunks_r = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding pairs", disable=not progress):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            for key, out in (("chosen", chunks_c), ("rejected", chunks_r)):
                media = torch.stack([it[key] for it in items]).to(model.device, torch.float32)
                g = torch.Generator(device=model.device).manual_seed(seed * 7919 + start * 2 + (key == "rejected"))
                out.append(model.encode(media, generator=g).float().cpu())
        cond_chunks: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(prompts), batch_size):
            for k, v in model.encode_prompt(prompts[start : start + batch_size]).items():
                cond_chunks.setdefault(k, []).append(v.float().cpu())
    conds = {k: torch.cat(v) for k, v in cond_chunks.items()}
    latents_c, latents_r = torch.cat(chunks_c), torch.cat(chunks_r)
    prompt_index = torch.tensor([index[p.prompt] for p in dataset.pairs])
    labels = torch.tensor([p.label for p in dataset.pairs], dtype=torch.float32)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            save_file(
                {
                    "chosen": latents_c.contiguous(),
                    "rejected": latents_r.contiguous(),
                    "prompt_index": prompt_index,
                    "labels": labels,
                },
                tmp / "latents.safetensors",
            )
            save_file({k: v.contiguous() for k, v in conds.items()}, tmp / "cond.safetensors")
            (tmp / "meta.json").write_text(
                json.dumps({"prompts": prompts, "n": len(dataset), "source": str(model.source)})
            )
            try:
                os.replace(tmp, target)
            except OSError:
                # another process (a second run on the same data) published this cache entry first: same key,
                # same content, so keep theirs
                if not (target / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return EncodedPairs(latents_c, latents_r, prompt_index, conds, prompts, labels)
