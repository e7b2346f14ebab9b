"""``visalign compare``: a base model and its adapters side by side on one prompt and seed; votes become DPO data.

Each variant (the base weights, a LoRA, or the base with other sampling settings) generates from the same initial
noise; the panels show the media (videos as players), the selected rewards' scores and the generation time. A vote
(left / right / tie / both bad, or the best of N) appends preference pairs to ``--votes`` (``pairs.jsonl`` +
``media/``, the schema ``visalign train diffusion-dpo --data`` reads); the tally and win rates per variant update
at once. The gallery tab browses ``visalign evaluate`` reports found under ``--reports``. ``--experts MANIFEST``
adds timestep-segment experts as one more panel, each expert switched on inside its interval, with one toggle per
interval (an expert toggled off leaves its interval to the base model).

With no arguments it opens the shapes world: toy-sd against the demo's aligned LoRA (``outputs/demo/lora``).

Serving: binds 127.0.0.1 unless ``--host``/``--share`` say otherwise; Gradio serves only the files this app wrote
into its own temporary folder (no ``allowed_paths``); users queue for the one model, each session keeps its own
results. The logic lives in :mod:`apps.compare_logic` (no Gradio there).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from apps.compare_gallery import find_reports, load_report
from apps.compare_logic import (
    DEFAULT_MODEL,
    DEMO_LORA,
    TOY_CLIP,
    Comparison,
    Generation,
    Variant,
    format_tally,
    parse_variant,
    shapes_world_variants,
)
from visalign.config import field
from visalign.errors import ConfigError, VisalignError

# small models make small images: fill the panel, and keep pixels sharp rather than blurred when scaled up
CSS = """
.panel-media img, .panel-media video {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}
.report-rows {width: 100%}
.report-rows img {width: 100%; image-rendering: pixelated}
.report-rows td:first-child {width: 8em}
"""
# Chromium flags for Playwright on a headless server (see the test environment notes)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
# true once every panel shows its image or can play its video
PANELS_LOADED = """() => {
  const media = [...document.querySelectorAll('.panel-media img, .panel-media video')];
  const ready = e => (e.tagName === 'VIDEO' ? e.readyState >= 2 : e.complete && e.naturalWidth > 0);
  return media.length > 0 && media.every(ready);
}"""
TOY_PROMPTS = ("assets/toyworld/prompts/held_in.txt", "assets/toyworld/prompts/held_out.txt")


@dataclass
class CompareConfig:
    model: str = field(DEFAULT_MODEL, help="base pipeline: hub id or local folder (default: the shapes world)")
    variant: list[str] = field(
        [],
        help="1 to 4 of NAME=SOURCE[,steps=N][,guidance=G]; SOURCE: 'base' or a LoRA folder "
        f"(default: base, plus {DEMO_LORA} for the shapes world)",
    )
    lora: list[str] = field([], help="LoRA folders shown beside the base (short for --variant base DIR ...)")
    experts: str | None = field(
        None, help="timestep-segment experts.json (or folder): one more panel, with per-interval toggles"
    )
    reward: list[str] = field([], help="reward specs scored under each panel (shapes world default: oracle, toy-clip)")
    votes: str = field("outputs/compare/votes", help="preference dataset that votes append to")
    reports: str = field("outputs", help="folder the gallery tab searches for evaluate reports")
    steps: int | None = field(None, help="initial sampling steps (default: the model's toyworld.json or family)")
    guidance: float | None = field(None, help="initial guidance scale (default: the model's toyworld.json or family)")
    height: int | None = field(None, help="height in pixels (default: the model's)")
    width: int | None = field(None, help="width in pixels (default: the model's)")
    num_frames: int | None = field(None, help="frames per video (video families)")
    blind: bool = field(False, help="shuffle the panels and hide variant names until the vote")
    host: str = field("127.0.0.1", help="address to bind; another address exposes the app to your network")
    port: int | None = field(None, help="port (default: Gradio's, 7860 or the next free one)")
    share: bool = field(False, help="also open a public Gradio share link (anyone with it can use the app)")
    device: str = field("auto", help="cpu, cuda or auto")
    dtype: str = field("fp32", help="fp32, fp16 or bf16")
    screenshot: str | None = field(
        None, help="generate once, save a PNG screenshot of the app here and exit (docs; needs playwright, chromium)"
    )
    screenshot_prompt: str = field("a red circle on the left", help="the prompt generated for --screenshot")

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{name} must be a positive multiple of 8, got {value}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")


# ----------------------------------------------------------------------------------------------- the app
def _media_value(media, path: Path):
    """What a panel shows: an RGB array for images; for videos an MP4 written where the app serves from."""
    from visalign.media import save_video, to_uint8

    if media.ndim == 4:
        return str(save_video(media, path))
    return to_uint8(media)


def _panel_info(generation: Generation, p: int, label: str) -> str:
    sample = generation.panel(p)
    scores = " · ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in sample.scores.items())
    timing = f"{sample.seconds:.2f} s · {sample.steps} steps · guidance {sample.guidance:g}"
    if sample.experts is not None:
        timing += " · experts on: " + (", ".join(sample.experts) or "none (base)")
    return f"**{label}** · {timing}" + (f"\n\n{scores}" if scores else "")


def build_app(
    comparison: Comparison,
    *,
    reports_dir: str | os.PathLike | None = None,
    examples: list[str] | tuple[str, ...] = (),
    hint: str = "",
    blind: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    serve_dir: str | os.PathLike | None = None,
    title: str = "visalign compare",
):
    """The Gradio app around ``comparison``; launch it with :func:`serve`.

    Args:
        comparison: the model, variants, rewards and vote dataset.
        reports_dir: the gallery tab lists evaluate reports found under it (``None``: no gallery tab).
        examples: prompts offered under the prompt box.
        hint: a note shown at the top (e.g. how to get a LoRA to compare against).
        blind: shuffle panels per generation and name them A, B, ... until the vote.
        steps, guidance: initial values of the sliders (default: the model family's).
        serve_dir: the only folder Gradio serves files from (default: a new temporary folder).
    """
    # Gradio serves its upload/cache folder; pointing it at a folder of our own means the app serves only what it
    # wrote (rendered images and videos), never the vote dataset or anything else on the machine.
    serve_dir = Path(serve_dir or tempfile.mkdtemp(prefix="visalign-compare-")).resolve()
    (serve_dir / "videos").mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(serve_dir)
    model = comparison.model
    n = len(comparison.variants)
    labels = [chr(ord("A") + i) for i in range(n)] if blind else comparison.names
    steps = steps or model.default_steps
    guidance = model.default_guidance if guidance is None else guidance

    def media_component(label: str):
        kwargs = dict(label=label, interactive=False, height=320, elem_classes=["panel-media"])
        return gr.Video(autoplay=True, loop=True, **kwargs) if model.is_video else gr.Image(**kwargs)

    def on_generate(prompt, negative, seed, n_steps, scale, rewards, experts=None):
        try:
            generation = comparison.generate(
                prompt, int(seed or 0), steps=int(n_steps), guidance=float(scale), negative_prompt=negative,
                blind=blind, rewards=rewards, experts=experts,
            )  # fmt: skip
        except VisalignError as e:
            raise gr.Error(str(e)) from e
        media = [_media_value(generation.panel(p).media, serve_dir / "videos" / f"{generation.id}-{p}.mp4")
                 for p in range(n)]  # fmt: skip
        infos = [_panel_info(generation, p, labels[p]) for p in range(n)]
        status = "Which is better? Vote below." if n > 1 else "Generated."
        return generation, *media, *infos, status

    def on_vote(kind, panel, generation, request: gr.Request):
        if generation is None:
            return generation, "Generate first, then vote.", *([gr.skip()] * (n + 1))
        if generation.voted:
            return generation, "You already voted on these; generate again.", *([gr.skip()] * (n + 1))
        rows = comparison.vote(generation, kind, panel, session=request.session_hash or "")
        generation.voted = True
        if kind == "best":
            others = ", ".join(r["rejected_variant"] for r in rows)
            status = f"Recorded: **{rows[0]['chosen_variant']}** preferred over {others}."
        else:
            status = "Recorded: " + ("a tie." if kind == "tie" else "all bad.")
        status += f" ({len(rows)} pair{'s' if len(rows) > 1 else ''} → `{comparison.writer.file}`)"
        # after the vote, blind panels reveal which variant they were
        infos = [_panel_info(generation, p, f"{labels[p]} = {generation.panel(p).variant}" if blind else labels[p])
                 for p in range(n)]  # fmt: skip
        return generation, status, tally_markdown(), *infos

    def vote_handler(kind: str, panel: int | None):
        def handler(generation, request: gr.Request):
            return on_vote(kind, panel, generation, request)

        return handler

    def tally_markdown():
        return format_tally(*comparison.tally())

    with gr.Blocks(title=title, delete_cache=(3600, 24 * 3600)) as app:
        state = gr.State(None)  # this session's last generation: users never see each other's results
        gr.Markdown(
            f"# {title}\n`{comparison.model_name}` — "
            + " · ".join(f"**{v.name}**: {v.describe()}" for v in comparison.variants)
            + (f"\n\n> {hint}" if hint else "")
        )
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=1, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
                with gr.Column(scale=2):
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                        dice = gr.Button("Random seed", size="sm")
                    n_steps = gr.Slider(1, 100, value=steps, step=1, label="Steps")
                    scale = gr.Slider(0.0, 20.0, value=guidance, step=0.5, label="Guidance")
                    rewards = gr.CheckboxGroup(list(comparison.rewards), value=list(comparison.rewards),
                                               label="Rewards", visible=bool(comparison.rewards))  # fmt: skip
                    toggles = _expert_toggles(comparison.experts)
            if examples:
                gr.Examples([[e] for e in examples], inputs=[prompt], label="Example prompts")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            media, infos, pick = [], [], []
            with gr.Row(equal_height=True):
                for p in range(n):
                    with gr.Column(elem_id=f"panel-{p}"):
                        media.append(media_component(labels[p]))
                        infos.append(gr.Markdown(f"**{labels[p]}**", elem_id=f"info-{p}"))
                        if n > 2:
                            pick.append(gr.Button(f"{labels[p]} is best", elem_id=f"best-{p}"))
            with gr.Row(visible=n > 1):
                if n == 2:
                    pick = [gr.Button("◀ Left is better", elem_id="vote-left")]
                tie = gr.Button("Tie", elem_id="vote-tie")
                bad = gr.Button("Both bad" if n == 2 else "All bad", elem_id="vote-bad")
                if n == 2:
                    pick.append(gr.Button("Right is better ▶", elem_id="vote-right"))
            status = gr.Markdown("", elem_id="status")
            gr.Markdown(f"Votes go to `{comparison.writer.file}`; train on them with "
                        f"`visalign train diffusion-dpo --data {comparison.writer.dir}`.")  # fmt: skip
            tally = gr.Markdown(tally_markdown(), elem_id="tally")

        run_inputs = [prompt, negative, seed, n_steps, scale, rewards] + ([toggles] if toggles else [])
        run_outputs = [state, *media, *infos, status]
        run.click(on_generate, run_inputs, run_outputs, concurrency_id="model")
        prompt.submit(on_generate, run_inputs, run_outputs, concurrency_id="model")
        dice.click(lambda: int.from_bytes(os.urandom(3), "little"), None, seed, queue=False)
        vote_outputs = [state, status, tally, *infos]
        buttons = [(button, "best", p) for p, button in enumerate(pick)] + [(tie, "tie", None), (bad, "bad", None)]
        for button, kind, p in buttons:
            button.click(vote_handler(kind, p), [state], vote_outputs, concurrency_id="votes", concurrency_limit=8)
        app.load(tally_markdown, None, tally)  # other users' votes since the page was built
        if reports_dir is not None:
            _gallery_tab(reports_dir)
    app.queue(default_concurrency_limit=1, max_size=64)
    return app


def _expert_toggles(manifest):
    """One checkbox per timestep-segment expert, labelled with its interval (``None`` without experts)."""
    if manifest is None:
        return None
    choices = [(f"{e.name} · t {e.t_min:g}–{e.t_max:g}", e.name) for e in manifest.experts]
    return gr.CheckboxGroup(choices, value=manifest.names, elem_id="experts",
                            label="Experts (each on inside its interval; off: the base model there)")  # fmt: skip


def _report_rows_html(report: dict) -> str:
    """One labelled row of samples per variant, images inlined as PNG data (no file is served for them)."""
    import base64
    import html
    import io

    from PIL import Image

    from visalign.media import to_uint8

    lines = ['<table class="report-rows"><tr><th>variant</th><th>samples: same prompt and seed per column</th></tr>']
    for image, variant in zip(report["panels"], report["variants"]):
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        lines.append(f'<tr><td><b>{html.escape(variant)}</b></td><td><img alt="{html.escape(variant)}" '
                     f'src="data:image/png;base64,{data}"></td></tr>')  # fmt: skip
    return "\n".join(lines) + "</table>"


def _gallery_tab(reports_dir) -> None:
    """A tab that browses evaluate reports under ``reports_dir``: metrics table and one grid row per variant."""
    import pandas as pd

    def choices():
        return gr.Dropdown(choices=find_reports(reports_dir))

    def show(name):
        if not name:
            return None, "", ""
        try:
            report = load_report(reports_dir, name)
        except VisalignError as e:
            raise gr.Error(str(e)) from e
        table = pd.DataFrame(report["rows"], columns=report["headers"])
        columns = " · ".join(f"`{p}` (seed {s})" for p, s in zip(report["prompts"], report["seeds"]))
        return table, _report_rows_html(report), f"Base: **{report['base']}**. Columns, left to right: {columns}"

    with gr.Tab("Gallery") as tab:
        with gr.Row():
            pick = gr.Dropdown(find_reports(reports_dir), label=f"Evaluate report under {reports_dir}", scale=4,
                               elem_id="report")  # fmt: skip
            refresh = gr.Button("↻ refresh", size="sm", scale=1)
        table = gr.Dataframe(label="Metrics per variant", interactive=False, elem_id="report-table")
        caption = gr.Markdown()
        rows = gr.HTML(elem_id="report-rows")
        refresh.click(choices, None, pick, queue=False)
        # the first report is preselected, so opening the tab shows it; picking another shows that one
        gr.on([tab.select, pick.change], show, pick, [table, rows, caption])


def serve(app, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Launch ``app``: no extra ``allowed_paths`` (only its own folder is served), no server-side rendering."""
    return app.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[],
        ssr_mode=False,
        css=CSS,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
    )


