"""Where a saturation gain comes from: object area, the object's own colour, or the background.

The mean HSV saturation of an image is ``area * s_object + (1 - area) * s_background`` with ``area`` the share of
foreground pixels (the oracle's foreground mask). This samples the base and each LoRA on the same captions and seeds
and prints the three parts, so a "style" gain can be told from bigger objects.

    python examples/shapes_world/saturation_parts.py assets/toyworld/toy-sd OUT/mapo/final OUT/dpo/final [--n 128]
"""

from __future__ import annotations

import argparse

import torch

from visalign.evaluation import read_prompts, sample_all
from visalign.metrics import saturation_map
from visalign.models import load_model
from visalign.toyworld.oracle import foreground, to_hwc_float


def parts(images: torch.Tensor) -> dict[str, float]:
    sat = saturation_map(images)
    mask = torch.from_numpy(foreground(to_hwc_float(images)))
    area = mask.float().mean()
    return {
        "saturation": float(sat.mean()),
        "area": float(area),
        "s_object": float(sat[mask].mean()),
        "s_background": float(sat[~mask].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("loras", nargs="*")
    ap.add_argument("--prompts", default="assets/toyworld/prompts/held_in.txt")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=100000)
    args = ap.parse_args()
    prompts = read_prompts(args.prompts)
    texts = [prompts[i % len(prompts)] for i in range(args.n)]
    seeds = [args.seed + i for i in range(args.n)]
    model = load_model(args.model)
    for i, path in enumerate(args.loras):
        model.load_lora(path, adapter_name=f"v{i}")
    print(f"{'variant':24s} {'saturation':>10s} {'area':>7s} {'s_object':>9s} {'s_background':>12s}")
    for name, adapter in [("base", None), *((p, f"v{i}") for i, p in enumerate(args.loras))]:
        model.set_adapters(adapter)
        row = parts(sample_all(model, texts, seeds, steps=20, guidance=3.0, batch_size=32, progress=False))
        print(f"{name[-24:]:24s} {row['saturation']:10.4f} {row['area']:7.4f} {row['s_object']:9.4f} "
              f"{row['s_background']:12.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
