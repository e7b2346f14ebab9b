"""``visalign serve-reward``: serve any registered reward over HTTP, for ``remote:http://HOST:PORT``.

Run it in the environment (virtual env, machine, GPU) where the reward model lives; a trainer elsewhere scores
with ``--reward remote:http://127.0.0.1:PORT``. Endpoints: ``GET /health``, ``GET /spec``, ``POST /score``
(protocol and media encodings in :mod:`reward_models.serving`). The first line printed is
``serving SPEC at URL``; ``--port 0`` picks a free port. It serves until Ctrl-C / SIGTERM. The server has no
authentication: it binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import Literal

from visalign.config import field
from visalign.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeRewardConfig:
    reward: str = field(help="reward spec to serve: 'hps-v2.1', 'vlm-judge(mode=rating)', 'hps-v2.1:1,clip:.5'")
    port: int = field(8765, help="TCP port (0: any free port; the URL is printed)")
    host: str = field("127.0.0.1", help="interface to bind; no authentication, so keep loopback unless trusted")
    device: str = field("auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    dtype: Literal["fp32", "fp16", "bf16"] = field("fp32", help="reward weights dtype")
    batch_size: int | None = field(None, help="media per forward chunk on the server (default: the reward's)")
    max_body_mb: float = field(1024.0, help="largest accepted request body, in MiB")
    random_weights: Literal["none", "tiny", "full"] = field(
        "none", help="serve random weights of the same architecture (smoke tests, benchmarks): tiny or full"
    )

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_body_mb <= 0:
            raise ConfigError(f"max_body_mb must be > 0, got {self.max_body_mb}")


def build_server(cfg: ServeRewardConfig):
    """Build the reward and a (not yet serving) :class:`~reward_models.serving.RewardServer` bound to the port."""
    from apps.generate import resolve_device
    from reward_models import build_random_reward, build_reward
    from reward_models.serving import RewardServer

    device = resolve_device(cfg.device)
    if cfg.random_weights == "none":
        reward = build_reward(cfg.reward, device=device, dtype=cfg.dtype)
    else:
        reward = build_random_reward(cfg.reward, cfg.random_weights, device=device, dtype=cfg.dtype)
    if cfg.batch_size is not None:
        reward.batch_size = cfg.batch_size
    try:
        return RewardServer(reward, cfg.host, cfg.port, cfg.max_body_mb)
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from e


def run(cfg: ServeRewardConfig) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    server = build_server(cfg)
    if cfg.host not in LOOPBACK:
        print(
            f"warning: serving on {cfg.host} without authentication; anyone who can reach it can use it",
            file=sys.stderr,
        )

    def stop(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None  # SIGTERM stops it cleanly too
    print(f"serving {cfg.reward} at {server.url} (GET /health, GET /spec, POST /score)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("serve-reward: stopped", flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        server.close()


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    cfg = parse_config(ServeRewardConfig, argv, prog="visalign serve-reward", description=__doc__.splitlines()[0])
    run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