# ----------------------------------------------------------------------------------------------- the command
def resolve(cfg: CompareConfig) -> tuple[list[Variant], list[str], str]:
    """Variants, reward specs and the page hint for a config (the shapes-world defaults when not given)."""
    from visalign.toyworld import sampling_defaults

    shapes_world = bool(sampling_defaults(cfg.model)) or cfg.model == DEFAULT_MODEL
    if cfg.model == DEFAULT_MODEL:
        variants, hint = shapes_world_variants(cfg.model, DEMO_LORA)  # one clear line when toy-sd is missing
    else:
        variants = [Variant("base")]
        hint = "Only the base model is shown: add variants with --variant NAME=LORA_DIR (up to 4)."
    if cfg.variant or cfg.lora or cfg.experts:
        variants = [parse_variant(spec) for spec in cfg.variant] or [Variant("base")]
        variants, hint = variants + [parse_variant(path) for path in cfg.lora], ""
        if cfg.experts:
            variants.append(Variant("experts", experts=cfg.experts))
    rewards = list(cfg.reward)
    if not rewards and shapes_world:
        rewards = ["oracle"]
        if (Path(TOY_CLIP) / "open_clip_config.json").is_file():
            rewards.append(f"clip(model={TOY_CLIP})")
    return variants, rewards, hint


