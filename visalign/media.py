"""Writing images and videos: PNG, MP4 (ffmpeg via imageio) and GIF, atomically; image and video grids.

Media convention everywhere: float tensors in ``[0, 1]``, RGB, channel-first (``[3, H, W]`` images,
``[F, 3, H, W]`` videos).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

VIDEO_FORMATS = ("mp4", "gif")


def to_uint8(media: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` float in [0,1] to ``[..., H, W, 3]`` uint8."""
    array = (media.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return array.movedim(-3, -1).numpy()


def _atomic(path: Path, suffix: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save ``[3, H, W]`` in [0,1] as PNG (or any format PIL infers from the suffix)."""
    from PIL import Image

    path = Path(path)
    tmp = _atomic(path, path.suffix)
    try:
        Image.fromarray(to_uint8(image)).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_video(video: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """Save ``[F, 3, H, W]`` in [0,1] as MP4 (H.264, yuv420p) or GIF, chosen by the suffix."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"unsupported video format {path.suffix!r}; use one of {VIDEO_FORMATS}")
    frames = to_uint8(video)
    tmp = _atomic(path, path.suffix)
    try:
        if fmt == "gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        else:
            import imageio.v2 as imageio

            # yuv420p needs even sizes; pad by one pixel rather than resample
            h, w = frames.shape[1:3]
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            with imageio.get_writer(
                tmp,
                format="FFMPEG",
                fps=fps,
                codec="libx264",
                pixelformat="yuv420p",
                macro_block_size=1,
                ffmpeg_log_level="error",
            ) as writer:
                for frame in frames:
                    writer.append_data(frame)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """Read an MP4 or GIF back as ``[F, 3, H, W]`` float in [0,1]."""
    import imageio.v3 as iio

    frames = iio.imread(path, index=None)
    if frames.ndim == 3:
        frames = frames[None]
    return torch.from_numpy(np.ascontiguousarray(frames[..., :3])).movedim(-1, -3).float() / 255


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """Tile ``[N, 3, H, W]`` into one ``[3, H', W']`` image (white padding)."""
    from torchvision.utils import make_grid

    return make_grid(images.float().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)


def video_grid(videos: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """Tile ``[N, F, 3, H, W]`` videos side by side: ``[F, 3, H', W']``, frame ``f`` the grid of every frame ``f``."""
    return torch.stack([image_grid(videos[:, f], nrow=nrow, padding=padding) for f in range(videos.shape[1])])
