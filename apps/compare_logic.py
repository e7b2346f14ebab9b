"""The plain functions behind ``visalign compare``; nothing here imports Gradio.

* variants: ``NAME=SOURCE[,steps=N][,guidance=G]`` specs, LoRAs loaded as adapters on one base pipeline;
* generation: every variant samples the same ``(prompt, seed)`` list from the same initial noise, under one lock
  (adapters are switched on the shared model, so two users must never interleave);
* scoring with the selected rewards; votes written as preference pairs in the schema ``visalign train
  diffusion-dpo`` reads; tallies and win rates per variant from the votes on disk;
* timestep-segment experts as one more variant, switched per step, with per-interval toggles.

The gallery of evaluate reports is in :mod:`apps.compare_gallery`.

:class:`Comparison` bundles the model, its variants, the rewards and the vote writer for the app.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from visalign.errors import ConfigError

MAX_VARIANTS = 4
VOTE_KINDS = ("best", "tie", "bad")  # one variant is best / no preference / all of them are bad
DEFAULT_MODEL = "assets/toyworld/toy-sd"
DEMO_LORA = "outputs/demo/lora"
TOY_CLIP = "assets/toyworld/toy-clip"


# ----------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One column of the comparison: the base weights, a LoRA or timestep-segment experts, with optional sampling
    overrides.

    Attributes:
        name: shown above the panel and written to each vote row.
        lora: LoRA folder or ``.safetensors`` file (Diffusers format); ``None``: the base weights.
        experts: a timestep-segment ``experts.json`` (or its folder): each expert switched on inside its interval.
        steps, guidance: override the sampling settings chosen in the app for this variant only.
        adapter: the adapter (or experts plan) name once loaded on the model (set by :func:`load_variants`).
    """

    name: str
    lora: str | None = None
    steps: int | None = None
    guidance: float | None = None
    adapter: str | None = None
    experts: str | None = None

    @property
    def source(self) -> str:
        return self.lora or (f"experts:{self.experts}" if self.experts else "base")

    def describe(self) -> str:
        overrides = [f"{k} {v:g}" for k, v in (("steps", self.steps), ("guidance", self.guidance)) if v is not None]
        return self.source + (f" ({', '.join(overrides)})" if overrides else "")


def _default_name(source: str) -> str:
    if source == "base":
        return "base"
    path = Path(source)
    # "outputs/demo/lora" and "run/final" say nothing alone: keep the folder above
    return f"{path.parent.name}/{path.name}" if path.name in ("lora", "final") and path.parent.name else path.name


def parse_variant(spec: str) -> Variant:
    """Parse ``[NAME=]SOURCE[,steps=N][,guidance=G]``; SOURCE is ``base``, a LoRA folder/file or
    ``experts:MANIFEST`` (timestep-segment experts).

    ``"base"``, ``"dpo=outputs/demo/lora"``, ``"strong=base,guidance=9"``, ``"experts:outputs/tseg"``.
    """
    head, *options = [part.strip() for part in spec.split(",")]
    name, _, source = head.rpartition("=")
    if not source:
        raise ConfigError(f"variant {spec!r}: no source; use NAME=SOURCE with SOURCE 'base' or a LoRA folder")
    values: dict = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key not in ("steps", "guidance") or not eq:
            raise ConfigError(f"variant {spec!r}: unknown option {option!r}; options are steps=N and guidance=G")
        try:
            values[key] = int(value) if key == "steps" else float(value)
        except ValueError as e:
            raise ConfigError(f"variant {spec!r}: {key} must be a number, got {value!r}") from e
    if values.get("steps") is not None and values["steps"] < 1:
        raise ConfigError(f"variant {spec!r}: steps must be >= 1")
    if source.startswith("experts:"):
        manifest = source.removeprefix("experts:")
        return Variant(name=name or "experts", experts=manifest, **values)
    return Variant(name=name or _default_name(source), lora=None if source == "base" else source, **values)


