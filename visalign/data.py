"""Preference data: reading, validating, writing, and caching encoded pairs.

Sources, all read into one schema (a :class:`PreferencePair` per row: ``prompt``, ``chosen``, ``rejected``,
``label`` = probability that ``chosen`` is preferred):

* Pick-a-Pic v2 (``caption, jpg_0, jpg_1, label_0``): ties (``label_0 = 0.5``) dropped, winner first;
* generic pairs (``prompt, chosen, rejected[, label]``), with media as paths (relative to the data file),
  bytes, or ``{"bytes": ..., "path": ...}`` as ``datasets`` stores images;
* any of these as a Hugging Face dataset id, a ``save_to_disk`` folder, ``.parquet``, ``.jsonl`` or a
  ``datasets.Dataset``. Videos are files (``.mp4``/``.gif``) or folders of frames.

Nothing holds the whole dataset: JSON lines are indexed by byte offset, everything else is an Arrow-backed
``datasets.Dataset`` (memory-mapped), and a row is read, checked and decoded only when it is used. Labels are
checked for every row when the data is opened (they decide which rows are pairs); a row with a missing value,
a missing file or media that do not decode raises :class:`DataError` naming the source, the row and the column
when it is reached. :mod:`visalign.cache` encodes pairs into sharded latents on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import VisalignError

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov")


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
class JsonlRows:
    """The rows of a JSON-lines file, read on demand: one pass at open records each row's byte offset (8 bytes a
    row) and checks that every line parses; a row is parsed again only when it is read."""

    def __init__(self, path: Path):
        self.path = path
        offsets, lines, columns = [], [], None
        h = hashlib.sha256()
        with path.open("rb") as f:
            pos = 0
            for i, line in enumerate(f):
                h.update(line)
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from e
                    if not isinstance(row, dict):
                        raise DataError(f"{path}: line {i + 1} is not a JSON object")
                    columns = columns if columns is not None else list(row)
                    offsets.append(pos)
                    lines.append(i + 1)
                pos += len(line)
        self.offsets, self.lines = np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64)
        self.column_names = columns or []
        self.fingerprint = f"jsonl:{path.resolve()}:{h.hexdigest()}"

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        with self.path.open("rb") as f:
            f.seek(int(self.offsets[i]))
            return json.loads(f.readline())

    def column(self, name: str) -> list:
        """One column's values (``None`` where a row lacks it), read in one streaming pass."""
        with self.path.open("rb") as f:
            return [json.loads(line).get(name) for line in f if line.strip()]


class ArrowRows:
    """A ``datasets.Dataset``: Arrow tables memory-mapped from disk, so rows (image bytes included) are read only
    when they are used; one column can be read without the others."""

    def __init__(self, dataset, name: str):
        self.dataset = dataset
        self.column_names = list(dataset.column_names)
        self.fingerprint = f"arrow:{getattr(dataset, '_fingerprint', None) or name}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(i)]

    def column(self, name: str) -> list:
        if name not in self.column_names:
            return [None] * len(self)
        return list(self.dataset.select_columns([name]).with_format(None)[name])


