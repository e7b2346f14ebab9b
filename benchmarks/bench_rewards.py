"""Scoring throughput of every registered reward, with random weights of the real architectures.

``--size tiny`` (default; CPU, seconds) measures the protocol's overhead on tiny models; ``--size full`` builds
the published shapes (ViT-H-14 for HPS, CLIP-H for PickScore, BLIP ViT-L + BERT-base for ImageReward, ...)
with random weights, for a GPU. Images are 64x64 (tiny) or 512x512 (full) and go through each scorer's own
preprocessing; video rewards get 8-frame clips and report videos/s. Two numbers per reward: inference
(``no_grad``) and forward + backward to the pixels (what reward-gradient training pays), when differentiable.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rewards.py
    .venv/bin/python benchmarks/bench_rewards.py --size full --device cuda --dtype bf16

Prints a table and writes JSON (default ``benchmarks/results/rewards-SIZE-DEVICE.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_PROMPTS = ["a red circle", "a blue square on the left", "a green triangle on the top", "a yellow circle"]
VIDEO_PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, iters: int) -> float:
    fn()  # warm-up (lazy init, caches, cudnn autotune)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_one(name: str, size: str, device: str, dtype: str, batch: int, iters: int) -> dict:
    import torch

    from reward_models import build_random_reward

    start = time.perf_counter()
    reward = build_random_reward(name, size, device=device, dtype=None if dtype == "fp32" else dtype)
    build_s = time.perf_counter() - start
    reward.batch_size = batch
    side = 64 if size == "tiny" else 512
    gen = torch.Generator().manual_seed(0)
    video = "image" not in reward.spec.modalities
    shape = (batch, 8, 3, side // 2, side // 2) if video else (batch, 3, side, side)
    media = torch.rand(*shape, generator=gen).to(device)
    pool = VIDEO_PROMPTS if video else IMAGE_PROMPTS
    prompts = [pool[i % len(pool)] for i in range(batch)]

    def infer():
        with torch.no_grad():
            reward(media, prompts)

    result = {"unit": "videos" if video else "images", "build_s": round(build_s, 3)}
    result["per_s"] = round(batch / _time(infer, device, iters), 2)
    if reward.spec.differentiable:

        def grad():
            m = media.detach().requires_grad_(True)
            reward(m, prompts).scores.sum().backward()

        result["grad_per_s"] = round(batch / _time(grad, device, iters), 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=8, help="media per call")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per reward (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 avoids OpenMP stalls on tiny ops)")
    parser.add_argument("--rewards", default=None, help="comma-separated names (default: every registered reward)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from reward_models import list_rewards

    torch.set_num_threads(args.threads)
    import open_clip  # noqa: F401  (imported once up front, so build times exclude library imports)
    import transformers  # noqa: F401

    names = args.rewards.split(",") if args.rewards else list_rewards()
    results = {}
    print(f"{'reward':22s} {'build s':>8s} {'no-grad /s':>12s} {'grad /s':>10s}  unit")
    for name in names:
        r = bench_one(name, args.size, args.device, args.dtype, args.batch, args.iters)
        results[name] = r
        grad = f"{r['grad_per_s']:10.1f}" if "grad_per_s" in r else f"{'-':>10s}"
        print(f"{name:22s} {r['build_s']:8.2f} {r['per_s']:12.1f} {grad}  {r['unit']}")
    report = {
        "size": args.size,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": args.dtype,
        "batch": args.batch,
        "iters": args.iters,
        "threads": args.threads,
        "torch": torch.__version__,
        "media": "images 64x64, videos 8x32x32" if args.size == "tiny" else "images 512x512, videos 8x256x256",
        "results": results,
    }
    device_tag = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"rewards-{args.size}-{device_tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