def load_variants(model, variants: Sequence[Variant]) -> list[Variant]:
    """Check 1..4 uniquely named variants and load each LoRA on ``model`` as its own adapter.

    An experts variant is not loaded here (:class:`Comparison` loads its manifest and samples through an
    :class:`~visalign.experts.ExpertsView`); its ``adapter`` is its name, the view's plan. At most one per app.

    Returns:
        The variants with ``adapter`` set (``None`` for the base weights).
    """
    if not 1 <= len(variants) <= MAX_VARIANTS:
        raise ConfigError(f"compare shows 1 to {MAX_VARIANTS} variants side by side, got {len(variants)}")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"variant names must differ; {duplicates[0]!r} is used twice (name them: NAME=SOURCE)")
    if sum(v.experts is not None for v in variants) > 1:
        raise ConfigError("compare shows one set of timestep-segment experts; toggle its intervals in the app")
    loaded = []
    for i, variant in enumerate(variants):
        adapter = variant.name if variant.experts is not None else None
        if variant.lora is not None:
            if not Path(variant.lora).exists():
                raise ConfigError(f"variant {variant.name!r}: LoRA not found: {variant.lora}")
            adapter = f"compare{i}"
            model.load_lora(variant.lora, adapter_name=adapter)
        loaded.append(replace(variant, adapter=adapter))
    return loaded


def shapes_world_variants(model_dir: str = DEFAULT_MODEL, demo_lora: str = DEMO_LORA) -> tuple[list[Variant], str]:
    """What ``visalign compare`` opens with no arguments: toy-sd against the demo's aligned LoRA.

    Returns:
        The variants and a hint for the page (empty when the demo LoRA is there).

    Raises:
        ConfigError: toy-sd is missing (one line that says how to get it).
    """
    if not (Path(model_dir) / "model_index.json").is_file():
        raise ConfigError(
            f"the shapes-world base model {model_dir} is missing: build it with 'visalign toy pretrain --model toy-sd "
            f"--out {model_dir}', or pass --model PIPELINE"
        )
    if (Path(demo_lora) / "pytorch_lora_weights.safetensors").is_file():
        return [Variant("toy-sd"), Variant("demo-dpo", lora=demo_lora)], ""
    hint = (
        f"Only the base model is shown: no aligned LoRA at {demo_lora} yet. Run `visalign demo` first (it writes "
        "its LoRA there), then reopen `visalign compare` to put them side by side."
    )
    return [Variant("toy-sd")], hint


# ----------------------------------------------------------------------------------------------- rewards
def reward_label(spec: str) -> str:
    """A short column name for a reward spec: ``clip(model=x)`` -> ``clip``; ``a:1,b`` -> ``a+b``."""
    from reward_models.registry import parse_reward_spec

    return "+".join(term.name for term in parse_reward_spec(spec))


def build_rewards(specs: Sequence[str], device=None) -> dict[str, Callable]:
    """Build each reward spec (``reward_models.build_reward``) under a short, unique label."""
    from reward_models import build_reward

    rewards: dict[str, Callable] = {}
    for spec in specs:
        label = reward_label(spec)
        label = label if label not in rewards else f"{label}-{len(rewards)}"
        rewards[label] = build_reward(spec, device=device)
    return rewards


def check_rewards(rewards: dict[str, Callable], video: bool) -> None:
    """Fail early when a registered reward cannot score the model's modality (e.g. an image reward on videos)."""
    modality = "video" if video else "image"
    for label, reward in rewards.items():
        spec = getattr(reward, "spec", None)
        if spec is not None and modality not in spec.modalities:
            hint = f"; wrap it: 'video(reward={label})'" if video else ""
            raise ConfigError(f"reward {label!r} scores {'/'.join(spec.modalities)}, not {modality}s{hint}")


def score_media(
    rewards: dict[str, Callable], media: torch.Tensor, prompts: list[str], device=None
) -> dict[str, list[float | None]]:
    """Score ``media`` ``[N, 3, H, W]`` or ``[N, F, 3, H, W]`` in [0, 1] with each reward.

    Returns:
        label -> ``N`` scores; ``None`` where the reward could not score a sample (``valid`` false, or NaN).
    """
    out: dict[str, list[float | None]] = {}
    with torch.no_grad():
        for label, reward in rewards.items():
            result = reward(media.to(device) if device is not None else media, prompts)
            scores = torch.as_tensor(getattr(result, "scores", result)).float().cpu()
            valid = getattr(result, "valid", None)
            valid = torch.ones(len(scores), dtype=torch.bool) if valid is None else valid.cpu().bool()
            out[label] = [float(s) if ok and not torch.isnan(s) else None for s, ok in zip(scores, valid)]
    return out


