"""This process's place in a multi-process run, from accelerate's state.

Under ``torchrun`` or ``accelerate launch`` on machines without CUDA, accelerate forms the process group only
when told to use the CPU; otherwise every process silently trains alone (same command, N unsynchronised copies).
:func:`process_state` tells it, so two processes on a laptop CPU form one gloo group as GPUs form an NCCL one.
"""

from __future__ import annotations

import os


def launched_processes() -> int:
    """The world size a launcher (torchrun, accelerate launch, MPI) announced; 1 when run directly."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def process_state():
    """accelerate's ``PartialState`` (process index, count, device, ``wait_for_everyone``), CPU groups included."""
    import torch
    from accelerate import PartialState

    cpu = launched_processes() > 1 and not torch.cuda.is_available()
    if cpu:  # the Accelerator reads this; the first PartialState decides the group (a singleton)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=cpu)
