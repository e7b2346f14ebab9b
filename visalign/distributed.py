"""This process's place in a multi-process run, from accelerate's state.

Under ``torchrun`` or ``accelerate launch`` on machines without CUDA, accelerate forms the process group only
when told to use the CPU; otherwise every process silently trains alone (same command, N unsynchronised copies).
:func:`process_state` tells it, so two processes on a laptop CPU form one gloo group as GPUs form an NCCL one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_processes() -> int:
    """The world size a launcher (torchrun, accelerate launch, MPI) announced; 1 when run directly."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def process_state():
    """accelerate's ``PartialState`` (process index, count, device, ``wait_for_everyone``), CPU groups included."""
    from accelerate import PartialState

    from visalign.sharding import launch_sharding

    launch_sharding()  # an FSDP / DeepSpeed request is read and taken off the environment: visalign shards
    cpu = launched_processes() > 1 and not torch.cuda.is_available()
    if cpu:  # the Accelerator reads this; the first PartialState decides the group (a singleton)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=cpu)


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sends each process the summed gradient of its own rows (an
    all-reduce, which gloo has; gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, local):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x):
    """``x`` ``[B, ...]`` of every process concatenated in rank order, differentiably: a loss over the global
    batch, computed the same on every process, gives each process the gradient of its own rows, times the
    number of processes, so that averaging parameter gradients over processes (DDP's rule) yields exactly the
    one-process gradient. Every process must pass the same ``B``. Returns ``x`` itself when run alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each CPU tensor concatenated over processes in rank order (itself alone in a one-process run); every
    process must pass the same number of rows."""
    state = process_state()
    if state.num_processes == 1:
        return tensors
    from accelerate.utils import gather

    device = state.device
    return tuple(gather(t.to(device)).cpu() for t in tensors)
