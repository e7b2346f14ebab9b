"""Diffusion-DPO and MaPO step time and peak memory: visalign's way against the naive way, side by side.

visalign: pairs encoded once (cached VAE latents and text conditioning); the DPO reference is the same network
with the LoRA disabled. Naive (what the research scripts do): images and prompts re-encoded through the VAE and
text encoders every step, and a separate frozen copy of the denoiser as the reference.

    python benchmarks/bench_dpo.py                       # SD1.5-architecture UNet, random weights, CPU
    python benchmarks/bench_dpo.py --preset sdxl --resolution 1024 --device cuda   # on a GPU

Prints a table and writes JSON (``--out``, default benchmarks/results/bench_dpo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig  # noqa: E402
from trainers.mapo import MaPO, MaPOConfig  # noqa: E402
from visalign.data import PreferenceWriter  # noqa: E402


def build_pipeline(preset: str, seed: int = 0):
    """A random-weight pipeline of a real architecture: ``sd15`` has SD1.5's UNet, VAE and CLIP-L sizes."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from visalign.offline_tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    if preset == "small":
        ch, text, layers = (32, 64, 128), 64, 2
    elif preset == "sd15":
        ch, text, layers = (320, 640, 1280, 1280), 768, 12
    else:
        raise SystemExit(f"unknown preset {preset!r} (small, sd15)")
    n = len(ch)
    unet = UNet2DConditionModel(
        block_out_channels=ch,
        layers_per_block=2 if preset == "sd15" else 1,
        cross_attention_dim=text,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae_ch = (128, 256, 512, 512) if preset == "sd15" else (32, 64, 64, 64)
    vae = AutoencoderKL(
        block_out_channels=vae_ch,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2 if preset == "sd15" else 1,
        norm_num_groups=32,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text,
            intermediate_size=text * 4,
            num_hidden_layers=layers,
            num_attention_heads=max(text // 64, 1),
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class Naive:
    """Mixin: re-encode raw pairs every step, and (for DPO) a separate frozen reference copy."""

    def __init__(self, config, model=None):
        super().__init__(config, model)
        if self.needs_reference:
            import copy

            self.model.set_reference(copy.deepcopy(self.model.denoiser))

    def train_dataset(self):
        return self.pairs

    def collate(self, rows):
        m = self.model
        with torch.no_grad():
            chosen = m.encode(torch.stack([r["chosen"] for r in rows]).to(m.device))
            rejected = m.encode(torch.stack([r["rejected"] for r in rows]).to(m.device))
            cond = m.encode_prompt([r["prompt"] for r in rows])
        return {
            "chosen": chosen,
            "rejected": rejected,
            "cond": cond,
            "label": torch.tensor([r["label"] for r in rows]),
        }


class NaiveDPO(Naive, DiffusionDPO):
    pass


class NaiveMaPO(Naive, MaPO):
    pass


class PeakMemory:
    """Peak process RSS (CPU, sampled every 5 ms) or peak CUDA allocation during a block."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.proc, self.base, self.peak, self.stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False

        def watch():
            while not self.stop:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


METHODS = {
    "dpo visalign": (DiffusionDPO, DiffusionDPOConfig, "sigmoid"),
    "dpo naive": (NaiveDPO, DiffusionDPOConfig, "sigmoid"),
    "mapo visalign": (MaPO, MaPOConfig, "mapo"),
    "mapo naive": (NaiveMaPO, MaPOConfig, "mapo"),
}


def run_one(method: str, model_dir, data_dir, args) -> dict:
    """One method in this (fresh) process: peak memory covers building the task (reference copy, cache) too."""
    task_cls, cfg_cls, loss = METHODS[method]
    cfg = cfg_cls(
        model=str(model_dir),
        data=str(data_dir),
        output_dir=str(Path(args.tmp) / "run"),
        batch_size=args.batch,
        resolution=args.resolution,
        lora_rank=args.rank,
        report_to="none",
        progress=False,
        device=args.device,
        cache_dir=str(Path(args.tmp) / "cache" / method),
        **({"loss": loss} if cfg_cls is DiffusionDPOConfig else {}),
    )
    times = []
    with PeakMemory(args.device) as mem:
        task = task_cls(cfg)
        opt = torch.optim.AdamW(task.trainable_parameters(), lr=1e-5)
        data = task.train_dataset()
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            batch = task.collate([data[i] for i in range(args.batch)])
            loss_value, _ = task.loss(batch)
            loss_value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"step_s_median": median, "pairs_per_s": args.batch / median, "peak_mib": (mem.peak - mem.base) / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="small | sd15 (architecture of the random-weight pipeline)")
    p.add_argument("--model", default=None, help="use this pipeline folder instead of a random one")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/bench_dpo.json")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument("--_model", help=argparse.SUPPRESS)
    p.add_argument("--_tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args._one:
        args.tmp = args._tmp
        print(json.dumps(run_one(args._one, args._model, Path(args._tmp) / "pairs", args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        model_dir = Path(args.model) if args.model else Path(tmp) / "pipe"
        if not args.model:
            build_pipeline(args.preset).save_pretrained(model_dir)
        writer = PreferenceWriter(Path(tmp) / "pairs")
        g = torch.Generator().manual_seed(0)
        for i in range(args.batch):
            writer.append(
                f"a photo of object {i}",
                torch.rand(3, args.resolution, args.resolution, generator=g),
                torch.rand(3, args.resolution, args.resolution, generator=g),
            )
        rows = []
        for method in METHODS:  # each in a fresh process, so one method's memory does not count for the next
            cmd = [
                sys.executable,
                __file__,
                "--_one",
                method,
                "--_model",
                str(model_dir),
                "--_tmp",
                tmp,
                *[
                    f"--{k}={v}"
                    for k, v in vars(args).items()
                    if k in ("resolution", "batch", "rank", "steps", "warmup", "device")
                ],
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            rows.append({"method": method, **result})
            print(
                f"{method:15s} step {result['step_s_median'] * 1000:8.1f} ms  {result['pairs_per_s']:7.2f} pairs/s"
                f"  peak +{result['peak_mib']:8.1f} MiB",
                flush=True,
            )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    report = {
        "preset": args.preset if not args.model else args.model,
        "resolution": args.resolution,
        "batch_pairs": args.batch,
        "lora_rank": args.rank,
        "device": device,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
