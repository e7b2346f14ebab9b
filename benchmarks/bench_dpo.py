"""Diffusion-DPO and MaPO step time and peak memory: visalign's way against the naive way, side by side.

visalign: pairs encoded once (cached VAE latents and text conditioning); the DPO reference is the same network
with the LoRA disabled. Naive (what the research scripts do): images and prompts re-encoded through the VAE and
text encoders every step, and a separate frozen copy of the denoiser as the reference.

    python benchmarks/bench_dpo.py                       # SD1.5-architecture UNet, random weights, CPU
    python benchmarks/bench_dpo.py --preset sdxl --resolution 1024 --batch 1 --device cuda --dtype bf16  # a GPU

Presets: ``small`` (CPU-sized), ``sd15`` (SD1.5's UNet, VAE and CLIP-L sizes), ``sdxl`` (SDXL-base's UNet, VAE,
CLIP-L and OpenCLIP-bigG sizes; 2.6B-parameter UNet) and ``sdxl-small`` (the SDXL graph at small widths, to
check the preset on a CPU). Video presets (pairs of random videos, ``--num_frames``): ``wan-1.3b``, ``cogvideox-2b``
and their CPU-sized graphs ``wan-small``, ``cogvideox-small`` (see benchmarks/video_pipelines.py).

    python benchmarks/bench_dpo.py --preset wan-1.3b --resolution 480 --num_frames 17 --batch 1 --device cuda \
        --dtype bf16 --gradient_checkpointing

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

from benchmarks.video_pipelines import VIDEO_PRESETS, build_video_pipeline  # noqa: E402
from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig  # noqa: E402
from trainers.mapo import MaPO, MaPOConfig  # noqa: E402
from visalign.attention import SDPA_BACKENDS  # noqa: E402
from visalign.data import PreferenceWriter  # noqa: E402
from visalign.flops import denoiser_forward_flops, mfu, peak_tflops, preference_step_flops  # noqa: E402
from visalign.media import save_image  # noqa: E402


def _clip(hidden: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(channels, layers: int, scaling: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=layers,
        norm_num_groups=32,
        scaling_factor=scaling,
    )


def build_sdxl(full: bool):
    """SDXL-base's architecture (or its graph at small widths): text_time conditioning, two text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from visalign.offline_tokenizers import clip_tokenizer

    ch, heads, depth, text = ((320, 640, 1280), (5, 10, 20), (1, 2, 10), (768, 1280)) if full else (
        (32, 64, 128), (2, 2, 4), (1, 1, 2), (64, 64))  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=ch,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=heads,
        transformer_layers_per_block=depth,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + text[1],
        cross_attention_dim=sum(text),
        norm_num_groups=32,
        sample_size=128,
    )
    vae = _vae((128, 256, 512, 512) if full else (32, 64, 64, 64), 2 if full else 1, scaling=0.13025)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_clip(text[0], 12 if full else 2),
        text_encoder_2=_clip(text[1], 32 if full else 2, projection=text[1]),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        force_zeros_for_empty_prompt=True,
    )


