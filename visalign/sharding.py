"""Sharded data parallelism: the trainable model split over processes (PyTorch FSDP2, ``fully_shard``).

One code path serves both kinds of accelerate config a user may already have:

* an **FSDP** config (``distributed_type: FSDP``): ``fsdp_reshard_after_forward: true`` (or the FSDP1 strategy
  ``FULL_SHARD``) shards parameters, gradients and optimizer state; ``false`` (``SHARD_GRAD_OP``) keeps the
  parameters whole between forward and backward and shards gradients and optimizer state; ``NO_SHARD`` is plain
  data parallelism; ``fsdp_offload_params`` keeps the shards on the CPU; ``fsdp_transformer_layer_cls_to_wrap``
  names the blocks sharded one by one (default: the model's own ``_no_split_modules``).
* a **DeepSpeed** config (``distributed_type: DEEPSPEED``, ``zero_stage`` or a ``deepspeed_config_file``): ZeRO-3
  is the full shard, ZeRO-1 and ZeRO-2 the gradient-and-optimizer shard, ``offload_param_device: cpu`` /
  ``offload_optimizer_device: cpu`` the CPU offload. visalign partitions with FSDP2 (the same partitioning, in
  PyTorch itself); DeepSpeed's engine, fused optimizers and its other config fields are not used, and DeepSpeed
  need not be installed.

``accelerate launch`` announces the config through environment variables; :func:`launch_sharding` reads them once,
per process, and removes them so that accelerate itself forms a plain data-parallel group (on a CPU too, where
accelerate has no FSDP or DeepSpeed), and the trainer shards. ``--sharding`` on the command line wins over both.

Sharding changes where parameters live, not what is computed: every process still draws per-example noise and
timesteps, FSDP averages gradients as DDP does, so a sharded run trains the weights an unsharded one does (tested
with two processes). Evaluation and the final export run on every process (each forward needs every shard); the
main process writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch

from visalign.errors import ConfigError

Strategy = Literal["no", "shard_grad_op", "full_shard"]
STRATEGIES = ("no", "shard_grad_op", "full_shard")


@dataclass(frozen=True)
class Sharding:
    """What to shard: ``full_shard`` (ZeRO-3), ``shard_grad_op`` (ZeRO-2) or ``no``; ``offload`` keeps shards
    on the CPU (GPUs only); ``blocks``: class names of the submodules sharded one by one (``None``: the model's
    ``_no_split_modules``); ``source``: where the request came from, for messages."""

    strategy: Strategy = "no"
    offload: bool = False
    blocks: tuple[str, ...] | None = None
    source: str = "default"

    @property
    def enabled(self) -> bool:
        return self.strategy != "no"


_FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD",
             "FSDP_OFFLOAD_PARAMS", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_AUTO_WRAP_POLICY")  # fmt: skip
_DS = "ACCELERATE_DEEPSPEED_"
_DEEPSPEED_ENV = ("ACCELERATE_USE_DEEPSPEED", _DS + "ZERO_STAGE", _DS + "CONFIG_FILE", _DS + "OFFLOAD_PARAM_DEVICE",
                  _DS + "OFFLOAD_OPTIMIZER_DEVICE")  # fmt: skip
_launch: Sharding | None = None


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def fsdp_strategy(version: str | None, reshard_after_forward: str | None, sharding_strategy: str | None) -> Strategy:
    """An accelerate FSDP config's strategy, read as accelerate reads it: FSDP2 (``fsdp_version: 2``) from
    ``reshard_after_forward`` (``true``/``false``), FSDP1 from ``sharding_strategy`` (``FULL_SHARD``,
    ``SHARD_GRAD_OP``, ``NO_SHARD``, ``HYBRID_SHARD(_ZERO2)`` or 1-5)."""
    names = {"FULL_SHARD": "full_shard", "1": "full_shard", "TRUE": "full_shard", "HYBRID_SHARD": "full_shard",
             "4": "full_shard", "SHARD_GRAD_OP": "shard_grad_op", "2": "shard_grad_op", "FALSE": "shard_grad_op",
             "HYBRID_SHARD_ZERO2": "shard_grad_op", "5": "shard_grad_op", "NO_SHARD": "no", "3": "no"}  # fmt: skip
    value = reshard_after_forward if str(version).strip() == "2" else sharding_strategy
    key = str(value).strip().upper()
    if value is None or key in ("", "NONE"):
        return "full_shard"  # accelerate's default
    if key not in names:
        raise ConfigError(f"unknown FSDP sharding strategy {value!r}; use one of {sorted(set(names))}")
    return names[key]  # type: ignore[return-value]


def deepspeed_sharding(stage: str | int | None, config_file: str | None, offload_param: str | None = None,
                       offload_optimizer: str | None = None) -> Sharding:  # fmt: skip
    """A DeepSpeed ZeRO request as a :class:`Sharding`; the config file's ``zero_optimization`` wins over the
    separate stage and offload values (as in accelerate)."""
    source = "DeepSpeed config"
    if config_file:
        try:
            zero = json.loads(open(config_file).read()).get("zero_optimization", {})
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the DeepSpeed config file {config_file}: {e}") from e
        stage = zero.get("stage", stage)
        offload_param = (zero.get("offload_param") or {}).get("device", offload_param)
        offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", offload_optimizer)
        source = f"DeepSpeed config {config_file}"
    if str(stage).strip().lower() in ("auto", "none", ""):
        stage = 2
    try:
        stage = int(stage)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"DeepSpeed zero stage must be 0-3, got {stage!r}") from e
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed zero stage must be 0-3, got {stage}")
    strategy: Strategy = {0: "no", 1: "shard_grad_op", 2: "shard_grad_op", 3: "full_shard"}[stage]
    offload = any(str(d).lower() in ("cpu", "nvme") for d in (offload_param, offload_optimizer) if d)
    return Sharding(strategy, offload, None, f"{source} (ZeRO-{stage})")


def launch_sharding() -> Sharding:
    """The sharding an ``accelerate launch`` config asks for (FSDP or DeepSpeed), read once per process; the
    variables are then removed so that accelerate forms a plain data-parallel group and visalign shards."""
    global _launch
    if _launch is not None:
        return _launch
    env = os.environ
    if _true(env.get("ACCELERATE_USE_FSDP")):
        blocks = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        _launch = Sharding(
            fsdp_strategy(*(env.get(f"FSDP_{k}") for k in ("VERSION", "RESHARD_AFTER_FORWARD", "SHARDING_STRATEGY"))),
            _true(env.get("FSDP_OFFLOAD_PARAMS")),
            tuple(b.strip() for b in blocks.split(",") if b.strip()) if blocks else None,
            "accelerate FSDP config",
        )
    elif _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        _launch = deepspeed_sharding(*(env.get(_DS + k) for k in ("ZERO_STAGE", "CONFIG_FILE", "OFFLOAD_PARAM_DEVICE",
                                                                  "OFFLOAD_OPTIMIZER_DEVICE")))  # fmt: skip
    else:
        _launch = Sharding()
    for name in _FSDP_ENV + _DEEPSPEED_ENV:
        env.pop(name, None)
    return _launch


def resolve_sharding(flag: str | None) -> Sharding:
    """``--sharding`` if given, else the launch config's request (:func:`launch_sharding`)."""
    launched = launch_sharding()
    if flag is None:
        return launched
    if flag not in STRATEGIES:
        raise ConfigError(f"sharding must be one of {', '.join(STRATEGIES)}, got {flag!r}")
    return Sharding(flag, launched.offload, launched.blocks, "--sharding")  # type: ignore[arg-type]


