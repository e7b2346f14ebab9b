"""Sharding: what each process holds for a full fine-tune, unsharded (data parallel) and sharded (FSDP2 as ZeRO-2
and ZeRO-3), side by side in one run.

    python benchmarks/bench_sharding.py                                   # 2 processes on the CPU (gloo)
    python benchmarks/bench_sharding.py --preset sd15 --processes 8 --device cuda --resolution 512   # 8 GPUs

Each strategy runs ``--steps`` Diffusion-DPO full fine-tuning steps (``visalign``'s trainer, frozen reference copy
included) in fresh processes started by torchrun. Every process reports, just before each optimizer step, the
bytes of parameters (policy and reference), gradients and AdamW state it holds, its time per step, and its peak
memory (CUDA allocation on a GPU; RSS on a CPU, which includes loading the whole model before it is sharded).
Prints a table and writes JSON (``--out``, default benchmarks/results/bench_sharding.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRATEGIES = ("no", "shard_grad_op", "full_shard")


def local_bytes(tensors) -> int:
    from visalign.sharding import is_sharded

    return sum((t.to_local() if is_sharded(t) else t).nbytes for t in tensors if t is not None)


def child(args) -> None:
    """One process of one strategy: train, measuring at every optimizer step."""
    from trainers.base import Trainer
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from visalign.distributed import process_state

    state = process_state()
    cfg = DiffusionDPOConfig(
        model=args.model, data=args.data, output_dir=str(Path(args.tmp) / f"run-{args.sharding}"),
        full_finetune=True, sharding=args.sharding, max_steps=args.steps, batch_size=args.batch,
        resolution=args.resolution, cache="none", report_to="none", progress=False, device=args.device,
        learning_rate=1e-6, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    trainer = Trainer(DiffusionDPO(cfg))
    model, optimizer = trainer.task.model, trainer.optimizer
    record, step = {}, optimizer.step
    times: list[float] = []

    def measured_step(*a, **kw):
        record["parameters"] = local_bytes(model.denoiser.parameters())
        record["reference"] = local_bytes(model._reference.parameters())
        record["gradients"] = local_bytes(p.grad for p in trainer.params)
        out = step(*a, **kw)
        record["optimizer_state"] = local_bytes(v for s in optimizer.state.values() for v in s.values()
                                                if torch.is_tensor(v))  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return out

    optimizer.step = measured_step
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [b - a for a, b in zip(times, times[1:])]
    import resource

    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    record.update(step_s_median=sorted(steps)[len(steps) // 2] if steps else None, peak_bytes=peak,
                  rank=state.process_index)  # fmt: skip
    (Path(args.tmp) / f"{args.sharding}-rank{state.process_index}.json").write_text(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="random-weight pipeline (benchmarks/bench_dpo.py presets)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="pairs per process per step")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto (each process its GPU, else the CPU) or cpu")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--out", default="benchmarks/results/bench_sharding.json")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sharding", default="no", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return child(args)

    from benchmarks.bench_dpo import build_pipeline, write_pairs

    tmp = tempfile.mkdtemp(prefix="bench-sharding-")
    model, data = Path(tmp) / "model", Path(tmp) / "pairs"
    build_pipeline(args.preset).save_pretrained(model)
    pairs = argparse.Namespace(batches=[args.batch * args.processes * args.steps], resolution=args.resolution,
                               num_frames=None)  # fmt: skip
    write_pairs(data, pairs)
    rows = []
    for strategy in args.strategies.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
               __file__, "--_child", "--sharding", strategy, "--model", str(model), "--data", str(data),
               "--tmp", tmp, "--resolution", str(args.resolution), "--batch", str(args.batch), "--steps",
               str(args.steps), "--device", args.device] + (["--gradient_checkpointing"] if args.gradient_checkpointing
                                                            else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{strategy} failed:\n{done.stderr[-4000:]}")
        ranks = [json.loads((Path(tmp) / f"{strategy}-rank{r}.json").read_text()) for r in range(args.processes)]
        row = {"strategy": strategy, **{k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank"}}
        row["held_bytes"] = sum(row[k] for k in ("parameters", "reference", "gradients", "optimizer_state"))
        rows.append(row)
        print(f"{strategy:>14}: held per process {row['held_bytes'] / 2**20:8.1f} MiB (parameters "
              f"{row['parameters'] / 2**20:.1f}, reference {row['reference'] / 2**20:.1f}, gradients "
              f"{row['gradients'] / 2**20:.1f}, AdamW {row['optimizer_state'] / 2**20:.1f}); peak "
              f"{row['peak_bytes'] / 2**20:.0f} MiB; {row['step_s_median']:.3f} s/step", flush=True)  # fmt: skip
    base = rows[0]["held_bytes"]
    for row in rows:
        row["held_vs_first"] = row["held_bytes"] / base
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu})"
    result = {"device": device, "cpus": os.cpu_count(), "args": {k: v for k, v in vars(args).items()
              if not k.startswith("_") and k not in ("model", "data", "tmp", "sharding")}, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