# ----------------------------------------------------------------------------------------------- generation
@dataclass
class Sample:
    """One variant's output for one prompt."""

    variant: str
    media: torch.Tensor  # [3, H, W] or [F, 3, H, W], float in [0, 1]
    seconds: float  # sampling time of the variant's whole batch
    steps: int
    guidance: float
    scores: dict[str, float | None] = field(default_factory=dict)
    experts: list[str] | None = None  # an experts variant: the experts that were switched on


@dataclass
class Generation:
    """One click of "Generate": every variant on one prompt and seed, in the order the panels show them."""

    prompt: str
    seed: int
    negative_prompt: str | None
    samples: list[Sample]  # in variant order
    order: list[int]  # panel p shows samples[order[p]]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    voted: bool = False

    def panel(self, p: int) -> Sample:
        return self.samples[self.order[p]]


def sampling_settings(model, variant: Variant, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """The steps and guidance a variant samples with: its own override, else the app's value, else the family's."""
    steps = variant.steps or steps or model.default_steps
    if variant.guidance is not None:
        return steps, variant.guidance
    return steps, model.default_guidance if guidance is None else guidance


def generate_variants(
    model,
    variants: Sequence[Variant],
    prompts: list[str],
    seeds: list[int],
    *,
    lock: threading.Lock,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    experts: Sequence[str] | None = None,
) -> list[tuple[torch.Tensor, float, int, float]]:
    """Sample every variant on the same ``(prompt, seed)`` list in one batch each.

    Every variant starts from the same initial noise per seed (:func:`visalign.evaluation.generate`), so the
    panels differ only by the weights and settings. ``lock`` is held for the whole call: adapters are switched on
    the one shared model. ``experts``: the timestep-segment experts an experts variant may switch on (the
    per-interval toggles; ``None``: all), when ``model`` is an :class:`~visalign.experts.ExpertsView`.

    Returns:
        Per variant: ``(media [N, 3, H, W] or [N, F, 3, H, W], seconds, steps, guidance)``.
    """
    from visalign.evaluation import sample_all

    out = []
    with lock:
        if experts is not None:
            from visalign.experts import SwitchPlan

            for variant in variants:
                if variant.experts is not None:
                    model.plans[variant.adapter] = SwitchPlan(enabled=frozenset(experts))
        for variant in variants:
            v_steps, v_guidance = sampling_settings(model, variant, steps, guidance)
            model.set_adapters(variant.adapter)
            started = time.perf_counter()
            media = sample_all(
                model,
                prompts,
                seeds,
                batch_size=len(prompts),
                progress=False,
                steps=v_steps,
                guidance=v_guidance,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_frames=num_frames,
            )
            out.append((media, time.perf_counter() - started, v_steps, v_guidance))
    return out


def panel_order(n: int, blind: bool, seed: int | None = None) -> list[int]:
    """Which variant each panel shows: in order, or shuffled (blind voting, so position says nothing)."""
    if not blind:
        return list(range(n))
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return torch.randperm(n, generator=g).tolist()


# ----------------------------------------------------------------------------------------------- votes
def vote_pairs(n: int, kind: str, winner: int | None = None) -> list[tuple[int, int, float]]:
    """The preference pairs a vote on ``n`` variants makes: ``(chosen, rejected, label)`` variant indices.

    ``best``: the winner over each other variant (label 1). ``tie`` and ``bad``: every pair once with label 0.5
    (kept as data; the DPO trainer drops ties).
    """
    if kind not in VOTE_KINDS:
        raise ValueError(f"vote must be one of {VOTE_KINDS}, got {kind!r}")
    if n < 2:
        raise ValueError("voting needs at least two variants")
    if kind == "best":
        if winner is None or not 0 <= winner < n:
            raise ValueError(f"a 'best' vote needs the winner's index in [0, {n}), got {winner}")
        return [(winner, j, 1.0) for j in range(n) if j != winner]
    return [(i, j, 0.5) for i in range(n) for j in range(i + 1, n)]


def record_vote(
    writer,
    generation: Generation,
    kind: str,
    panel: int | None = None,
    *,
    model: str = "",
    session: str = "",
) -> list[dict]:
    """Append a vote's pairs to the preference dataset (images or videos saved; each row atomic).

    Args:
        writer: a :class:`visalign.data.PreferenceWriter` (thread-safe).
        generation: what was shown.
        kind: ``best`` (then ``panel`` is the winning panel), ``tie`` or ``bad``.
        model: the base pipeline, recorded so tallies count only this model's votes.
        session: the voter's session id.

    Returns:
        The rows written (``prompt, chosen, rejected, label`` plus ``vote_id, vote, chosen_variant,
        rejected_variant, chosen_panel, seed, negative_prompt, steps/guidance, scores, model, session, time``).
    """
    winner = generation.order[panel] if kind == "best" and panel is not None else None
    vote_id = uuid.uuid4().hex[:12]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    position = {variant: p for p, variant in enumerate(generation.order)}
    rows = []
    for i, j, label in vote_pairs(len(generation.samples), kind, winner):
        chosen, rejected = generation.samples[i], generation.samples[j]
        meta = {
            "vote_id": vote_id,
            "vote": kind,
            "generation_id": generation.id,
            "chosen_variant": chosen.variant,
            "rejected_variant": rejected.variant,
            "chosen_panel": position[i],
            "rejected_panel": position[j],
            "seed": generation.seed,
            "negative_prompt": generation.negative_prompt,
            "chosen_steps": chosen.steps,
            "chosen_guidance": chosen.guidance,
            "rejected_steps": rejected.steps,
            "rejected_guidance": rejected.guidance,
            **{f"chosen_score/{k}": v for k, v in chosen.scores.items()},
            **{f"rejected_score/{k}": v for k, v in rejected.scores.items()},
            **({"chosen_experts": chosen.experts} if chosen.experts is not None else {}),
            **({"rejected_experts": rejected.experts} if rejected.experts is not None else {}),
            "model": model,
            "session": session,
            "time": now,
        }
        rows.append(writer.append(generation.prompt, chosen.media, rejected.media, label, **meta))
    return rows


def read_votes(path: str | os.PathLike, model: str | None = None) -> list[dict]:
    """Vote rows of ``pairs.jsonl`` (only ``model``'s when given); rows from other tools (no ``vote_id``) skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the writer appends whole lines; a hand-edited file may not
        if isinstance(row, dict) and "vote_id" in row and (model is None or row.get("model") == model):
            rows.append(row)
    return rows


def tally_votes(rows: list[dict], variants: Sequence[str]) -> dict[str, dict]:
    """Pairwise tallies per variant from vote rows (between the given variants only).

    Returns:
        variant -> ``{"wins", "losses", "ties", "bad", "win_rate"}``; ``win_rate`` = (wins + ties / 2) /
        (wins + losses + ties), ``None`` before any comparison. ``bad`` (all shown were bad) does not count.
    """
    table = {v: {"wins": 0, "losses": 0, "ties": 0, "bad": 0} for v in variants}
    for row in rows:
        a, b = row.get("chosen_variant"), row.get("rejected_variant")
        if a not in table or b not in table:
            continue
        if row.get("vote") == "best":
            table[a]["wins"] += 1
            table[b]["losses"] += 1
        else:
            key = "bad" if row.get("vote") == "bad" else "ties"
            table[a][key] += 1
            table[b][key] += 1
    for counts in table.values():
        n = counts["wins"] + counts["losses"] + counts["ties"]
        counts["win_rate"] = (counts["wins"] + counts["ties"] / 2) / n if n else None
    return table


def format_tally(table: dict[str, dict], n_votes: int) -> str:
    """A Markdown table of :func:`tally_votes`."""
    lines = [
        f"**{n_votes} vote{'s' if n_votes != 1 else ''}**",
        "",
        "| variant | wins | losses | ties | all bad | win rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in table.items():
        rate = "–" if c["win_rate"] is None else f"{100 * c['win_rate']:.0f}%"
        lines.append(f"| {name} | {c['wins']} | {c['losses']} | {c['ties']} | {c['bad']} | {rate} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the bundle
class Comparison:
    """The model, its variants, the rewards and the vote dataset, shared by every user of the app.

    Args:
        model: a :class:`visalign.models.DiffusionModel`.
        variants: 1..4 variants (LoRAs and experts are loaded here).
        votes_dir: the preference dataset votes append to (``pairs.jsonl`` + ``media/``).
        rewards: label -> reward (``reward(media, prompts) -> RewardOutput``), scored under each panel.
        model_name: recorded in each vote row (default: ``model.source``).
        height, width, num_frames: output size (default: the model's).
        reward_device: where media go for scoring.

    Attributes:
        experts: the experts variant's :class:`~visalign.experts.Manifest` (``None``: no experts variant); then
            ``model`` is an :class:`~visalign.experts.ExpertsView` of the given model.
    """

    def __init__(
        self,
        model,
        variants: Sequence[Variant],
        votes_dir: str | os.PathLike,
        *,
        rewards: dict[str, Callable] | None = None,
        model_name: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        reward_device=None,
    ):
        from visalign.data import PreferenceWriter

        self.rewards = dict(rewards or {})
        check_rewards(self.rewards, model.is_video)
        self.variants = load_variants(model, variants)
        self.experts = None
        spec = next((v for v in self.variants if v.experts is not None), None)
        if spec is not None:
            from visalign.experts import ExpertsView, SwitchPlan, load_experts

            self.experts = load_experts(model, spec.experts)
            model = ExpertsView(model, self.experts, {spec.adapter: SwitchPlan()})
        self.model = model
        self.writer = PreferenceWriter(votes_dir)
        self.model_name = model_name or str(model.source)
        self.size = {"height": height, "width": width, "num_frames": num_frames}
        self.reward_device = reward_device
        self.lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def generate(
        self,
        prompt: str,
        seed: int,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        blind: bool = False,
        rewards: Sequence[str] | None = None,
        experts: Sequence[str] | None = None,
    ) -> Generation:
        """Every variant on ``prompt`` with ``seed``, scored by ``rewards`` (labels; default all); panels shuffled
        when ``blind``; ``experts``: which timestep-segment experts the experts variant switches on (default all;
        empty: none, the base model)."""
        if not prompt.strip():
            raise ConfigError("enter a prompt")
        unknown = sorted(set(rewards or ()) - set(self.rewards))
        if unknown:
            raise ConfigError(f"unknown reward {unknown[0]!r}; loaded: {', '.join(self.rewards) or 'none'}")
        enabled = None
        if self.experts is not None:
            enabled = list(self.experts.names if experts is None else experts)
            unknown = sorted(set(enabled) - set(self.experts.names))
            if unknown:
                raise ConfigError(f"unknown expert {unknown[0]!r}; the experts are {', '.join(self.experts.names)}")
        selected = {k: r for k, r in self.rewards.items() if rewards is None or k in rewards}
        negative_prompt = negative_prompt or None
        outputs = generate_variants(
            self.model,
            self.variants,
            [prompt],
            [int(seed)],
            lock=self.lock,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            experts=enabled,
            **self.size,
        )
        samples = []
        for variant, (media, seconds, v_steps, v_guidance) in zip(self.variants, outputs):
            with self.lock:  # rewards keep text-embedding caches: one user at a time
                scores = score_media(selected, media, [prompt], self.reward_device)
            on = enabled if variant.experts is not None else None
            first = {k: v[0] for k, v in scores.items()}
            samples.append(Sample(variant.name, media[0], seconds, v_steps, v_guidance, first, experts=on))
        return Generation(prompt, int(seed), negative_prompt, samples, panel_order(len(samples), blind))

    def vote(self, generation: Generation, kind: str, panel: int | None = None, session: str = "") -> list[dict]:
        return record_vote(self.writer, generation, kind, panel, model=self.model_name, session=session)

    def tally(self) -> tuple[dict[str, dict], int]:
        """Tallies of this model's votes on disk (every session, earlier runs too) and the number of votes."""
        rows = read_votes(self.writer.file, self.model_name)
        return tally_votes(rows, self.names), len({r["vote_id"] for r in rows})
