"""Real multi-process runs on a CPU: ``torchrun`` (``torch.distributed.run``) over gloo, the ``visalign`` CLI in
every process. Used by the distributed tests; a run that fails raises with the tail of each process's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, argv: list[str], *, timeout: float = 300, env: dict | None = None, script=None) -> str:
    """Run ``visalign ARGV`` (or ``python SCRIPT ARGV``) in ``nproc`` processes (a standalone rendezvous on
    loopback); returns the output."""
    target = [str(script)] if script else ["--module", "apps.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
           *argv]  # fmt: skip
    return run(cmd, timeout, env)


def accelerate_launch(config_file: str | Path, argv: list[str], *, timeout: float = 300, env: dict | None = None):
    """Run ``visalign ARGV`` with ``accelerate launch --config_file CONFIG_FILE`` (as a user would)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--module",
           "apps.cli", *argv]  # fmt: skip
    return run(cmd, timeout, env)


def run(cmd: list[str], timeout: float, env: dict | None) -> str:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")
    return done.stdout + done.stderr


def cli_args(values: dict) -> list[str]:
    """``{"max_steps": 3, "progress": False}`` -> ``["--max_steps", "3", "--progress", "False"]``."""
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]
