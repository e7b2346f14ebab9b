"""Is the data path ever the bottleneck? Diffusion-DPO steps/s reading a Pick-a-Pic-schema parquet as a stream
(``--streaming``: rows read, JPEGs decoded and resized in ``--num_workers`` DataLoader workers) against the same
step on one batch already in memory, side by side in one run.

    python benchmarks/bench_stream.py                                    # small random UNet, CPU, 64 px
    python benchmarks/bench_stream.py --preset sdxl --resolution 1024 --batch 1 --device cuda --dtype bf16 \
        --gradient_checkpointing --num_workers 4                         # SDXL architecture on a GPU

Both modes run visalign's trainer with ``--cache none`` (the VAE and text encoders run every step in both), so
the only difference is where the batch comes from. Each mode runs in a fresh process. Prints the ratio and
writes JSON (``--out``, default benchmarks/results/bench_stream.json); the goal is >= 0.95.
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


def child(args) -> None:
    from trainers.base import Trainer
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig

    cfg = DiffusionDPOConfig(
        model=args.model, data=args.data, output_dir=str(Path(args.tmp) / args.mode), streaming=True,
        num_workers=args.num_workers, max_steps=args.warmup + args.steps, batch_size=args.batch,
        resolution=args.resolution, report_to="none", progress=False, device=args.device, dtype=args.dtype,
        mixed_precision="bf16" if args.dtype == "bf16" else "no", gradient_checkpointing=args.gradient_checkpointing,
        lr_scheduler="constant",
    )  # fmt: skip
    task = DiffusionDPO(cfg)
    trainer = Trainer(task)
    if args.mode == "in-memory":  # the stream's first batch, resident, every step
        first = next(trainer._batches())
        trainer._batches = lambda: iter(lambda: first, None)
    stamps: list[float] = []

    def on_step_end(step):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    task.on_step_end = on_step_end
    trainer.train()
    timed = stamps[args.warmup :]
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    (Path(args.tmp) / f"{args.mode}.json").write_text(json.dumps({"step_s": per_step,
                                                                  "pairs_per_s": args.batch / per_step}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="random-weight pipeline (benchmarks/bench_dpo.py presets)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--out", default="benchmarks/results/bench_stream.json")
    for hidden in ("--_mode", "--_model", "--_data", "--_tmp"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._mode:
        args.mode, args.model, args.data, args.tmp = args._mode, args._model, args._data, args._tmp
        return child(args)

    from benchmarks.bench_data import write_pickapic
    from benchmarks.bench_dpo import build_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    build_pipeline(args.preset).save_pretrained(tmp / "model")
    pairs = int(1.3 * args.batch * (args.warmup + args.steps)) + 8  # every step a new batch (5% ties dropped)
    write_pickapic(tmp / "pairs.parquet", pairs, size=args.resolution, group=64)
    rows = {}
    for mode in ("in-memory", "streaming"):
        argv = [a for k, v in vars(args).items() if not k.startswith("_") and k != "out" and v not in (False, None)
                for a in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]  # fmt: skip
        cmd = [sys.executable, __file__, *argv, "--_mode", mode, "--_model", str(tmp / "model"), "--_data",
               str(tmp / "pairs.parquet"), "--_tmp", str(tmp)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
        rows[mode] = json.loads((tmp / f"{mode}.json").read_text())
        print(f"{mode:>10}: {rows[mode]['pairs_per_s']:.2f} pairs/s ({rows[mode]['step_s']:.3f} s/step)", flush=True)
    ratio = rows["streaming"]["pairs_per_s"] / rows["in-memory"]["pairs_per_s"]
    print(f"streaming / in-memory throughput: {ratio:.3f} (goal >= 0.95)")
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({cpu}, {os.cpu_count()} cores)"
    result = {"device": device, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "rows": rows, "ratio": ratio}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