def block_names(module: torch.nn.Module, sharding: Sharding) -> set[str]:
    names = sharding.blocks if sharding.blocks is not None else getattr(module, "_no_split_modules", None) or ()
    return set(names)


def shard_module(module: torch.nn.Module, sharding: Sharding, device: torch.device | str) -> int:
    """Shard ``module`` in place over every process: each block named by :func:`block_names` (innermost first),
    then the module itself. Parameters become DTensors (each process holds its slice); gradients are averaged over
    processes as DDP's are. ``shard_grad_op`` keeps a unit's parameters whole from its forward to its backward; a
    module with no trainable parameter is resharded after each forward whatever the strategy. Returns the number
    of sharded units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = torch.device(device)
    offload = CPUOffloadPolicy() if sharding.offload and device.type != "cpu" else OffloadPolicy()
    # a frozen module (a reference copy) has no backward to reshard it: it reshards after every forward
    frozen = not any(p.requires_grad for p in module.parameters())
    kwargs = dict(reshard_after_forward=sharding.strategy == "full_shard" or frozen, offload_policy=offload)
    names = block_names(module, sharding)
    units = 0
    for sub in reversed(list(module.modules())):  # children before their parents
        if sub is not module and type(sub).__name__ in names and any(True for _ in sub.parameters()):
            fully_shard(sub, **kwargs)
            units += 1
    fully_shard(module, **kwargs)
    return units + 1


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather of a sharded one: every process must call it); a plain one as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every sharded tensor of ``state`` gathered whole, in key order (a collective: every process calls it)."""
    return {k: full(v) for k, v in state.items()}


def local_state(state: dict) -> dict:
    """This process's slice of every sharded tensor (nested dicts and lists too), for a per-process checkpoint."""
    if is_sharded(state):
        return state.to_local()
    if isinstance(state, dict):
        return {k: local_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local_state(v) for v in state)
    return state


def from_local(local: torch.Tensor, like) -> torch.Tensor:
    """``local`` (this process's slice, from :func:`local_state`) as a tensor sharded like ``like``."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    local = local.to(device=like.to_local().device, dtype=like.dtype)
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def state_from_local(local: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A per-process checkpoint's tensors back as sharded ones, shaped by the live state ``like``."""
    return {k: from_local(v, like[k]) if k in like else v for k, v in local.items()}


def optimizer_from_local(local: dict, params: list[torch.nn.Parameter]) -> dict:
    """An optimizer state dict saved by :func:`local_state` with its per-parameter tensors sharded like the
    parameters again (state index i belongs to ``params[i]``, the order the optimizer was built with)."""
    state = {}
    for index, values in local["state"].items():
        param = params[int(index)]
        state[index] = {
            k: from_local(v, param) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in values.items()
        }  # fmt: skip (step counters stay plain)
    return {**local, "state": state}