def build_pipeline(preset: str, seed: int = 0):
    """A random-weight pipeline of a real architecture (see the module docstring for the presets)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from visalign.offline_tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    if preset in VIDEO_PRESETS:
        return build_video_pipeline(preset, seed)
    if preset in ("sdxl", "sdxl-small"):
        return build_sdxl(full=preset == "sdxl")
    if preset == "small":
        ch, text, layers = (32, 64, 128), 64, 2
    elif preset == "sd15":
        ch, text, layers = (320, 640, 1280, 1280), 768, 12
    else:
        raise SystemExit(f"unknown preset {preset!r} (small, sd15, sdxl, sdxl-small, {', '.join(VIDEO_PRESETS)})")
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
    vae = _vae((128, 256, 512, 512) if preset == "sd15" else (32, 64, 64, 64), 2 if preset == "sd15" else 1)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip(text, layers),
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
            "index": torch.tensor([r["index"] for r in rows]),
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


# each lever alone, on top of the defaults (--lever NAME,...): the options of the trainers' configs
LEVERS = {
    "base": {},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "fused_adam": {"fused_adam": True},
    **{name: {"attention": name} for name in SDPA_BACKENDS},
}


def write_pairs(directory: Path, args) -> None:
    """``max(--batches)`` random pairs; videos as folders of PNG frames (no video codec needed)."""
    g = torch.Generator().manual_seed(0)
    shape = (3, args.resolution, args.resolution)
    if not args.num_frames:
        writer = PreferenceWriter(directory)
        for i in range(max(args.batches)):
            writer.append(f"a photo of object {i}", torch.rand(shape, generator=g), torch.rand(shape, generator=g))
        return
    rows = []
    for i in range(max(args.batches)):
        row = {"prompt": f"a video of object {i}", "label": 1.0}
        for side in ("chosen", "rejected"):
            folder = directory / "media" / f"{i}-{side}"
            for f in range(args.num_frames):
                save_image(torch.rand(shape, generator=g), folder / f"{f:03d}.png")
            row[side] = str(folder.relative_to(directory))
        rows.append(row)
    (directory / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_one(method: str, model_dir, data_dir, args) -> dict:
    """One method in this (fresh) process: peak memory covers building the task (reference copy, cache) too."""
    task_cls, cfg_cls, loss = METHODS[method]
    cfg = cfg_cls(
        model=str(model_dir),
        data=str(data_dir),
        output_dir=str(Path(args.tmp) / "run"),
        batch_size=args.batch,
        resolution=args.resolution,
        num_frames=args.num_frames,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.rank,
        report_to="none",
        progress=False,
        device=args.device,
        dtype=args.dtype,
        cache_dir=str(Path(args.tmp) / "cache" / f"{method}-{args.batch}-{args.lever}"),
        **({"loss": loss} if cfg_cls is DiffusionDPOConfig else {}),
        **LEVERS[args.lever],
    )
    times = []
    with PeakMemory(args.device) as mem:
        task = task_cls(cfg)
        opt = torch.optim.AdamW(task.trainable_parameters(), lr=1e-5, fused=cfg.fused_adam or None)  # as the loop
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


def forward_flops(model_dir, args) -> int:
    """``F``: the denoiser forward of one sample at the benchmarked shape (counted once, eagerly)."""
    from visalign.models import load_model

    model = load_model(model_dir, device=args.device, dtype=args.dtype)
    flops = denoiser_forward_flops(model, args.resolution, args.num_frames)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return flops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="architecture of the random-weight pipeline (see above)")
    p.add_argument("--model", default=None, help="use this pipeline folder instead of a random one")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num_frames", type=int, default=None, help="frames per video (video presets)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--batches", default=None, help="a sweep of pairs per step, e.g. 1,2,4 (default: --batch)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--levers", default="base", help=f"comma-separated, each run alone: {', '.join(LEVERS)}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", help="weights of the frozen base: fp32, fp16 or bf16 (LoRA is fp32)")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: the GPU's table)")
    p.add_argument("--out", default="benchmarks/results/bench_dpo.json")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument("--_model", help=argparse.SUPPRESS)
    p.add_argument("--_tmp", help=argparse.SUPPRESS)
    p.add_argument("--lever", default="base", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    methods, levers = args.methods.split(","), args.levers.split(",")
    for name, known in [(m, METHODS) for m in methods] + [(lv, LEVERS) for lv in levers]:
        if name not in known:
            sys.exit(f"unknown {name!r}; choose from {', '.join(known)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args._one:
        args.tmp = args._tmp
        print(json.dumps(run_one(args._one, args._model, Path(args._tmp) / "pairs", args)))
        return
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    peak = args.peak_tflops or (peak_tflops(device, args.dtype) if cuda else None)
    report = {
        "preset": args.preset if not args.model else args.model,
        "resolution": args.resolution,
        "num_frames": args.num_frames,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.rank,
        "dtype": args.dtype,
        "device": device,
        "peak_tflops": peak,
        "flops_method": "denoiser only, FlopCounterMode; step = 2 samples/pair x (forward + 2x backward) "
        "+ reference forward (DPO); see visalign/flops.py",
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        model_dir = Path(args.model) if args.model else Path(tmp) / "pipe"
        if not args.model:
            with torch.device(args.device):  # initialise on the GPU when there is one: seconds, not minutes
                pipe = build_pipeline(args.preset)
            if args.dtype != "fp32":  # halves what is written and read again by each method's process
                pipe.to(dtype=torch.float16 if args.dtype == "fp16" else torch.bfloat16)
            pipe.save_pretrained(model_dir)
            del pipe
        forward = forward_flops(model_dir, args)
        report["forward_flops_per_sample"] = forward
        print(
            f"denoiser forward: {forward / 1e9:.2f} GFLOP per sample; peak {peak or '(unknown)'} TFLOP/s", flush=True
        )
        write_pairs(Path(tmp) / "pairs", args)
        for batch, lever, method in [(b, lv, m) for b in args.batches for lv in levers for m in methods]:
            # each in a fresh process, so one run's memory does not count for the next
            cmd = [
                sys.executable,
                __file__,
                "--_one",
                method,
                "--_model",
                str(model_dir),
                "--_tmp",
                tmp,
                f"--batch={batch}",
                f"--lever={lever}",
                *[f"--{k}={getattr(args, k)}" for k in ("resolution", "rank", "steps", "warmup", "device", "dtype")],
                *([f"--num_frames={args.num_frames}"] if args.num_frames else []),
                *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{method} batch {batch} {lever} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            flops = preference_step_flops(forward, batch, reference=METHODS[method][2] != "mapo")
            util = mfu(flops, result["step_s_median"], peak)
            row = {"method": method, "batch_pairs": batch, "lever": lever, **result, "step_flops": flops,
                   "tflops_per_s": flops / result["step_s_median"] / 1e12, "mfu": util}  # fmt: skip
            report["results"].append(row)
            print(
                f"{method:14s} batch {batch:2d} {lever:14s} step {result['step_s_median'] * 1000:8.1f} ms "
                f"{result['pairs_per_s']:7.2f} pairs/s  {row['tflops_per_s']:8.3f} TFLOP/s"
                + (f"  MFU {util:6.1%}" if util is not None else "")
                + f"  peak +{result['peak_mib']:8.1f} MiB",
                flush=True,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every row: a time box keeps the rest
            Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
