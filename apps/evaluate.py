"""``visalign evaluate``: the base model against its adapters on the same prompts and seeds.

Reports reward scores, shapes-world oracle figures, win rates against the base, drift (saturation, brightness,
colour entropy), diversity within and across prompts, a pixel-space FD to the base and, with ``--reference DIR``,
to reference data (e.g. the renders of the shapes world); saves ``report.json`` and a side-by-side ``grid.png``.

``--experts MANIFEST`` adds timestep-segment experts switched per step as the variant ``experts``;
``--experts_alone`` adds one variant per expert active in its own interval only (``experts[NAME]``);
``--skip_stride K`` adds ``experts-skipK`` and ``base-skipK`` (early steps thinned, see ``visalign generate``).
``--guide SPEC ...`` adds ``nrg``: the base with reward guidance at inference (Flow-NRG, :mod:`visalign.guidance`).
Every variant reports its function evaluations per sample (``nfe``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from visalign.config import field, save_config
from visalign.errors import ConfigError


@dataclass
class EvaluateConfig:
    model: str = field(help="base pipeline: hub id or local folder")
    prompts: str = field(help="prompt text or file (.txt / .jsonl)")
    out: str = field(help="output folder for report.json and grid.png")
    lora: list[str] = field([], help="LoRA folders to compare with the base (repeat the flag or space-separate)")
    experts: str | None = field(None, help="timestep-segment experts.json (or folder): variant 'experts'")
    guide: list[str] = field([], help="reward guidance (Flow-NRG): variant 'nrg' steered by these rewards")
    guide_weight: list[float] = field([1.0], help="weight of each --guide reward (one for all, or one per reward)")
    guide_end: float = field(1.0, help="guide the first fraction of the steps only (1: every step)")
    experts_alone: bool = field(False, help="with --experts: also each expert alone in its interval")
    skip_stride: int = field(1, help="with --experts: also variants that keep every K-th step above --skip_above")
    skip_above: float | None = field(None, help="timestep where skipping starts (default: top of the lowest interval)")
    reward: str | None = field(None, help="reward spec, e.g. 'clip(model=assets/toyworld/toy-clip)'")
    reference: str | None = field(
        None, help="folder of reference images or videos (e.g. assets/toyworld/reference/images): fd_to_reference"
    )
    oracle: bool = field(False, help="add shapes-world oracle figures (shapes-world captions only)")
    n: int = field(64, help="samples per variant (prompts are cycled)")
    seed: int = field(0, help="sample i uses seed + i, the same for every variant")
    steps: int | None = field(None, help="sampling steps (default: the model's toyworld.json, else the family's)")
    guidance: float | None = field(None, help="guidance scale (default: the model's toyworld.json, else the family's)")
    height: int | None = field(None, help="height in pixels")
    width: int | None = field(None, help="width in pixels")
    num_frames: int | None = field(None, help="frames per video")
    batch_size: int = field(16, help="samples per forward batch")
    device: str = field("auto", help="cpu, cuda or auto")
    dtype: str = field("fp32", help="fp32, fp16 or bf16")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if not self.reward and not self.oracle and not self.lora and not self.experts and not self.guide:
            raise ConfigError("nothing to measure: pass --reward SPEC, --oracle, --lora, --experts or --guide")
        if self.guide and self.experts:
            raise ConfigError("pass --guide or --experts, not both")
        if self.skip_stride < 1:
            raise ConfigError(f"skip_stride must be >= 1, got {self.skip_stride}")
        if (self.experts_alone or self.skip_stride > 1 or self.skip_above is not None) and not self.experts:
            raise ConfigError("--experts_alone, --skip_stride and --skip_above need --experts")


def lora_names(paths: list[str]) -> list[str]:
    """Row names of the LoRAs: the shortest path tails that tell them apart (``run_a/final``, ``run_b/final``)."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names) and "base" not in names:
            return names
    return [f"{name}-{i}" for i, name in enumerate(names)]  # the same folder twice


