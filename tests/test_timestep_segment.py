"""Timestep-segment experts: switching per step, training per interval, export, skipping and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny.segment import PROMPTS, segment_args

from trainers.base import Trainer
from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from trainers.timestep_segment import TimestepSegment, TimestepSegmentConfig
from visalign.config import ConfigError
from visalign.experts import (
    Expert,
    ExpertsError,
    ExpertsView,
    Manifest,
    SegmentSwitcher,
    SwitchPlan,
    function_evaluations,
    load_experts,
    parse_interval,
    skip_indices,
    skipping,
)
from visalign.models import load_model


@pytest.fixture
def data(segment_data):
    return segment_data


@pytest.fixture
def trained(trained_experts):
    return trained_experts


def lora_layer(denoiser):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next(m for m in denoiser.modules() if isinstance(m, BaseTunerLayer))


def record_active(model):
    """A forward pre-hook that records the adapter the denoiser actually runs with (``None``: none)."""
    seen = []
    layer = lora_layer(model.denoiser)

    def hook(module, args, kwargs):
        seen.append(None if layer.disable_adapters else ",".join(layer.active_adapters))

    return seen, model.denoiser.register_forward_pre_hook(hook, with_kwargs=True)


def randomise(model, name):
    with torch.no_grad():
        for p in model.lora_parameters(name):
            p.copy_(0.3 * torch.randn_like(p))


# ----------------------------------------------------------------------------------------------- switching
@pytest.mark.parametrize("name, units, specs", [("sd", "timestep", ["600:1000", "0:300"]),
                                                ("sd3", "sigma", ["0.6:1", "0:0.3"])])  # fmt: skip
def test_active_adapter_at_each_step_matches_the_manifest(tiny_pipeline_dir, name, units, specs):
    model = load_model(tiny_pipeline_dir(name))
    torch.manual_seed(0)
    for adapter in ("early", "late"):
        model.add_lora(rank=2, adapter_name=adapter)
        randomise(model, adapter)
    bounds = [parse_interval(s, units) for s in specs]
    experts = [Expert("early", "early", *bounds[0]), Expert("late", "late", *bounds[1])]
    switcher = SegmentSwitcher(experts)
    seen, handle = record_active(model)
    try:
        out = model.sample(PROMPTS, steps=10, guidance=2.0, height=32, width=32, step_callback=switcher,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        handle.remove()
    t = [float(x) for x in out.timesteps]
    expected = ["early" if x >= bounds[0][0] else "late" if x < bounds[1][1] else None for x in t]
    assert switcher.active == expected == seen  # one forward per step (CFG is batched)
    assert {"early", "late", None} <= set(expected)  # every case happens: each expert and the gap (base)
    if name == "sd3":
        assert t[0] == 1000.0 and expected[0] == "early"  # the top interval holds t = T, where flow starts


def test_sampling_with_experts_switched_off_equals_the_base(tiny_pipeline_dir, trained):
    model = load_model(tiny_pipeline_dir("sd"))
    manifest = load_experts(model, trained / "final")
    view = ExpertsView(model, manifest, {"off": SwitchPlan(enabled=frozenset()),
                                         "late": SwitchPlan(enabled=frozenset({"late"})),
                                         "all": SwitchPlan()})  # fmt: skip
    kw = dict(steps=10, guidance=3.0, height=32, width=32, record_trajectory=True,
              latents=model.prepare_latents(2, 32, 32, None, torch.Generator().manual_seed(0)))  # fmt: skip
    view.set_adapters(None)
    base = view.sample(PROMPTS, **kw)
    view.set_adapters("off")
    off = view.sample(PROMPTS, **kw)
    assert view.last_active == [None] * 10 and torch.equal(off.pixels, base.pixels)
    view.set_adapters("late")
    late = view.sample(PROMPTS, **kw)
    first = view.last_active.index("late")  # the first step with t < 500
    assert float(late.timesteps[first]) < 500 <= float(late.timesteps[first - 1])
    # the late expert changes nothing before its interval, and something inside it
    assert torch.equal(late.trajectory[:, : first + 1], base.trajectory[:, : first + 1])
    assert not torch.allclose(late.trajectory[:, first + 1], base.trajectory[:, first + 1])
    view.set_adapters("all")
    both = view.sample(PROMPTS, **kw)
    assert view.last_active == ["early"] * first + ["late"] * (10 - first)
    assert not torch.equal(both.trajectory[:, 1], base.trajectory[:, 1])


# ----------------------------------------------------------------------------------------------- training
def test_training_writes_experts_and_each_equals_a_windowed_dpo_run(tiny_pipeline_dir, data, trained, tmp_path):
    manifest = Manifest.read(trained / "final" / "experts.json")
    assert [(e.name, e.t_min, e.t_max, e.data) for e in manifest.experts] == [
        ("early", 500.0, 1000.0, data[0]), ("late", 0.0, 500.0, data[1])]  # fmt: skip
    assert manifest.base_model == str(tiny_pipeline_dir("sd")) and manifest.extras["family"] == "sd"
    assert "timestep-segment" in (trained / "final" / "README.md").read_text()
    from safetensors.torch import load_file

    late = load_file(trained / "final" / "late" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in late.items() if "lora_B" in k)  # trained away from B = 0
    # the late expert is exactly a plain Diffusion-DPO run on its data with timesteps in [0, 500)
    values = segment_args(tiny_pipeline_dir("sd"), data, tmp_path / "plain")
    for key in ("intervals", "expert_names"):
        values.pop(key)
    values.update(data=data[1], timestep_min=0.0, timestep_max=500.0, cache_dir=str(trained.parent / "cache"))
    plain = DiffusionDPO(DiffusionDPOConfig(**values))
    Trainer(plain).train()
    plain_state = load_file(tmp_path / "plain" / "final" / "pytorch_lora_weights.safetensors")
    assert plain_state.keys() == late.keys() and all(torch.equal(plain_state[k], late[k]) for k in late)


def test_resume_trains_nothing_twice_and_equals_uninterrupted(tiny_pipeline_dir, data, trained, tmp_path,
                                                              monkeypatch):  # fmt: skip
    class Stop(Exception):
        pass

    def stop(self, step):
        if self.config.output_dir.endswith("expert-late") and step == 1:
            raise Stop

    values = segment_args(tiny_pipeline_dir("sd"), data, tmp_path / "run")
    monkeypatch.setattr(DiffusionDPO, "on_step_end", stop, raising=False)
    with pytest.raises(Stop):
        TimestepSegment(TimestepSegmentConfig(**values)).train()
    monkeypatch.undo()
    early = tmp_path / "run" / "expert-early" / "final" / "pytorch_lora_weights.safetensors"
    stamp = early.stat().st_mtime_ns
    TimestepSegment(TimestepSegmentConfig(**values, resume_from="latest")).train()
    assert early.stat().st_mtime_ns == stamp  # the finished expert was loaded, not trained again
    from safetensors.torch import load_file

    for name in ("early", "late"):
        a = load_file(trained / "final" / name / "pytorch_lora_weights.safetensors")
        b = load_file(tmp_path / "run" / "final" / name / "pytorch_lora_weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- export
def test_each_expert_loads_in_plain_diffusers_and_switches_the_same(tiny_pipeline_dir, trained):
    from diffusers import DiffusionPipeline

    from visalign.experts import DiffusersExpertsCallback

    manifest = Manifest.read(trained / "final")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sd"))
    pipe.set_progress_bar_config(disable=True)
    for e in manifest.experts:
        pipe.load_lora_weights(manifest.expert_dir(e), adapter_name=e.name)
    assert set(pipe.unet.peft_config) == {"early", "late"}
    model = load_model(tiny_pipeline_dir("sd"))
    view = ExpertsView(model, load_experts(model, manifest))
    noise = model.prepare_latents(2, 32, 32, None, torch.Generator().manual_seed(3))
    ours = view.sample(PROMPTS, steps=6, guidance=4.0, latents=noise, decode=False).latents
    switch = DiffusersExpertsCallback(manifest)
    switch.prepare(pipe, 6)
    theirs = pipe(PROMPTS, num_inference_steps=6, guidance_scale=4.0, latents=noise.clone(), output_type="latent",
                  callback_on_step_end=switch).images  # fmt: skip
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- skipping
def test_skip_indices_and_the_thinned_grid():
    assert skip_indices([900, 700, 500, 300, 100], skip_above=500, stride=2) == [0, 2, 3, 4]
    assert skip_indices([900, 700, 500, 300, 100], skip_above=1000, stride=3) == [0, 1, 2, 3, 4]
    assert skip_indices([981, 961, 941, 921, 901, 881], skip_above=0, stride=4) == [0, 4]
    with pytest.raises(ExpertsError, match="stride must be >= 1"):
        skip_indices([1, 0], 0, 0)


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_skipping_reproduces_the_sampler_at_stride_1_and_cuts_evaluations(tiny_pipeline_dir, name):
    model = load_model(tiny_pipeline_dir(name))
    noise = model.prepare_latents(2, 32, 32, None, torch.Generator().manual_seed(1))
    kw = dict(steps=10, guidance=2.0, height=32, width=32, decode=False)
    base = model.sample(PROMPTS, latents=noise, **kw)
    from visalign.experts import subsample_scheduler

    make = model.inference_scheduler
    model.inference_scheduler = lambda s, x, sde=None: subsample_scheduler(make(s, x, sde), list(range(s)))
    try:  # the thinned-grid schedulers with every step kept are the pipeline's sampler, bit for bit
        same = model.sample(PROMPTS, latents=noise, **kw)
    finally:
        del model.inference_scheduler
    assert torch.equal(same.latents, base.latents)
    with skipping(model, skip_above=500, stride=2):
        fast = model.sample(PROMPTS, latents=noise, **kw)
    kept = skip_indices(base.timesteps, 500, 2)
    assert fast.timesteps.tolist() == base.timesteps[kept].tolist() and len(kept) < 10
    assert function_evaluations(len(fast.timesteps), model, 2.0) == 2 * len(kept)
    assert torch.isfinite(fast.latents).all() and not torch.equal(fast.latents, base.latents)
    assert model.sample(PROMPTS, latents=noise, **kw).timesteps.tolist() == base.timesteps.tolist()  # restored


# ----------------------------------------------------------------------------------------------- commands
def test_generate_and_evaluate_with_experts(tiny_pipeline_dir, trained, tmp_path, capsys):
    from apps.cli import main

    common = ["--model", str(tiny_pipeline_dir("sd")), "--steps", "10", "--height", "32", "--width", "32"]
    rc = main(["generate", *common, "--prompts", "a red circle", "--out", str(tmp_path / "gen"), "--experts",
               str(trained / "final" / "experts.json"), "--skip_stride", "2"])  # fmt: skip
    assert rc == 0
    row = json.loads((tmp_path / "gen" / "metadata.jsonl").read_text().splitlines()[0])
    assert row["nfe"] == 2 * 8 and row["skip_stride"] == 2  # 10 DDIM steps, 5 at t >= 500 thinned to 3; CFG
    rc = main(
        [
            "evaluate",
            *common,
            "--prompts",
            "a red circle on the left",
            "--oracle",
            "--n",
            "2",
            "--out",
            str(tmp_path / "eval"),
            "--experts",
            str(trained / "final"),
            "--experts_alone",
            "--skip_stride",
            "2",
        ]
    )
    assert rc == 0 and "nfe" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["variants"]
    assert set(report) == {"base", "experts", "experts[early]", "experts[late]", "experts-skip2", "base-skip2"}
    assert report["base"]["nfe"] == report["experts"]["nfe"] == 20 and report["experts-skip2"]["nfe"] == 16
    assert "oracle/all/position_acc" in report["experts"]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    ({"intervals": ["400:1000", "0:500"]}, "overlap"),
    ({"intervals": ["500:500", "0:500"]}, "empty interval"),
    ({"intervals": ["500-1000", "0:500"]}, "must look like LOW:HIGH"),
    ({"intervals": ["500:1000", "0:1200"]}, r"leaves \[0, 1000\]"),
    ({"data": ["a", "b", "c"]}, "3 --data sources for 2 intervals"),
    ({"expert_names": ["same", "same"]}, "two experts are named 'same'"),
    ({"expert_names": ["default", "late"]}, "not usable as an adapter name"),
    ({"timestep_min": 100.0}, "not timestep_min"),
    ({"resume_from": "some/checkpoint"}, "--resume_from latest"),
    ({"expert_beta": [100.0]}, "--expert_beta needs 2 values > 0"),
    ({"expert_learning_rate": [1e-3, 0.0]}, "--expert_learning_rate needs 2 values > 0"),
])  # fmt: skip
def test_bad_config(tmp_path, data, change, message):
    with pytest.raises(ConfigError, match=message):
        TimestepSegmentConfig(**{**segment_args("m", data, tmp_path / "o"), **change})


def test_per_expert_beta_and_learning_rate(tiny_pipeline_dir, data, tmp_path):
    cfg = TimestepSegmentConfig(**segment_args(tiny_pipeline_dir("sd"), data, tmp_path / "o", beta=5000.0,
                                               expert_beta=[100.0, 1000.0], expert_max_steps=[3, 5]))  # fmt: skip
    task = TimestepSegment(cfg)
    runs = [task.expert_config(i, resume=False) for i in range(2)]
    assert [(r.beta, r.max_steps, r.learning_rate) for r in runs] == [(100.0, 3, 5e-2), (1000.0, 5, 5e-2)]
    assert [(r.timestep_min, r.timestep_max) for r in runs] == [(500.0, 1000.0), (0.0, 500.0)]


def test_sigma_intervals_need_a_flow_model(tiny_pipeline_dir, data, tmp_path):
    cfg = TimestepSegmentConfig(**segment_args(tiny_pipeline_dir("sd"), data, tmp_path / "o",
                                               intervals=["0.5:1", "0:0.5"], interval_units="sigma"))  # fmt: skip
    with pytest.raises(ConfigError, match="sigma intervals are for flow models"):
        TimestepSegment(cfg)


def edit_manifest(trained, tmp_path, **changes):
    folder = tmp_path / "experts"
    shutil.copytree(trained / "final", folder)
    data = json.loads((folder / "experts.json").read_text())
    for i, row in changes.pop("experts", {}).items():
        data["experts"][i].update(row)
    data.update(changes)
    (folder / "experts.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"experts": {0: {"t_min": 400}}}, "overlap"),
    ({"experts": {1: {"t_max": 0}}}, "empty interval"),
    ({"experts": {1: {"path": "nowhere"}}}, "names the adapter folder .*nowhere, which holds no"),
    ({"format": "something-else"}, "not a visalign experts manifest"),
    ({"experts": {0: {"t_min": "high"}}}, "must be numbers"),
])  # fmt: skip
def test_bad_manifest(trained, tmp_path, changes, message):
    with pytest.raises(ExpertsError, match=message):
        Manifest.read(edit_manifest(trained, tmp_path, **changes))


def test_missing_manifest_and_unloaded_adapter(tiny_pipeline_dir, trained, tmp_path):
    with pytest.raises(ExpertsError, match="experts manifest not found"):
        Manifest.read(tmp_path)
    model = load_model(tiny_pipeline_dir("sd"))
    view = ExpertsView(model, Manifest.read(trained / "final"))  # the experts were never loaded on this model
    with pytest.raises(ExpertsError, match=r"experts \['early', 'late'\] are not loaded on this model"):
        view.sample(PROMPTS, steps=2)
    with pytest.raises(ExpertsError, match="not among the experts"):
        ExpertsView(model, Manifest.read(trained / "final"), {"x": SwitchPlan(enabled=frozenset({"layout"}))})


@pytest.mark.parametrize("other, message", [("sd-other", "its weights differ"), ("sd3", "its model family differs")])
def test_experts_for_another_base_model(tiny_pipeline_dir, trained, tmp_path, other, message):
    from tiny import build_tiny_pipeline

    if other == "sd-other":  # same architecture, other weights
        path = tmp_path / "sd-other"
        build_tiny_pipeline("sd", seed=1).save_pretrained(path)
    else:
        path = tiny_pipeline_dir(other)
    model = load_model(path)
    with pytest.raises(ExpertsError, match=f"trained on .* is another base model: {message}"):
        load_experts(model, trained / "final")
    assert model.adapter_names == []  # nothing was loaded
