"""GRPO rollout throughput and update time: full SDE (Flow-GRPO) against an SDE window (MixGRPO / Flow-GRPO-Fast),
and both against the loop of Flow-GRPO's own training script (``flow_grpo reference``, benchmarks/grpo_reference.py).

Both modes sample the same number of steps (rollout cost is the same); the window trains ``--window`` steps per
sample instead of all but the last, which is where its time goes. Per mode: rollout samples/s, the update time of
one rollout (all its micro-batches: forward, reference forward for the KL, backward, optimizer steps), and the
time per optimizer step, on an SD3-architecture pipeline with random weights (text embeddings are cached per
prompt, so the text encoders are kept small; the transformer and VAE have the chosen preset's sizes).

    python benchmarks/bench_grpo.py                                    # small SD3, 64 px, CPU
    python benchmarks/bench_grpo.py --preset sd3 --resolution 512 --device cuda --dtype bfloat16   # SD3-Medium size

Video presets (rollout videos/s; Flow-SDE on Wan, DDIM-eta on CogVideoX): ``wan-1.3b``, ``cogvideox-2b`` and their
CPU-sized graphs ``wan-small``, ``cogvideox-small`` (benchmarks/video_pipelines.py), with ``--num_frames``.

Prints a table and writes JSON (``--out``, default benchmarks/results/bench_grpo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dpo import LEVERS  # noqa: E402
from benchmarks.video_pipelines import VIDEO_PRESETS, build_video_pipeline  # noqa: E402
from reward_models.base import Reward, RewardSpec  # noqa: E402
from trainers.grpo import GRPO, GRPOConfig  # noqa: E402
from visalign.flops import denoiser_forward_flops, grpo_rollout_flops, mfu, peak_tflops  # noqa: E402
from visalign.metrics import brightness  # noqa: E402

PRESETS = {
    # transformer: layers, heads, head dim, joint attention dim, caption projection, pooled dim, sample size
    "small": dict(layers=4, heads=4, head_dim=32, joint=128, caption=128, pooled=64, sample=32, pos=64,
                  clip=(32, 32), vae=(32, 64, 64, 64), vae_layers=1),
    "sd3": dict(layers=24, heads=24, head_dim=64, joint=4096, caption=1536, pooled=2048, sample=128, pos=192,
                clip=(768, 1280), vae=(128, 256, 512, 512), vae_layers=2),  # SD3-Medium
}  # fmt: skip


class Brightness(Reward):
    """A free reward, so the timings are the diffusion model's."""

    def __init__(self):
        super().__init__(
            RewardSpec("brightness", modalities=("image", "video"), needs_prompt=False, differentiable=False)
        )

    def score_batch(self, media, prompts):
        return brightness(media)


