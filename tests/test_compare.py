"""`visalign compare`: variants, same-seed generation, votes as preference data, tallies, gallery, the real app.

The logic is tested without Gradio on tiny real pipelines; one test drives the served app in the system Chromium
with Playwright (skipped when /usr/bin/chromium or playwright is missing).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from apps.compare_gallery import find_reports, load_report, split_grid_rows
from apps.compare_logic import (
    Comparison,
    Generation,
    Sample,
    Variant,
    format_tally,
    load_variants,
    parse_variant,
    read_votes,
    record_vote,
    shapes_world_variants,
    tally_votes,
    vote_pairs,
)
from visalign.config import ConfigError
from visalign.data import PreferenceWriter, load_image, load_preference_data
from visalign.evaluation import sample_all
from visalign.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
STEPS = 3


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline_dir, tmp_path_factory):
    """A LoRA for the tiny SD pipeline with non-zero B, so it changes the outputs."""
    model = load_model(tiny_pipeline_dir("sd"))
    g = torch.Generator().manual_seed(0)
    for p in model.add_lora(rank=4):
        p.data = torch.randn(p.shape, generator=g) * 0.5
    return model.save_lora(tmp_path_factory.mktemp("lora") / "dpo")


def brightness(media, prompts):
    return media.float().mean(dim=tuple(range(1, media.ndim)))


def comparison(tiny_pipeline_dir, votes_dir, variants, name="sd", **kw):
    model = load_model(tiny_pipeline_dir(name))
    return Comparison(model, variants, votes_dir, rewards={"oracle": _oracle(), "brightness": brightness}, **kw)


def _oracle():
    from reward_models import build_reward

    return build_reward("oracle")


def fake_generation(seed: int, n: int = 2, video: bool = False) -> Generation:
    g = torch.Generator().manual_seed(seed)
    shape = (5, 3, 16, 16) if video else (3, 16, 16)
    samples = [Sample(f"v{i}", torch.rand(shape, generator=g), 0.1, 4, 3.0, {"oracle": float(i)}) for i in range(n)]
    return Generation("a red circle", seed, None, samples, list(range(n)))


# ----------------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("spec, expected", [
    ("base", Variant("base")),
    ("dpo=outputs/demo/lora", Variant("dpo", lora="outputs/demo/lora")),
    ("outputs/demo/lora", Variant("demo/lora", lora="outputs/demo/lora")),
    ("runs/my-lora", Variant("my-lora", lora="runs/my-lora")),
    ("strong=base,guidance=9,steps=4", Variant("strong", guidance=9.0, steps=4)),
    ("experts:runs/tseg/final", Variant("experts", experts="runs/tseg/final")),
    ("fast=experts:runs/tseg,steps=8", Variant("fast", experts="runs/tseg", steps=8)),
])  # fmt: skip
def test_parse_variant(spec, expected):
    assert parse_variant(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("x=base,foo=1", "unknown option 'foo=1'"),
    ("x=base,steps=a", "steps must be a number"),
    ("x=base,steps=0", "steps must be >= 1"),
    ("x=", "no source"),
])  # fmt: skip
def test_parse_variant_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_variant(spec)


def test_load_variants_checks_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="1 to 4 variants"):
        load_variants(None, [Variant(f"v{i}") for i in range(5)])
    with pytest.raises(ConfigError, match="'a' is used twice"):
        load_variants(None, [Variant("a"), Variant("a", lora="x")])
    with pytest.raises(ConfigError, match="LoRA not found"):
        load_variants(None, [Variant("base"), Variant("dpo", lora=str(tmp_path / "missing"))])
    with pytest.raises(ConfigError, match="one set of timestep-segment experts"):
        load_variants(None, [Variant("a", experts="x"), Variant("b", experts="y")])


def test_vote_pairs():
    assert vote_pairs(2, "best", 0) == [(0, 1, 1.0)]
    assert vote_pairs(2, "best", 1) == [(1, 0, 1.0)]
    assert vote_pairs(3, "best", 2) == [(2, 0, 1.0), (2, 1, 1.0)]
    assert vote_pairs(2, "tie") == [(0, 1, 0.5)]
    assert vote_pairs(3, "bad") == [(0, 1, 0.5), (0, 2, 0.5), (1, 2, 0.5)]
    with pytest.raises(ValueError, match="winner"):
        vote_pairs(2, "best", 2)
    with pytest.raises(ValueError, match="vote must be one of"):
        vote_pairs(2, "left")


def test_tally_votes_counts_pairs_and_win_rates():
    def row(vote, a, b, vid):
        return {"vote": vote, "chosen_variant": a, "rejected_variant": b, "vote_id": vid}

    rows = [row("best", "a", "b", 1), row("best", "a", "b", 2), row("best", "b", "a", 3), row("tie", "a", "b", 4),
            row("bad", "a", "b", 5), row("best", "a", "other", 6)]  # fmt: skip
    table = tally_votes(rows, ["a", "b", "c"])
    assert table["a"] == {"wins": 2, "losses": 1, "ties": 1, "bad": 1, "win_rate": 2.5 / 4}
    assert table["b"] == {"wins": 1, "losses": 2, "ties": 1, "bad": 1, "win_rate": 1.5 / 4}
    assert table["c"]["win_rate"] is None  # never compared; rows with variants not shown are ignored
    text = format_tally(table, 5)
    assert "**5 votes**" in text and "| a | 2 | 1 | 1 | 1 | 62% |" in text and "| c | 0 | 0 | 0 | 0 | – |" in text


def test_split_grid_rows_is_exact():
    from visalign.media import image_grid

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = split_grid_rows(image_grid(images, nrow=3), 2)
    assert [tuple(r.shape) for r in rows] == [(3, 8, 2 + 3 * 10)] * 2
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(rows[r][:, :, 2 + c * 10 : 10 + c * 10], images[r * 3 + c])


def test_shapes_world_defaults(tmp_path, monkeypatch, capsys):
    from apps.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="visalign toy pretrain --model toy-sd"):
        shapes_world_variants()
    assert main(["compare"]) == 2  # no toy-sd yet: one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "assets/toyworld/toy-sd is missing" in err
    toy = tmp_path / "assets/toyworld/toy-sd"
    toy.mkdir(parents=True)
    (toy / "model_index.json").write_text("{}")
    variants, hint = shapes_world_variants()
    assert variants == [Variant("toy-sd")] and "outputs/demo/lora" in hint and "visalign demo" in hint
    lora = tmp_path / "outputs/demo/lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    variants, hint = shapes_world_variants()
    assert variants == [Variant("toy-sd"), Variant("demo-dpo", lora="outputs/demo/lora")] and hint == ""
    from apps.compare import CompareConfig, resolve

    cfg = CompareConfig()
    assert (cfg.host, cfg.share) == ("127.0.0.1", False)
    assert resolve(cfg) == (variants, ["oracle"], "")  # toy-clip is added when assets/toyworld/toy-clip exists
    cfg = CompareConfig(variant=["base", "strong=base,guidance=9"], reward=["clip"])
    assert resolve(cfg) == ([Variant("base"), Variant("strong", guidance=9.0)], ["clip"], "")
    cfg = CompareConfig(lora=["outputs/demo/lora"])  # the command `visalign demo` prints
    assert resolve(cfg)[0] == [Variant("base"), Variant("demo/lora", lora="outputs/demo/lora")]


# ----------------------------------------------------------------------------------------------- generation
def test_variants_share_the_seed_and_get_scored(tiny_pipeline_dir, lora_dir, tmp_path):
    variants = [Variant("base"), Variant("dpo", lora=str(lora_dir)), Variant("g1", guidance=1.0)]
    comp = comparison(tiny_pipeline_dir, tmp_path, variants)
    gen = comp.generate("a red circle", 7, steps=STEPS, guidance=4.0)
    base, dpo, g1 = gen.samples
    assert [s.variant for s in gen.samples] == ["base", "dpo", "g1"] and gen.order == [0, 1, 2]
    assert (base.steps, base.guidance, g1.guidance) == (STEPS, 4.0, 1.0)
    # the base panel is exactly what the base model samples alone from that seed: same initial noise
    comp.model.set_adapters(None)
    alone = sample_all(comp.model, ["a red circle"], [7], steps=STEPS, guidance=4.0, progress=False)[0]
    torch.testing.assert_close(base.media, alone, rtol=0, atol=0)
    assert not torch.allclose(dpo.media, base.media, atol=1e-3)
    assert torch.equal(comp.generate("a red circle", 7, steps=STEPS, guidance=4.0).samples[1].media, dpo.media)
    for s in gen.samples:
        assert s.seconds > 0 and s.scores["oracle"] in (0.0, 1.0)
        assert s.scores["brightness"] == pytest.approx(float(s.media.mean()), abs=1e-6)
    assert comp.generate("a cat on a sofa", 7, steps=1).samples[0].scores["oracle"] is None  # not judgeable
    assert set(comp.generate("a red circle", 7, steps=1, rewards=["brightness"]).samples[0].scores) == {"brightness"}
    with pytest.raises(ConfigError, match="unknown reward 'hps'"):
        comp.generate("a red circle", 7, steps=1, rewards=["hps"])
    with pytest.raises(ConfigError, match="enter a prompt"):
        comp.generate("  ", 0)
    blind = comp.generate("a red circle", 7, steps=1, blind=True)
    assert sorted(blind.order) == [0, 1, 2]


def test_concurrent_users_get_their_own_results(tiny_pipeline_dir, lora_dir, tmp_path):
    comp = comparison(tiny_pipeline_dir, tmp_path, [Variant("base"), Variant("dpo", lora=str(lora_dir))])
    jobs = [("a red circle", 1), ("a blue square on the left", 2), ("a green triangle", 3), ("a red circle", 4)]
    alone = [comp.generate(p, s, steps=STEPS) for p, s in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: comp.generate(job[0], job[1], steps=STEPS), jobs))
    for a, b in zip(alone, together):
        assert (a.prompt, a.seed) == (b.prompt, b.seed)
        assert all(torch.equal(x.media, y.media) for x, y in zip(a.samples, b.samples))


def test_experts_variant_switches_per_interval_with_toggles(tiny_pipeline_dir, trained_experts, tmp_path):
    from visalign.experts import ExpertsView

    variants = [Variant("base"), Variant("experts", experts=str(trained_experts / "final"))]
    comp = comparison(tiny_pipeline_dir, tmp_path / "votes", variants)
    assert isinstance(comp.model, ExpertsView) and comp.experts.names == ["early", "late"]
    kw = dict(steps=STEPS, guidance=3.0)
    every = comp.generate("a red circle", 3, **kw)
    assert every.samples[1].experts == ["early", "late"] and every.samples[0].experts is None
    assert not torch.allclose(every.samples[1].media, every.samples[0].media, atol=1e-4)
    # both intervals toggled off: the experts panel is the base model, exactly
    off = comp.generate("a red circle", 3, experts=[], **kw)
    torch.testing.assert_close(off.samples[1].media, off.samples[0].media, rtol=0, atol=0)
    assert off.samples[1].experts == [] and comp.model.last_active == [None] * STEPS
    # one toggle: that expert only inside its interval, the base elsewhere
    late = comp.generate("a red circle", 3, experts=["late"], **kw)
    assert set(comp.model.last_active) == {None, "late"} and comp.model.last_active[-1] == "late"
    assert not torch.equal(late.samples[1].media, every.samples[1].media)
    assert torch.equal(comp.generate("a red circle", 3, **kw).samples[1].media, every.samples[1].media)  # reset
    with pytest.raises(ConfigError, match="unknown expert 'layout'"):
        comp.generate("a red circle", 3, experts=["layout"], **kw)
    row = comp.vote(late, "best", 1)[0]
    assert (row["chosen_variant"], row["chosen_experts"], "rejected_experts" in row) == ("experts", ["late"], False)


def test_video_variants(tiny_pipeline_dir, tmp_path):
    variants = [Variant("base"), Variant("g1", guidance=1.0)]
    comp = comparison(tiny_pipeline_dir, tmp_path / "votes", variants, name="wan", height=32, width=32, num_frames=5)
    gen = comp.generate("a red circle moving right", 0, steps=2)
    assert gen.samples[0].media.shape == (5, 3, 32, 32)
    assert set(gen.samples[0].scores) == {"oracle", "brightness"}
    row = comp.vote(gen, "best", 1)[0]
    assert row["chosen"].endswith(".mp4") and row["chosen_variant"] == "g1"
    assert load_preference_data(tmp_path / "votes")[0]["chosen"].shape == (5, 3, 32, 32)
    from apps.compare import _media_value  # what a video panel shows: an MP4 in the app's own folder

    assert Path(_media_value(gen.samples[0].media, tmp_path / "served" / "p0.mp4")).stat().st_size > 0
    from reward_models import build_random_reward

    with pytest.raises(ConfigError, match="wrap it: 'video"):
        Comparison(comp.model, variants, tmp_path / "v2", rewards={"clip": build_random_reward("clip", "tiny")})


# ----------------------------------------------------------------------------------------------- votes
def test_fifty_concurrent_votes_give_fifty_intact_rows(tmp_path):
    writer = PreferenceWriter(tmp_path)
    generations = [fake_generation(i) for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        written = list(pool.map(lambda g: record_vote(writer, g, "best", g.seed % 2, model="m", session=str(g.seed)),
                                generations))  # fmt: skip
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 50 and all(len(rows) == 1 for rows in written)
    rows = [json.loads(line) for line in lines]  # every line is whole JSON
    assert len({r["vote_id"] for r in rows}) == 50
    assert sorted(int(r["session"]) for r in rows) == list(range(50))
    by_seed = {g.seed: g for g in generations}
    for r in rows:
        g = by_seed[r["seed"]]
        winner = g.samples[r["seed"] % 2]
        assert r["chosen_variant"] == winner.variant and r["label"] == 1.0
        # the saved PNG is the winner's image (8-bit rounding), never another session's
        torch.testing.assert_close(load_image(tmp_path / r["chosen"]), winner.media, atol=1 / 255, rtol=0)
    assert not [p for p in (tmp_path / "media").iterdir() if p.name.startswith(".")]  # no temp files left
    assert len(load_preference_data(tmp_path)) == 50
    assert tally_votes(read_votes(tmp_path / "pairs.jsonl", "m"), ["v0", "v1"])["v0"]["wins"] == 25


def test_votes_train_diffusion_dpo(tiny_pipeline_dir, lora_dir, tmp_path):
    from trainers.base import Trainer
    from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig

    votes = tmp_path / "votes"
    comp = comparison(tiny_pipeline_dir, votes, [Variant("base"), Variant("dpo", lora=str(lora_dir))])
    for i, (kind, panel) in enumerate([("best", 0), ("best", 1), ("tie", None), ("bad", None), ("best", 1)]):
        comp.vote(comp.generate(["a red circle", "a blue square"][i % 2], i, steps=2), kind, panel, session="s")
    rows = read_votes(votes / "pairs.jsonl", comp.model_name)
    assert [r["label"] for r in rows] == [1.0, 1.0, 0.5, 0.5, 1.0]
    assert rows[1]["chosen_variant"] == "dpo" and rows[1]["rejected_variant"] == "base" and rows[1]["seed"] == 1
    table, n_votes = comp.tally()
    assert n_votes == 5 and table["dpo"]["wins"] == 2 and table["base"]["win_rate"] == pytest.approx(1.5 / 4)
    cfg = DiffusionDPOConfig(model=str(tiny_pipeline_dir("sd")), data=str(votes), output_dir=str(tmp_path / "run"),
                             max_steps=2, batch_size=2, learning_rate=1e-3, lora_rank=4, resolution=32,
                             report_to="none", progress=False, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    task = DiffusionDPO(cfg)
    assert len(task.encoded) == 3  # ties and "both bad" (label 0.5) are dropped by the trainer
    Trainer(task).train()
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()


# ----------------------------------------------------------------------------------------------- gallery
def test_gallery_reads_evaluate_reports(tiny_pipeline_dir, lora_dir, tmp_path):
    from visalign.evaluation import evaluate_variants

    model = load_model(tiny_pipeline_dir("sd"))
    model.load_lora(lora_dir, adapter_name="dpo")
    prompts = ["a red circle", "a blue square", "a green triangle"]
    out = tmp_path / "reports" / "eval1"
    evaluate_variants(model, {"base": None, "dpo": "dpo"}, prompts, [0, 1, 2], out, scorers={"bright": brightness},
                      steps=2)  # fmt: skip
    (tmp_path / "reports" / "other").mkdir()
    (tmp_path / "reports" / "other" / "report.json").write_text("{}")  # not an evaluate report
    assert find_reports(tmp_path / "reports") == ["eval1"]
    report = load_report(tmp_path / "reports", "eval1")
    assert [r[0] for r in report["rows"]] == ["base", "dpo"] and "reward/bright" in report["headers"]
    assert report["variants"] == ["base", "dpo"] and report["prompts"] == prompts and report["seeds"] == [0, 1, 2]
    assert [tuple(p.shape) for p in report["panels"]] == [(3, 32, 2 + 3 * 34)] * 2
    with pytest.raises(ConfigError, match="no evaluate report"):
        load_report(tmp_path / "reports", "../reports/eval1/../../..")


# ----------------------------------------------------------------------------------------------- the real app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs the system Chromium at /usr/bin/chromium")
def test_app_in_a_real_browser(tiny_pipeline_dir, lora_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from apps.compare import CHROMIUM_ARGS, PANELS_LOADED, build_app, serve

    votes = tmp_path / "votes"
    comp = comparison(tiny_pipeline_dir, votes, [Variant("base"), Variant("dpo", lora=str(lora_dir))],
                      model_name="tiny-sd")  # fmt: skip
    serve_dir = tmp_path / "served"
    from visalign.evaluation import evaluate_variants

    evaluate_variants(comp.model, {"base": None, "dpo": "compare1"}, ["a red circle", "a blue square"], [0, 1],
                      tmp_path / "reports" / "eval1", steps=2)  # fmt: skip
    app = build_app(comp, reports_dir=tmp_path / "reports", examples=["a red circle"], steps=STEPS, guidance=3.0,
                    serve_dir=serve_dir, hint="test hint")  # fmt: skip
    port = free_port()
    serve(app, port=port, block=False)
    url = f"http://127.0.0.1:{port}"
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        assert app.server_name == "127.0.0.1"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url, wait_until="load")
            page.locator("#prompt textarea").fill("a red circle on the left")
            page.locator("#generate").click()
            images = [page.locator(f"#panel-{p} img") for p in range(2)]
            for image in images:
                image.first.wait_for(state="visible", timeout=30_000)
            page.wait_for_function(PANELS_LOADED, timeout=30_000)
            sources = [image.first.get_attribute("src") for image in images]
            assert "Which is better" in page.locator("#status").inner_text()
            assert "dpo" in page.locator("#info-1").inner_text() and "oracle" in page.locator("#info-1").inner_text()
            page.locator("#vote-left").click()
            page.locator("#status").get_by_text("Recorded").wait_for(timeout=15_000)
            page.locator("#tally").get_by_text("1 vote").wait_for(timeout=15_000)
            tally_rows = page.locator("#tally tr").all_inner_texts()
            page.screenshot(path=str(artifacts / "compare.png"), full_page=True)
            page.get_by_role("tab", name="Gallery").click()  # the only report is preselected and shown
            page.locator("#report-rows img").nth(1).wait_for(state="visible", timeout=15_000)
            assert "fd_to_base" in page.locator("#report-table").inner_text()
            page.screenshot(path=str(artifacts / "compare-gallery.png"), full_page=True)
            browser.close()
        rows = [json.loads(line) for line in (votes / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == 1
        row = rows[0]
        assert (row["prompt"], row["label"], row["vote"], row["seed"]) == ("a red circle on the left", 1.0, "best", 0)
        assert (row["chosen_variant"], row["rejected_variant"], row["chosen_panel"]) == ("base", "dpo", 0)
        assert row["model"] == "tiny-sd" and row["session"] and row["chosen_steps"] == STEPS
        assert (votes / row["chosen"]).is_file() and (votes / row["rejected"]).is_file()
        base_row = next(r for r in tally_rows if r.split("\t")[0].strip() == "base")
        assert [c.strip() for c in base_row.split("\t")] == ["base", "1", "0", "0", "0", "100%"]
        # the panels' images come from the app's own folder; nothing else is served
        assert all(f"file={serve_dir.resolve()}" in src for src in sources)
        assert http_status(sources[0] if sources[0].startswith("http") else url + sources[0]) == 200
        for path in (votes / "pairs.jsonl", votes / row["chosen"], Path("/etc/hostname"), ROOT / "pyproject.toml"):
            assert http_status(f"{url}/gradio_api/file={path.resolve()}") == 403, path
    finally:
        app.close()
    assert threading.active_count() < 50


def test_expert_toggles_in_a_real_browser(tiny_pipeline_dir, trained_experts, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from apps.compare import CHROMIUM_ARGS, PANELS_LOADED, build_app, serve

    variants = [Variant("base"), Variant("experts", experts=str(trained_experts / "final"))]
    comp = comparison(tiny_pipeline_dir, tmp_path / "votes", variants)
    app = build_app(comp, steps=STEPS, guidance=3.0, serve_dir=tmp_path / "served")
    port = free_port()
    serve(app, port=port, block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}", wait_until="load")
            toggles = page.locator("#experts")
            assert "early · t 500–1000" in toggles.inner_text() and "late · t 0–500" in toggles.inner_text()
            toggles.get_by_label("early · t 500–1000").uncheck()
            page.locator("#prompt textarea").fill("a blue square")
            page.locator("#generate").click()
            page.locator("#info-1").get_by_text("experts on: late").wait_for(timeout=30_000)
            page.wait_for_function(PANELS_LOADED, timeout=30_000)
            page.screenshot(path=str(ROOT / "test-artifacts" / "compare-experts.png"), full_page=True)
            browser.close()
        assert comp.model.last_active[0] is None and comp.model.last_active[-1] == "late"
    finally:
        app.close()
