"""Timestep-segment experts in the shapes world: the two preference sets, and the results table.

``pairs`` samples the base model K times per held-in caption (seed ``seed + i`` for sample ``i``), judges every
sample with the oracle, and writes three preference datasets (the schema ``visalign train`` reads):

* ``layout/``: positioned captions; the winner has the right position and the loser not. Both hold exactly one
  object and agree on colour (and, where the group allows, on shape), so the pair teaches position only.
* ``fidelity/``: every caption; the winner has the right colour and the loser not (a wrong colour, or no single
  clean object to judge: the oracle's colour verdict); both agree on position (and, where possible, on shape),
  so the pair teaches colour fidelity, not layout.
* ``union/``: both sets together (the baseline: one LoRA trained by DPO on everything).

``table`` prints a ``visalign evaluate`` report as a Markdown table. The whole experiment
(docs/experiments/timestep_segment.md):

    python benchmarks/timestep_segment_toy.py pairs --model assets/toyworld/toy-sd --out outputs/tseg/data
    visalign train timestep-segment --model assets/toyworld/toy-sd ...   # layout on [600, 1000), fidelity [0, 600)
    visalign train diffusion-dpo --model assets/toyworld/toy-sd --data outputs/tseg/data/union ...
    visalign evaluate --model assets/toyworld/toy-sd --experts ... --experts_alone --skip_stride 4 --lora ...
    python benchmarks/timestep_segment_toy.py table outputs/tseg/eval/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pick_pairs(verdicts, want: str, keep_equal: str, prefer_equal: str, limit: int, loser_object: bool):
    """Disjoint (winner, loser) index pairs of one group: ``want`` right vs wrong, the winner with one object (the
    loser too if ``loser_object``), ``keep_equal`` the same on both sides, ``prefer_equal`` the same where possible."""
    ok = [i for i, v in enumerate(verdicts) if v.object and getattr(v, want)]
    bad = [i for i, v in enumerate(verdicts) if getattr(v, want) is False and (v.object or not loser_object)]
    pairs, used = [], set()
    for w in ok:
        same_kept = [
            b for b in bad if b not in used and getattr(verdicts[b], keep_equal) == getattr(verdicts[w], keep_equal)
        ]
        if not same_kept:
            continue
        same = [b for b in same_kept if getattr(verdicts[b], prefer_equal) == getattr(verdicts[w], prefer_equal)]
        loser = (same or same_kept)[0]
        used.add(loser)
        pairs.append((w, loser))
        if len(pairs) == limit:
            break
    return pairs


def build_pairs(args) -> dict:
    import torch

    from visalign.data import PreferenceWriter
    from visalign.evaluation import generate
    from visalign.models import load_model
    from visalign.toyworld import caption_texts, judge_images, parse_caption

    out = Path(args.out)
    if any((out / name / "pairs.jsonl").exists() for name in ("layout", "fidelity", "union")):
        raise SystemExit(f"{out} already holds pairs; choose a new --out")
    model = load_model(args.model, device=args.device)
    captions = caption_texts("held_in")
    texts = [c for _ in range(args.repeats) for c in captions for _ in range(args.per_prompt)]
    seeds = [args.seed + i for i in range(len(texts))]
    media = torch.stack([m for _, m in generate(model, texts, seeds, batch_size=args.batch_size, steps=args.steps,
                                                guidance=args.guidance, progress=True)])  # fmt: skip
    verdicts = judge_images(media, texts)
    writers = {name: PreferenceWriter(out / name) for name in ("layout", "fidelity", "union")}
    counts = {"layout": 0, "fidelity": 0}
    k = args.per_prompt
    for g in range(len(texts) // k):
        group = verdicts[g * k : (g + 1) * k]
        # a wrong colour is mostly a missing or broken object (the oracle judges colour on one clean object)
        sets = {"fidelity": pick_pairs(group, "color_ok", "position_ok", "shape_ok", args.pairs_per_group, False)}
        if parse_caption(texts[g * k]).position is not None:  # a wrong position needs an object to be wrong
            sets["layout"] = pick_pairs(group, "position_ok", "color_ok", "shape_ok", args.pairs_per_group, True)
        for name, pairs in sets.items():
            for w, l in pairs:
                i, j = g * k + w, g * k + l
                meta = {"seed_chosen": seeds[i], "seed_rejected": seeds[j], "set": name}
                for writer in (writers[name], writers["union"]):
                    writer.append(texts[i], media[i], media[j], **meta)
                counts[name] += 1
    from visalign.toyworld import summarize

    stats = {"samples": len(texts), "pairs": counts, "base_oracle": summarize(verdicts), "args": vars(args)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"layout pairs {counts['layout']}, fidelity pairs {counts['fidelity']} (union {sum(counts.values())}) "
          f"from {len(texts)} samples in {out}")  # fmt: skip
    return stats


COLUMNS = [("oracle/all/position_acc", "position acc"), ("oracle/all/color_acc", "colour acc"),
           ("oracle/all/shape_acc", "shape acc"), ("oracle/held_in/strict_acc", "strict acc (held-in)"),
           ("oracle/all/object_rate", "object rate"), ("nfe", "NFE / sample")]  # fmt: skip


def table(args) -> str:
    report = json.loads(Path(args.report).read_text())
    rows = report["variants"]
    columns = [(k, name) for k, name in COLUMNS if any(k in row for row in rows.values())]
    lines = ["| variant | " + " | ".join(name for _, name in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, row in rows.items():
        cells = [f"{row[k]:.3f}" if k != "nfe" and k in row else f"{row.get(k, float('nan')):.0f}" for k, _ in columns]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    n = len(report["prompts"])
    text = "\n".join(lines) + f"\n\n{n} samples per variant, seeds {report['seeds'][0]}..{report['seeds'][-1]}."
    print(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairs", help="sample the base, judge with the oracle, write layout/fidelity/union pairs")
    p.add_argument("--model", default="assets/toyworld/toy-sd")
    p.add_argument("--out", default="outputs/tseg/data")
    p.add_argument("--per_prompt", type=int, default=8, help="samples per caption and repeat")
    p.add_argument("--repeats", type=int, default=2, help="passes over the 80 held-in captions")
    p.add_argument("--pairs_per_group", type=int, default=2, help="at most this many pairs per group and set")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    t = sub.add_parser("table", help="a visalign evaluate report.json as a Markdown table")
    t.add_argument("report")
    args = parser.parse_args(argv)
    return build_pairs(args) if args.command == "pairs" else table(args)


if __name__ == "__main__":
    main()