def build_pipeline(preset: str, seed: int = 0):
    """A random-weight SD3 pipeline (no T5: zeros in its place, as the pipeline does without it)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from visalign.offline_tokenizers import clip_tokenizer

    p = PRESETS[preset]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=p["sample"], patch_size=2, in_channels=16, out_channels=16, num_layers=p["layers"],
        attention_head_dim=p["head_dim"], num_attention_heads=p["heads"], joint_attention_dim=p["joint"],
        caption_projection_dim=p["caption"], pooled_projection_dim=p["pooled"], pos_embed_max_size=p["pos"],
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=p["vae"],
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=p["vae_layers"], norm_num_groups=32, shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    tokenizer_2 = clip_tokenizer(pad_token="!")

    def clip(width: int, pad: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=max(1, width // 64), projection_dim=width, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=pad,
        ))  # fmt: skip

    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(p["clip"][0], 49407), tokenizer=clip_tokenizer(),
        text_encoder_2=clip(p["clip"][1], tokenizer_2.pad_token_id), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_reference(args) -> tuple[int, int, list[float], list[float]]:
    """Flow-GRPO's own loop (benchmarks/grpo_reference.py) on the same pipeline, LoRA and sizes: forward FLOPs,
    trained steps per sample, and the rollout and update seconds of each timed rollout."""
    from benchmarks import grpo_reference as ref
    from visalign.models import FAMILIES

    if args.preset in VIDEO_PRESETS:
        raise SystemExit("the flow_grpo reference mode is written for SD3 (its train_sd3.py); drop it for video")
    with torch.device(args.device):
        pipe = build_pipeline(args.preset)
    model = FAMILIES["sd3"](pipe, device=args.device, dtype=getattr(torch, args.dtype))
    forward = denoiser_forward_flops(model, args.resolution, None)
    params = model.add_lora(rank=args.rank, alpha=float(args.rank))
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    prompts = [f"a photo of object {i}" for i in range(args.prompts) for _ in range(args.group)]
    generator = torch.Generator(device=args.device).manual_seed(0)
    rollouts, updates = [], []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for r in range(args.warmup + args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        ro = ref.rollout(pipe, prompts, steps=args.steps, guidance=4.5, resolution=args.resolution, noise_level=0.7,
                         generator=generator)  # fmt: skip
        rewards = brightness(ro["pixels"]).float().cpu()
        sync(args.device)
        t1 = time.perf_counter()
        ref.update(model, optimizer, ro, rewards, group=args.group, guidance=4.5, noise_level=0.7,
                   beta_kl=args.beta_kl, clip_range=1e-4, train_batch=args.train_batch)  # fmt: skip
        sync(args.device)
        if r >= args.warmup:
            rollouts.append(t1 - t0)
            updates.append(time.perf_counter() - t1)
    return forward, args.steps - 1, rollouts, updates


def run_mode(mode: str, lever: str, args, prompt_file: str, out_dir: str) -> dict:
    from visalign.models import FAMILIES

    if mode == "flow_grpo reference":
        forward, trained, rollouts, updates = run_reference(args)
        result = timings(mode, lever, args, forward, trained, rollouts, updates, cfg_on=True, updates_per_rollout=1)
        if args.device.startswith("cuda"):
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result
    video = args.preset in VIDEO_PRESETS
    with torch.device(args.device):  # initialise on the GPU when there is one
        pipe = build_video_pipeline(args.preset) if video else build_pipeline(args.preset)
    family = args.preset.split("-")[0] if video else "sd3"
    model = FAMILIES[family](pipe, device=args.device, dtype=getattr(torch, args.dtype))
    model.source = f"random {args.preset}"
    forward = denoiser_forward_flops(model, args.resolution, args.num_frames if video else None)  # eager, no LoRA
    selection = {"full SDE": {}, "SDE window": {"timestep_selection": "window", "sde_window": args.window}}[mode]
    cfg = GRPOConfig(
        model=model.source, reward="brightness", prompts=prompt_file, output_dir=out_dir, batch_size=args.prompts,
        group_size=args.group, steps=args.steps, guidance=4.5, resolution=args.resolution, lora_rank=args.rank,
        lora_alpha=float(args.rank), beta_kl=args.beta_kl, train_batch_size=args.train_batch, report_to="none",
        progress=False, device=args.device, max_steps=1, num_frames=args.num_frames if video else None,
        gradient_checkpointing=args.gradient_checkpointing, **selection, **LEVERS[lever],
    )  # fmt: skip
    task = GRPO(cfg, model=model, reward=Brightness().to(args.device))
    opt = torch.optim.AdamW(task.params, lr=1e-5, fused=cfg.fused_adam or None)  # as the loop builds it
    gas = cfg.gradient_accumulation_steps
    rollouts, updates, steps = [], [], 0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for r in range(args.warmup + args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        task.rollout(list(range(args.prompts)))
        sync(args.device)
        t1 = time.perf_counter()
        n = 0
        while task.queue:
            loss, _ = task.loss(None)
            (loss / gas).backward()
            n += 1
            if n % gas == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += r >= args.warmup
        sync(args.device)
        if r >= args.warmup:
            rollouts.append(t1 - t0)
            updates.append(time.perf_counter() - t1)
    result = timings(mode, lever, args, forward, cfg.trained_steps, rollouts, updates,
                     cfg_on=model.uses_cfg(cfg.guidance), updates_per_rollout=cfg.updates_per_rollout)  # fmt: skip
    if args.device.startswith("cuda"):
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def timings(mode, lever, args, forward, trained, rollouts, updates, *, cfg_on, updates_per_rollout) -> dict:
    """The figures of one mode from its timed rollouts (medians) and the FLOPs of its shapes."""
    samples = args.prompts * args.group
    rollout_s, update_s = sorted(rollouts)[len(rollouts) // 2], sorted(updates)[len(updates) // 2]
    flops = grpo_rollout_flops(forward, samples, args.steps, trained, cfg=cfg_on, kl=args.beta_kl > 0)
    result = {
        "mode": mode,
        "lever": lever,
        "forward_flops_per_sample": forward,
        "rollout_flops": flops["total"],
        "trained_steps_per_sample": trained,
        "rollout_samples_per_s": samples / rollout_s,
        "rollout_s": rollout_s,
        "update_s_per_rollout": update_s,
        "update_s_per_optimizer_step": update_s / updates_per_rollout,
        "total_s_per_rollout": rollout_s + update_s,
        "samples_per_s": samples / (rollout_s + update_s),
        "tflops_per_s": flops["total"] / (rollout_s + update_s) / 1e12,
        "mfu": mfu(flops["total"], rollout_s + update_s, args.peak),
        "rollout_mfu": mfu(flops["rollout"], rollout_s, args.peak),
        "update_mfu": mfu(flops["update"], update_s, args.peak),
    }
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS) + list(VIDEO_PRESETS))
    p.add_argument("--num_frames", type=int, default=9, help="frames per video (video presets)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--prompts", type=int, default=2, help="prompts per rollout")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (Flow-GRPO: 10)")
    p.add_argument("--window", type=int, default=2, help="SDE window size")
    p.add_argument("--train_batch", type=int, default=0, help="samples per training micro-batch (0: all)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--beta_kl", type=float, default=0.04)
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    modes = "full SDE,SDE window,flow_grpo reference"
    p.add_argument("--modes", default=modes, help=f"comma-separated: {modes} (flow_grpo's train_sd3.py loop)")
    p.add_argument("--levers", default="base", help=f"comma-separated, each run alone: {', '.join(LEVERS)}")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: the GPU's table)")
    p.add_argument("--out", default="benchmarks/results/bench_grpo.json")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    args.peak = args.peak_tflops or (peak_tflops(device, args.dtype) if cuda else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(f"a photo of object {i}" for i in range(args.prompts)) + "\n")
        levers = args.levers.split(",")
        for lever in levers:
            for mode in args.modes.split(","):
                if mode == "flow_grpo reference" and lever != levers[0]:
                    continue  # the reference loop has no levers: one row
                out_dir = str(Path(tmp) / f"{mode}-{lever}".replace(" ", "-"))
                result = run_mode(mode, lever, args, str(prompt_file), out_dir)
                rows.append(result)
                peak = f"  peak {result['peak_gib']:.1f} GiB" if "peak_gib" in result else ""
                util = f"  MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""
                print(f"{mode:10s} {lever:13s} trains {result['trained_steps_per_sample']} steps/sample  rollout "
                      f"{result['rollout_samples_per_s']:7.2f} samples/s  update "
                      f"{result['update_s_per_rollout']:7.2f} s"
                      f" per rollout ({result['update_s_per_optimizer_step']:.2f} s/step)  total "
                      f"{result['total_s_per_rollout']:7.2f} s ({result['samples_per_s']:.2f} samples/s, "
                      f"{result['tflops_per_s']:.3f} TFLOP/s{util}){peak}", flush=True)  # fmt: skip
                report = {**{k: v for k, v in vars(args).items() if k != "out"}, "device": device, "results": rows}
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every row: a time box keeps the rest
                Path(args.out).write_text(json.dumps(report, indent=2))
    by_mode = {r["mode"]: r for r in rows if r["lever"] == rows[0]["lever"]}
    if "SDE window" in by_mode and "full SDE" in by_mode:
        saving = 1 - by_mode["SDE window"]["total_s_per_rollout"] / by_mode["full SDE"]["total_s_per_rollout"]
        print(f"SDE window: {saving:.0%} less time per rollout (rollout + update)")
        report["window_time_saving"] = saving
    reference = next((r for r in rows if r["mode"] == "flow_grpo reference"), None)
    if reference is not None:  # every visalign row against flow_grpo's loop: rollout + update samples/s
        report["speedup_over_flow_grpo"] = {
            f"{r['mode']} / {r['lever']}": r["samples_per_s"] / reference["samples_per_s"]
            for r in rows if r["mode"] != "flow_grpo reference"
        }  # fmt: skip
        for name, x in report["speedup_over_flow_grpo"].items():
            print(f"{name}: {x:.2f}x the flow_grpo reference step's samples/s")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