class ListRows:
    """Rows the caller already holds in memory (a list of dicts)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []
        h = hashlib.sha256()
        for row in rows:
            h.update(json.dumps(row, sort_keys=True, default=_digest).encode())
        self.fingerprint = f"rows:{h.hexdigest()}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def column(self, name: str) -> list:
        return [row.get(name) for row in self.rows]


def _digest(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return repr(value)


def _pick_split(data, split: str, name: str):
    import datasets

    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in data:
            raise DataError(f"{name} has no split {split!r}; it has {', '.join(data)} (pass --split)")
        return data[split]
    return data


def open_rows(source, *, split: str = "train", streaming: bool = False):
    """The rows of any supported source without reading them all: ``(rows, name, root)``, where ``root`` is the
    folder relative media paths start from. ``rows`` supports ``len``, indexing and ``column(name)``; with
    ``streaming`` a hub dataset comes back as a ``datasets.IterableDataset`` instead.

    ``datasets`` is imported only for the sources that need it (parquet, saved datasets, hub ids).
    """
    if type(source).__module__.startswith("datasets"):  # a datasets.Dataset, without importing the library
        if hasattr(source, "column_names") and not hasattr(source, "__len__"):
            return source, "dataset", None  # an IterableDataset
        return ArrowRows(_pick_split(source, split, "dataset"), "dataset"), "dataset", None
    if isinstance(source, (list, tuple)):
        return ListRows(list(source)), "rows", None
    path = Path(source)
    if streaming and path.is_file() and path.suffix in (".jsonl", ".parquet"):  # a local file streamed as a hub one
        import datasets

        builder = "json" if path.suffix == ".jsonl" else "parquet"
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True), str(path), (
            path.parent)  # fmt: skip
    if path.is_file():
        if path.suffix == ".jsonl":
            return JsonlRows(path), str(path), path.parent
        if path.suffix == ".parquet":
            import datasets

            return ArrowRows(datasets.Dataset.from_parquet(str(path)), str(path)), str(path), path.parent
        raise DataError(f"{path}: unsupported data file; use .jsonl, .parquet, a dataset folder or a hub id")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (
            path / "dataset_dict.json"
        ).exists():
            import datasets

            data = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
            return ArrowRows(data, str(path)), str(path), path
        for name in ("pairs.jsonl", "data.jsonl", "train.jsonl"):
            if (path / name).exists():
                return open_rows(path / name)
        raise DataError(f"{path}: no pairs.jsonl, data.jsonl or saved dataset in this folder")
    import datasets

    try:
        data = datasets.load_dataset(str(source), split=split, streaming=streaming)
    except Exception as e:
        raise DataError(
            f"preference data {source!r} (split {split!r}) not found: not a file, folder or reachable dataset id ({e})"
        ) from e
    return (data if streaming else ArrowRows(data, str(source))), str(source), None


def read_rows(source) -> tuple[list[dict], str, Path | None]:
    """Every row as a dict (for small text datasets; preference media go through :func:`open_rows`)."""
    rows, name, root = open_rows(source)
    return [rows[i] for i in range(len(rows))], name, root


def _check_label(value, where: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: label {value!r} is not a number in [0, 1]") from e
    if not 0.0 <= label <= 1.0:
        raise DataError(f"{where}: label {label} is outside [0, 1]")
    return label


def select_pairs(rows, name: str, *, drop_ties: bool = True, soft_labels: bool = False):
    """Which rows are pairs and how to orient them, from the label column alone (media are not read).

    Returns ``(schema, kept, labels)``: ``"pickapic"`` or ``"pairs"``, the source row of each pair, and the
    probability that the row's first image (``jpg_0`` or ``chosen``) is preferred. Labels are checked here, every
    row, naming the row; the other columns are checked when a row is read.
    """
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset is empty")
    pickapic = all(c in rows.column_names for c in PICKAPIC_COLUMNS)
    required = PICKAPIC_COLUMNS if pickapic else PAIR_COLUMNS
    for c in required:
        if c not in rows.column_names:
            raise DataError(f"{name}: row 0 has no column {c!r} (expected columns: {', '.join(required)})")
    column = "label_0" if pickapic else "label"
    values = rows.column(column)
    labels = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        where = f"{name}: row {i}"
        if value is None:
            if pickapic:
                raise DataError(f"{where} has no column 'label_0' (expected columns: {', '.join(required)})")
            value = 1.0
        label = labels[i] = _check_label(value, where)
        if not soft_labels and label not in (0.0, 0.5, 1.0):
            what = "label_0" if pickapic else "label"
            raise DataError(f"{where}: {what} must be 0, 0.5 or 1 (or pass soft_labels), got {value}")
    kept = np.flatnonzero(labels != 0.5) if drop_ties else np.arange(len(labels))
    if len(kept) == 0:
        raise DataError(f"{name}: no pairs left after dropping ties")
    return ("pickapic" if pickapic else "pairs"), kept, labels


def _row_to_pair(row: dict, schema: str, label: float, root: Path | None, where: str) -> PreferencePair:
    required = PICKAPIC_COLUMNS if schema == "pickapic" else PAIR_COLUMNS
    missing = [c for c in required if row.get(c) is None]
    if missing:
        raise DataError(f"{where} has no column {missing[0]!r} (expected columns: {', '.join(required)})")
    prompt, first, second = (row["caption"], row["jpg_0"], row["jpg_1"]) if schema == "pickapic" else (
        row["prompt"], row["chosen"], row["rejected"])  # fmt: skip
    chosen, rejected, label = (first, second, label) if label >= 0.5 else (second, first, 1 - label)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    chosen, rejected = (_resolve(m, root, where) for m in (chosen, rejected))
    meta = {k: v for k, v in row.items() if k not in (*required, "label") and _jsonable(v)}
    return PreferencePair(prompt, chosen, rejected, label, meta or None)


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
    """Preference pairs read and decoded on demand: ``{"prompt", "chosen", "rejected", "label", "index"}`` with
    media in [0, 1]. Only the row index (8 bytes a pair) is held in memory; a row is read, checked and decoded
    when it is used, in the DataLoader's workers when there are some, and a bad one names its source row."""

    def __init__(
        self,
        rows,
        *,
        name: str = "data",
        root: Path | None = None,
        resolution: int | None = None,
        num_frames: int | None = None,
        drop_ties: bool = True,
        soft_labels: bool = False,
        max_samples: int | None = None,
    ):
        self.rows, self.name, self.root = rows, name, root
        self.resolution, self.num_frames = resolution, num_frames
        self.schema, kept, self.labels = select_pairs(rows, name, drop_ties=drop_ties, soft_labels=soft_labels)
        self.kept = kept[:max_samples] if max_samples else kept
        self.video = is_video(self.pair(0).chosen)

    def __len__(self) -> int:
        return len(self.kept)

    def source_row(self, index: int) -> int:
        return int(self.kept[index])

    def pair(self, index: int) -> PreferencePair:
        """Pair ``index`` (winner first), its row checked; media not decoded."""
        row = self.source_row(index)
        return _row_to_pair(self.rows[row], self.schema, float(self.labels[row]), self.root, f"{self.name}: row {row}")

    def media(self, index: int, which: str, pair: PreferencePair | None = None) -> torch.Tensor:
        where = f"{self.name}: row {self.source_row(index)} ({which})"
        ref = getattr(pair or self.pair(index), which)
        if self.video:
            return load_video(ref, self.resolution, self.num_frames, where)
        return load_image(ref, self.resolution, where)

    def __getitem__(self, index: int) -> dict:
        pair = self.pair(index)
        chosen, rejected = self.media(index, "chosen", pair), self.media(index, "rejected", pair)
        if chosen.shape != rejected.shape:
            raise DataError(
                f"{self.name}: row {self.source_row(index)}: chosen is {tuple(chosen.shape)} but rejected is "
                f"{tuple(rejected.shape)}; a pair must share one size (set a resolution to resize both)"
            )
        return {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "label": pair.label, "index": index}

    @staticmethod
    def collate(rows: list[dict]) -> dict:
        return {
            "prompt": [r["prompt"] for r in rows],
            "chosen": torch.stack([r["chosen"] for r in rows]),
            "rejected": torch.stack([r["rejected"] for r in rows]),
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.float32),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        }

    def fingerprint(self) -> str:
        """A hash of the source (the file's bytes, or the Arrow dataset's fingerprint), the pairs kept and the
        decoding settings; media files named by path are not read (write new files rather than editing them)."""
        h = hashlib.sha256(self.rows.fingerprint.encode())
        h.update(np.ascontiguousarray(self.kept).tobytes())
        h.update(f"{self.resolution}:{self.num_frames}".encode())
        return h.hexdigest()[:16]