def run(cfg: CompareConfig, block: bool = True):
    from apps.compare_logic import build_rewards
    from apps.generate import resolve_device
    from visalign.evaluation import read_prompts
    from visalign.models import load_model
    from visalign.models.lora import lora_file
    from visalign.toyworld import sampling_defaults

    variants, reward_specs, hint = resolve(cfg)
    for variant in variants:
        if variant.lora is not None:
            lora_file(variant.lora)  # a clear error before the model loads
    device = resolve_device(cfg.device)
    defaults = sampling_defaults(cfg.model)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype)
    comparison = Comparison(
        model,
        variants,
        cfg.votes,
        rewards=build_rewards(reward_specs, device=device),
        model_name=cfg.model,
        height=cfg.height or defaults.get("height"),
        width=cfg.width or defaults.get("width"),
        num_frames=cfg.num_frames,
        reward_device=device,
    )
    examples = []
    if defaults:
        examples = [p for f in TOY_PROMPTS if Path(f).is_file() for p in read_prompts(f)[:3]]
    app = build_app(
        comparison,
        reports_dir=cfg.reports,
        examples=examples,
        hint=hint,
        blind=cfg.blind,
        steps=cfg.steps or defaults.get("steps"),
        guidance=cfg.guidance if cfg.guidance is not None else defaults.get("guidance"),
    )
    if cfg.screenshot:
        serve(app, host="127.0.0.1", port=cfg.port, block=False)
        try:
            return capture(app.local_url, cfg.screenshot, cfg.screenshot_prompt)
        finally:
            app.close()
    print(f"visalign compare: {', '.join(comparison.names)}; votes append to {comparison.writer.file}")
    return serve(app, host=cfg.host, port=cfg.port, share=cfg.share, block=block)


def capture(url: str, path: str | os.PathLike, prompt: str, chromium: str = "/usr/bin/chromium") -> Path:
    """Open the app in the system Chromium (Playwright), generate ``prompt`` and save a full-page screenshot."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise ConfigError("--screenshot needs playwright: pip install -e '.[test]'") from e
    if not Path(chromium).exists():
        raise ConfigError(f"--screenshot needs Chromium at {chromium} (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, wait_until="load")
        page.locator("#prompt textarea").fill(prompt)
        page.locator("#generate").click()
        page.wait_for_function(PANELS_LOADED, timeout=600_000)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"visalign compare: screenshot saved to {path}")
    return Path(path)


def main(argv: list[str]) -> None:
    from visalign.config import parse_config

    run(parse_config(CompareConfig, argv, prog="visalign compare", description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
