"""``visalign evaluate``: the base model against its adapters on the same prompts and seeds.

Reports reward scores, shapes-world oracle figures, win rates against the base, drift (saturation, brightness,
colour entropy), diversity and a pixel-space FD to the base; saves ``report.json`` and a side-by-side ``grid.png``.
"""

from __future__ import annotations

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
    reward: str | None = field(None, help="reward spec, e.g. 'clip(model=assets/toyworld/toy-clip)'")
    oracle: bool = field(False, help="add shapes-world oracle figures (shapes-world captions only)")
    n: int = field(64, help="samples per variant (prompts are cycled)")
    seed: int = field(0, help="sample i uses seed + i, the same for every variant")
    steps: int | None = field(None, help="sampling steps (default: the family's)")
    guidance: float | None = field(None, help="guidance scale (default: the family's)")
    height: int | None = field(None, help="height in pixels")
    width: int | None = field(None, help="width in pixels")
    num_frames: int | None = field(None, help="frames per video")
    batch_size: int = field(16, help="samples per forward batch")
    device: str = field("auto", help="cpu, cuda or auto")
    dtype: str = field("fp32", help="fp32, fp16 or bf16")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if not self.reward and not self.oracle and not self.lora:
            raise ConfigError("nothing to measure: pass --reward SPEC, --oracle, or --lora to compare")


def run(cfg: EvaluateConfig) -> dict:
    import torch

    from apps.generate import resolve_device
    from visalign.evaluation import evaluate_variants, format_table, read_prompts
    from visalign.models import load_model

    prompts = read_prompts(cfg.prompts)
    texts = [prompts[i % len(prompts)] for i in range(cfg.n)]
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype)
    variants: dict[str, str | None] = {"base": None}
    for i, path in enumerate(cfg.lora):
        name = Path(path).name if Path(path).name not in variants else f"{Path(path).name}-{i}"
        model.load_lora(path, adapter_name=f"variant{i}")
        variants[name] = f"variant{i}"
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
    )
    keys = [
        k
        for k in (
            "oracle/held_in/strict_acc",
            "oracle/held_out/strict_acc",
            "oracle/all/object_rate",
            f"reward/{cfg.reward}",
            f"win_rate/{cfg.reward}",
            "win_rate/oracle_strict",
            "saturation",
            "diversity",
        )
        if any(k in row for row in report["variants"].values())
    ]
    print(format_table(report, keys))
    print(f"report: {Path(cfg.out) / 'report.json'}  grid: {Path(cfg.out) / 'grid.png'}")
    return report


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    run(parse_config(EvaluateConfig, argv, prog="visalign evaluate", description=__doc__.splitlines()[0]))
