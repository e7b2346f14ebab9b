"""Serving any registered reward over HTTP (``visalign serve-reward``), and the wire format it speaks.

A heavy reward model can live in a process (or virtual environment, or GPU) of its own; trainers call it with
``remote:http://127.0.0.1:PORT`` (:mod:`reward_models.remote`). Standard library only (``http.server``): one
JSON request per batch, no framework to install beside the reward.

Endpoints (protocol ``visalign-reward/1``)::

    GET  /health   {"status": "ok", "protocol", "reward", "device", "dtype"}
    GET  /spec     {"protocol", "spec": {name, modalities, needs_prompt, differentiable, pairwise,
                                         nominal_range, description}, "batch_size"}
    POST /score    {"media": MEDIA, "prompts": [str] | null}
                -> {"scores": [float|null], "valid": [bool], "components": {name: [float|null]}}

``MEDIA`` is ``{"encoding": ENC, "shape": [B, 3, H, W] | [B, T, 3, H, W], "data": ...}`` with ``ENC``:

* ``"png"`` (default): ``data`` holds one base64 PNG per image, or per video a list of base64 PNG frames.
  Lossless for 8-bit media (the client rounds ``x * 255``); about 2-4x smaller than raw float16 for real images.
* ``"f16"`` / ``"f32"``: ``data`` is one base64 string of the little-endian float16 / float32 array in C order.
  ``f32`` is exact (the remote scores equal local ones bit for bit); ``f16`` keeps 11 significant bits.

Non-finite numbers are sent as ``null`` (strict JSON) and read back as NaN. Errors come back as
``{"error": message, "type": class}``: 400 for bad input (the reward's own validation message), 404 for an
unknown path, 413 for a body over the size limit, 500 for a failure inside the reward. Requests are scored one
at a time (a lock around the model); HTTP handling runs in threads. There is no authentication: bind to
loopback (the default) unless the network is trusted.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from .base import Reward, RewardError, RewardInputError, RewardOutput, RewardSpec

PROTOCOL = "visalign-reward/1"
ENCODINGS = ("png", "f16", "f32")
_RAW_DTYPES = {"f16": np.dtype("<f2"), "f32": np.dtype("<f4")}
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- wire format
def png_base64(image: torch.Tensor) -> str:
    """``[3, H, W]`` float in ``[0, 1]`` -> base64 PNG (8-bit RGB, ``round(x * 255)``)."""
    from PIL import Image

    from visalign.media import to_uint8

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_from_base64(text: str) -> torch.Tensor:
    """base64 PNG -> ``[3, H, W]`` float in ``[0, 1]``."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def quantize(media: torch.Tensor, encoding: str) -> torch.Tensor:
    """What ``media`` become after a round trip through ``encoding`` (float32)."""
    if encoding == "png":
        return (media.detach().float().clamp(0, 1) * 255).round() / 255
    if encoding == "f16":
        return media.detach().half().float()
    return media.detach().float()


def encode_media(media: torch.Tensor, encoding: str = "png") -> dict:
    """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` in ``[0, 1]`` -> the ``MEDIA`` JSON object."""
    if encoding not in ENCODINGS:
        raise RewardInputError(f"media encoding must be one of {ENCODINGS}, got {encoding!r}")
    media = media.detach().cpu()
    if encoding == "png":
        if media.ndim == 4:
            data = [png_base64(x) for x in media]
        else:
            data = [[png_base64(frame) for frame in video] for video in media]
    else:
        array = np.ascontiguousarray(media.float().numpy().astype(_RAW_DTYPES[encoding]))
        data = base64.b64encode(array.tobytes()).decode("ascii")
    return {"encoding": encoding, "shape": list(media.shape), "data": data}


def decode_media(obj: dict) -> torch.Tensor:
    """The ``MEDIA`` JSON object -> float32 tensor.

    Raises:
        RewardInputError: a malformed object (unknown encoding, shape and data disagree, unreadable PNG).
    """
    if not isinstance(obj, dict) or not {"encoding", "shape", "data"} <= set(obj):
        raise RewardInputError("'media' must be an object with 'encoding', 'shape' and 'data'")
    encoding, shape, data = obj["encoding"], obj["shape"], obj["data"]
    if encoding not in ENCODINGS:
        raise RewardInputError(f"media encoding must be one of {ENCODINGS}, got {encoding!r}")
    if (
        not isinstance(shape, list)
        or len(shape) not in (4, 5)
        or not all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise RewardInputError(f"media shape must be [B, 3, H, W] or [B, T, 3, H, W], got {shape}")
    try:
        if encoding == "png":
            if not isinstance(data, list) or len(data) != shape[0]:
                raise RewardInputError(f"media data must list {shape[0]} PNGs (one per sample)")
            if len(shape) == 4:
                items = [png_from_base64(x) for x in data]
            else:
                items = [torch.stack([png_from_base64(f) for f in video]) for video in data]
            media = torch.stack(items) if items else torch.zeros(shape)
        else:
            raw = base64.b64decode(data, validate=True)
            array = np.frombuffer(raw, dtype=_RAW_DTYPES[encoding])
            media = torch.from_numpy(array.astype(np.float32)).reshape(shape)
    except RewardInputError:
        raise
    except Exception as e:  # bad base64, unreadable PNG, wrong byte count, frames of different sizes
        raise RewardInputError(f"cannot decode {encoding} media of shape {shape}: {e}") from e
    if list(media.shape) != shape:
        raise RewardInputError(f"decoded media have shape {list(media.shape)}, but the request says {shape}")
    return media


def _floats(values: torch.Tensor) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values.detach().float().cpu().tolist()]


