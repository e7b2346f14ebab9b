"""Real multi-process runs on a CPU over gloo, the ``visalign`` CLI in every process. Used by the distributed tests;
a run that fails raises with the tail of each process's output.

:func:`torchrun` and :func:`accelerate_launch` start the processes as a user does. :func:`launch` starts the same
processes with the same environment contract (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``: the
``env://`` rendezvous torchrun sets up), forked from one server process that has imported torch, Diffusers and
visalign once per test session, so each run skips the ~10 s of imports per process; like torchrun, it stops the
other processes when one fails.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing import forkserver
from multiprocessing.connection import wait
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


PRELOAD = "tiny.preload"  # imported once by the server that forks the processes of launch()
_context = None


def launch(nproc: int, argv: list[str], *, timeout: float = 300, env: dict | None = None, script=None,
           logs: Path | None = None) -> str:  # fmt: skip
    """Run ``visalign ARGV`` (or ``python SCRIPT ARGV``) in ``nproc`` fresh processes forked from the preloaded
    server; returns their output (rank 0's first). A process that fails stops the others, as under torchrun."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([PRELOAD])
        saved = os.environ.get("PYTHONPATH")  # the server finds the preload module through it
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), saved]))
        try:
            forkserver.ensure_running()
        finally:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = Path(logs) if logs else Path(tempfile.mkdtemp(prefix="visalign-launch-"))
    logs.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), **(env or {})}  # fmt: skip
    procs = []
    for rank in range(nproc):
        rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}
        args = (rank_env, [str(a) for a in argv], str(script) if script else None, str(logs / f"rank{rank}.log"))
        procs.append(_context.Process(target=_process, args=args, daemon=False))
        procs[-1].start()
    deadline, failed = time.time() + timeout, None
    while any(p.exitcode is None for p in procs):
        left = deadline - time.time()
        if left <= 0 or failed is not None:
            break
        wait([p.sentinel for p in procs if p.exitcode is None], timeout=min(left, 1.0))
        failed = next((rank for rank, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
    for p in procs:  # the others of a failed run (or all of a run past its time) are stopped
        if p.exitcode is None:
            p.terminate()
            p.join(5)
            if p.exitcode is None:
                p.kill()
        p.join()
    output = "\n".join(_read(logs / f"rank{r}.log") for r in range(nproc))
    if failed is not None or any(p.exitcode != 0 for p in procs):
        codes = ", ".join(f"rank {r}: {p.exitcode}" for r, p in enumerate(procs))
        why = "timed out" if failed is None and time.time() >= deadline else "exited"
        raise AssertionError(f"launch({nproc}, {' '.join(map(str, argv))}) {why} ({codes}):\n{output[-8000:]}")
    return output


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else f"({log.name}: the process wrote nothing)"


def _process(env: dict, argv: list[str], script: str | None, log: str):
    """One process of :func:`launch`: its own environment, output to its log, then the CLI (or the script)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    if script is not None:
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")
        return
    from apps.cli import main

    code = main(argv)
    if code:
        sys.exit(code)