def run(cfg: EvaluateConfig) -> dict:
    import torch

    from apps.generate import resolve_device
    from visalign.evaluation import evaluate_variants, format_table, read_prompts
    from visalign.models import load_model
    from visalign.models.lora import lora_file

    prompts = read_prompts(cfg.prompts)
    texts = [prompts[i % len(prompts)] for i in range(cfg.n)]
    for path in cfg.lora:
        lora_file(path)  # a clear error before the model loads
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype)
    variants: dict[str, str | None] = {"base": None}
    for i, (path, name) in enumerate(zip(cfg.lora, lora_names(cfg.lora))):
        model.load_lora(path, adapter_name=f"variant{i}")
        variants[name] = f"variant{i}"
    if cfg.experts:
        model, expert_variants = experts_view(model, cfg)
        variants.update(expert_variants)
    if cfg.guide:
        from apps.generate import guidance_rewards
        from visalign.guidance import GuidedView

        model = GuidedView(model, guidance_rewards(cfg.guide, cfg.guide_weight, device), end=cfg.guide_end)
        variants["nrg"] = "nrg"
    scorers = {}
    if cfg.reward:
        from reward_models import build_reward

        reward = build_reward(cfg.reward, device=device)

        def score(media, prompts):
            with torch.no_grad():
                return torch.cat(
                    [
                        reward(media[i : i + cfg.batch_size].to(device), prompts[i : i + cfg.batch_size]).scores.cpu()
                        for i in range(0, len(media), cfg.batch_size)
                    ]
                )

        scorers[cfg.reward] = score
    reference = read_reference(cfg.reference, model.is_video) if cfg.reference else None
    save_config(cfg, cfg.out)
    report = evaluate_variants(
        model,
        variants,
        texts,
        [cfg.seed + i for i in range(cfg.n)],
        cfg.out,
        scorers=scorers,
        oracle=cfg.oracle,
        steps=cfg.steps,
        guidance=cfg.guidance,
        height=cfg.height,
        width=cfg.width,
        num_frames=cfg.num_frames,
        batch_size=cfg.batch_size,
        reference=reference,
    )
    if cfg.experts:  # function evaluations per sample of each variant, as it sampled
        from visalign.experts import function_evaluations

        for name, adapter in variants.items():
            steps = model.steps_taken.get(adapter, cfg.steps or model.default_steps)
            report["variants"][name]["nfe"] = float(function_evaluations(steps, model, cfg.guidance))
        tmp = Path(cfg.out) / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, Path(cfg.out) / "report.json")
    keys = [
        k
        for k in (
            "oracle/held_in/strict_acc",
            "oracle/held_out/strict_acc",
            "oracle/all/object_rate",
            "oracle/all/color_acc",
            "oracle/all/position_acc",
            "oracle/circle/strict_acc",
            "oracle/square/strict_acc",
            "oracle/triangle/strict_acc",
            f"reward/{cfg.reward}",
            f"win_rate/{cfg.reward}",
            "win_rate/oracle_strict",
            "saturation",
            "diversity",
            "nfe",
        )
        if any(k in row for row in report["variants"].values())
    ]
    print(format_table(report, keys))
    print(f"report: {Path(cfg.out) / 'report.json'}  grid: {Path(cfg.out) / 'grid.png'}")
    return report


def read_reference(folder: str, video: bool):
    """Every image (or video) of ``folder``, in name order, as one tensor (they must share a size)."""
    import torch

    from apps.score import IMAGE_SUFFIXES, VIDEO_SUFFIXES, list_media, read_media

    media = [read_media(f, video) for f in list_media(folder, VIDEO_SUFFIXES if video else IMAGE_SUFFIXES)]
    shapes = {tuple(m.shape) for m in media}
    if len(shapes) > 1:
        raise ConfigError(f"reference media in {folder} differ in size ({sorted(shapes)[:3]}); use one size")
    return torch.stack(media)


def experts_view(model, cfg: EvaluateConfig):
    """Load the experts and wrap ``model`` in an :class:`~visalign.experts.ExpertsView` with one plan per variant."""
    from visalign.experts import ExpertsView, SwitchPlan, load_experts

    manifest = load_experts(model, cfg.experts)
    plans = {"experts": SwitchPlan()}
    if cfg.experts_alone:
        plans.update({f"experts[{name}]": SwitchPlan(enabled=frozenset([name])) for name in manifest.names})
    if cfg.skip_stride > 1:
        skip = {"stride": cfg.skip_stride, "skip_above": cfg.skip_above}
        plans[f"experts-skip{cfg.skip_stride}"] = SwitchPlan(**skip)
        plans[f"base-skip{cfg.skip_stride}"] = SwitchPlan(enabled=frozenset(), **skip)
    view = ExpertsView(model, manifest, plans)
    return view, {name: name for name in plans}


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    run(parse_config(EvaluateConfig, argv, prog="visalign evaluate", description=__doc__.splitlines()[0]))