def output_to_json(out: RewardOutput) -> dict:
    return {
        "scores": _floats(out.scores),
        "valid": [bool(v) for v in out.valid.cpu().tolist()],
        "components": {k: _floats(v) for k, v in out.components.items()},
    }


def output_from_json(obj: dict) -> RewardOutput:
    """The ``/score`` response -> :class:`RewardOutput` (``null`` -> NaN)."""

    def tensor(values):
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)

    return RewardOutput(
        tensor(obj["scores"]),
        {k: tensor(v) for k, v in obj.get("components", {}).items()},
        torch.tensor([bool(v) for v in obj["valid"]], dtype=torch.bool),
    )


def spec_to_json(spec: RewardSpec) -> dict:
    return asdict(spec)


def spec_from_json(obj: dict) -> RewardSpec:
    rng = obj.get("nominal_range")
    return RewardSpec(
        name=str(obj["name"]),
        modalities=tuple(obj["modalities"]),
        needs_prompt=bool(obj["needs_prompt"]),
        differentiable=bool(obj["differentiable"]),
        pairwise=bool(obj.get("pairwise", False)),
        nominal_range=None if rng is None else (float(rng[0]), float(rng[1])),
        description=str(obj.get("description", "")),
    )


# ----------------------------------------------------------------------------------------------- server
class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "visalign-reward/1"

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left: nothing to tell it
            logger.debug("client %s left before the response", self.address_string())

    def _error(self, status: int, error: Exception | str) -> None:
        kind = type(error).__name__ if isinstance(error, Exception) else "Error"
        self._send(status, {"error": str(error), "type": kind})

    def do_GET(self):  # noqa: N802 (http.server's naming)
        app = self.server.app
        if self.path == "/health":
            self._send(
                200,
                {
                    "status": "ok",
                    "protocol": PROTOCOL,
                    "reward": app.reward.spec.name,
                    "device": str(app.reward.device),
                    "dtype": str(app.reward.dtype).removeprefix("torch."),
                },
            )
        elif self.path == "/spec":
            self._send(
                200, {"protocol": PROTOCOL, "spec": spec_to_json(app.reward.spec), "batch_size": app.reward.batch_size}
            )
        else:
            self._error(404, f"unknown path {self.path}; use GET /health, GET /spec or POST /score")

    def do_POST(self):  # noqa: N802
        app = self.server.app
        if self.path != "/score":
            self._error(404, f"unknown path {self.path}; use POST /score")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > app.max_body_bytes:
            self._error(
                413,
                f"request body of {length} bytes exceeds the server's limit of {app.max_body_bytes}; "
                "send smaller batches",
            )
            self.close_connection = True
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict) or "media" not in request:
                raise RewardInputError("the request must be a JSON object with 'media' (and 'prompts')")
            out = app.score(decode_media(request["media"]), request.get("prompts"))  # the reward validates
        except json.JSONDecodeError as e:
            self._error(400, RewardInputError(f"the request body is not valid JSON: {e}"))
        except RewardError as e:
            self._error(400, e)
        except Exception as e:  # a failure inside the reward: report it, keep serving
            logger.exception("scoring failed")
            self._error(500, f"{type(e).__name__}: {e}")
        else:
            self._send(200, output_to_json(out))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: RewardServer


class RewardServer:
    """An HTTP server around one reward (see the module docstring for the protocol).

    Args:
        reward: any :class:`~reward_models.base.Reward` (already on its device and dtype).
        host: interface to bind (``127.0.0.1``: this machine only).
        port: TCP port; ``0`` picks a free one (read it from :attr:`url`).
        max_body_mb: largest accepted request body.
    """

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, max_body_mb: float = 1024):
        self.reward = reward
        self.max_body_bytes = int(max_body_mb * 2**20)
        self._lock = threading.Lock()  # one model, scored by one request at a time
        self._thread: threading.Thread | None = None
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def score(self, media: torch.Tensor, prompts) -> RewardOutput:
        with self._lock, torch.no_grad():
            return self.reward(media, prompts)

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`close` (or Ctrl-C)."""
        self.httpd.serve_forever(poll_interval=0.1)

    def start(self) -> RewardServer:
        """Serve in a background (daemon) thread; returns ``self``."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"reward-server-{self.url}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port (connections are refused afterwards)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