class StreamingPairs(torch.utils.data.IterableDataset):
    """Pairs from a ``datasets.IterableDataset`` (``--streaming``), read and decoded as they come: this process's
    share of the stream (``split_dataset_by_node``; the DataLoader's workers split it further), shuffled in a
    buffer seeded by (seed, epoch). Ties are dropped and labels checked row by row. Items are those of
    :class:`PreferenceDataset`; ``index`` numbers them uniquely within an epoch (seeds per-example draws).
    Nothing is known of the stream's length, and the split over processes follows the stream's files, so a
    streamed run is not world-size invariant (a map-style one is)."""

    def __init__(self, stream, *, name: str = "stream", root: Path | None = None, resolution: int | None = None,
                 num_frames: int | None = None, drop_ties: bool = True, soft_labels: bool = False,
                 max_samples: int | None = None, seed: int = 0, buffer_size: int = 1000, rank: int = 0,
                 world: int = 1):  # fmt: skip
        from datasets.distributed import split_dataset_by_node

        self.name, self.root, self.resolution, self.num_frames = name, root, resolution, num_frames
        self.drop_ties, self.soft_labels, self.rank, self.world = drop_ties, soft_labels, rank, world
        columns = set(stream.column_names or next(iter(stream)).keys())
        self.schema = "pickapic" if set(PICKAPIC_COLUMNS) <= columns else "pairs"
        for c in PICKAPIC_COLUMNS if self.schema == "pickapic" else PAIR_COLUMNS:
            if c not in columns:
                raise DataError(f"{name}: the stream has no column {c!r} (expected: {', '.join(PAIR_COLUMNS)})")
        if max_samples:
            stream = stream.take(max_samples)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world).shuffle(seed=seed,
                                                                                           buffer_size=buffer_size)
        first = self._pair(next(iter(stream)), 0)
        self.video = is_video(first.chosen) if first is not None else False

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def source_row(self, index: int) -> int:
        return int(index)

    def _pair(self, row: dict, i: int) -> PreferencePair | None:
        where = f"{self.name}: streamed row {i} of process {self.rank}"
        column = "label_0" if self.schema == "pickapic" else "label"
        value = row.get(column, None if self.schema == "pickapic" else 1.0)
        if value is None:
            raise DataError(f"{where} has no column {column!r}")
        label = _check_label(value, where)
        if not self.soft_labels and label not in (0.0, 0.5, 1.0):
            raise DataError(f"{where}: {column} must be 0, 0.5 or 1 (or pass soft_labels), got {value}")
        if label == 0.5 and self.drop_ties:
            return None
        return _row_to_pair(row, self.schema, label, self.root, where)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = 0
        for i, row in enumerate(self.stream):
            pair = self._pair(row, i)
            if pair is None:
                continue
            where = f"{self.name}: streamed row {i} of process {self.rank}"
            load = (lambda m, w: load_video(m, self.resolution, self.num_frames, w)) if self.video else (
                lambda m, w: load_image(m, self.resolution, w))  # fmt: skip
            chosen, rejected = load(pair.chosen, where + " (chosen)"), load(pair.rejected, where + " (rejected)")
            if chosen.shape != rejected.shape:
                raise DataError(f"{where}: chosen is {tuple(chosen.shape)} but rejected is {tuple(rejected.shape)}")
            index = (n * workers + worker) * self.world + self.rank
            n += 1
            yield {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "label": pair.label, "index": index}

    collate = staticmethod(PreferenceDataset.collate)


def load_preference_data(
    source,
    *,
    resolution: int | None = None,
    num_frames: int | None = None,
    drop_ties: bool = True,
    soft_labels: bool = False,
    limit: int | None = None,
    split: str = "train",
    streaming: bool = False,
    seed: int = 0,
    state=None,
) -> PreferenceDataset | StreamingPairs:
    """Open and check preference pairs from any supported source (see the module docstring); ``limit`` keeps the
    first pairs only (``--max_train_samples``). With ``streaming``, a :class:`StreamingPairs` of this process's
    share (``state``: accelerate's process state, default the current one)."""
    if streaming:
        from .distributed import process_state

        state = state or process_state()
        stream, name, root = open_rows(source, split=split, streaming=True)
        return StreamingPairs(stream, name=name, root=root, resolution=resolution, num_frames=num_frames,
                              drop_ties=drop_ties, soft_labels=soft_labels, max_samples=limit, seed=seed,
                              rank=state.process_index, world=state.num_processes)  # fmt: skip
    rows, name, root = open_rows(source, split=split)
    return PreferenceDataset(rows, name=name, root=root, resolution=resolution, num_frames=num_frames,
                             drop_ties=drop_ties, soft_labels=soft_labels, max_samples=limit)  # fmt: skip


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
