"""The gallery tab's plain functions: ``visalign evaluate`` reports (``report.json`` + ``grid.png``) found under
one folder, shown as a metric table and one row of samples per variant. Nothing here imports Gradio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from visalign.errors import ConfigError

MAX_REPORTS = 200
REPORT_DEPTH = 4  # how deep under the reports folder to look (outputs/ also holds caches of many small files)


def find_reports(root: str | os.PathLike, limit: int = MAX_REPORTS) -> list[str]:
    """Folders under ``root`` holding an evaluate report (``report.json`` with ``variants`` and ``grid.png``),
    as paths relative to ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    candidates = sorted(p for depth in range(REPORT_DEPTH + 1) for p in root.glob("*/" * depth + "report.json"))
    for report in candidates:
        if not (report.parent / "grid.png").is_file():
            continue
        try:
            data = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("variants"), dict):
            found.append(str(report.parent.relative_to(root)))
            if len(found) >= limit:
                break
    return found


def split_grid_rows(grid: torch.Tensor, n_rows: int, padding: int = 2) -> list[torch.Tensor]:
    """Cut a :func:`visalign.media.image_grid` image ``[3, H', W']`` into its ``n_rows`` rows ``[3, h, W']``."""
    cell = (grid.shape[-2] - padding) // n_rows  # each row: the image plus one padding band
    return [grid[:, r * cell + padding : (r + 1) * cell, :] for r in range(n_rows)]


def load_report(root: str | os.PathLike, name: str) -> dict:
    """An evaluate report under ``root`` for the gallery: metric table and one grid row per variant.

    Returns:
        ``{"headers": [...], "rows": [[variant, values...]], "variants": [...], "panels": [image [3, h, W] per
        variant], "prompts": [...], "seeds": [...], "base": str}``: ``panels`` are the rows of ``grid.png``
        (samples of the first ``min(8, len(prompts))`` prompts).

    Raises:
        ConfigError: ``name`` leads outside ``root`` or is not a report.
    """
    from visalign.data import load_image

    root = Path(root).resolve()
    folder = (root / name).resolve()
    if not folder.is_relative_to(root) or not (folder / "report.json").is_file():
        raise ConfigError(f"no evaluate report {name!r} under {root}")
    report = json.loads((folder / "report.json").read_text())
    variants: dict[str, dict] = report["variants"]
    keys = sorted({k for row in variants.values() for k in row})
    rows = [[v] + [round(row[k], 4) if isinstance(row.get(k), (int, float)) else None for k in keys]
            for v, row in variants.items()]  # fmt: skip
    grid = load_image(folder / "grid.png")
    ncol = min(len(report.get("prompts", [])), 8)
    prompts = report.get("prompts", [])[:ncol]
    return {
        "headers": ["variant", *keys],
        "rows": rows,
        "variants": list(variants),
        "panels": split_grid_rows(grid, len(variants)),
        "prompts": prompts,
        "seeds": report.get("seeds", [])[:ncol],
        "base": report.get("base"),
    }
