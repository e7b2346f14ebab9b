"""Diffusion-DPO / Flow-DPO / MaPO on every family at tiny size: loss at init, LoRA-only updates, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import VIDEO, train_moves_only_lora

from trainers.base import Trainer
from trainers.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig, sd15_pickapic, sdxl_pickapic
from trainers.mapo import MaPO, MaPOConfig
from visalign.config import ConfigError
from visalign.data import PreferenceWriter

FAMILIES = ["sd", "sdxl", "sd3", "flux", "wan", "cogvideox"]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    cache = {}

    def get(video: bool):
        if video not in cache:
            d = tmp_path_factory.mktemp("video-pairs" if video else "pairs")
            writer = PreferenceWriter(d)
            g = torch.Generator().manual_seed(0)
            shape = (5, 3, 32, 32) if video else (3, 32, 32)
            for i in range(4):
                writer.append(
                    ["a red circle", "a blue square"][i % 2],
                    torch.rand(shape, generator=g),
                    torch.rand(shape, generator=g),
                )
            cache[video] = d
        return cache[video]

    return get


def make_config(name, tmp_path, data, cls=DiffusionDPOConfig, **kw):
    values = dict(
        model=str(name),
        data=str(data),
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        learning_rate=1e-3,
        lora_rank=4,
        resolution=32,
        report_to="none",
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        lr_scheduler="constant",
    )
    values.update(kw)
    return cls(**values)


def frames(name):
    return {"num_frames": 5} if name in VIDEO else {}


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_at_init_is_log2_and_a_step_moves_only_lora(tiny_pipeline_dir, pair_data, tmp_path, name):
    cfg = make_config(tiny_pipeline_dir(name), tmp_path, pair_data(name in VIDEO), max_steps=1, **frames(name))
    task = DiffusionDPO(cfg)
    batch = task.collate([task.encoded[0], task.encoded[1]])
    torch.manual_seed(0)
    loss, metrics = task.loss(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference exactly
    assert metrics["rewards/margins"] == 0.0
    train_moves_only_lora(task)
    assert "base_model" in (tmp_path / "run" / "final" / "README.md").read_text()


@pytest.mark.parametrize("name", ["sd", "sd3", "wan"])
def test_resume_equals_uninterrupted(tiny_pipeline_dir, pair_data, tmp_path, name):
    data = pair_data(name in VIDEO)
    full = DiffusionDPO(make_config(tiny_pipeline_dir(name), tmp_path / "a", data, max_steps=4, **frames(name)))
    Trainer(full).train()

    class Stop(Exception):
        pass

    cut = DiffusionDPO(
        make_config(tiny_pipeline_dir(name), tmp_path / "b", data, max_steps=4, checkpoint_every=2, **frames(name))
    )

    def stop(step):
        if step == 2:
            raise Stop

    cut.on_step_end = stop
    with pytest.raises(Stop):
        Trainer(cut).train()
    resumed = DiffusionDPO(
        make_config(tiny_pipeline_dir(name), tmp_path / "b", data, max_steps=4, resume_from="latest", **frames(name))
    )
    Trainer(resumed).train()
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # each run writes its own wall time: the whole run 4 steps from step 1, the resumed one steps 3-4
    for run, first, steps in (("a", 1, 4), ("b", 3, 2)):
        timing = json.loads((tmp_path / run / "run" / "timing.json").read_text())
        assert (timing["first_step"], timing["steps"]) == (first, steps) and timing["train_seconds"] > 0
        assert timing["seconds_per_step"] == pytest.approx(timing["train_seconds"] / steps)


def test_ipo_and_mixed_losses_run(tiny_pipeline_dir, pair_data, tmp_path):
    beta = 10.0
    cfg = make_config(tiny_pipeline_dir("sd"), tmp_path, pair_data(False), loss="ipo", beta=beta)
    task = DiffusionDPO(cfg)
    loss, _ = task.loss(task.collate([task.encoded[0], task.encoded[1]]))
    assert loss.item() == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-5)  # (0 - 1/(2 beta))^2 at init
    mixed = DiffusionDPO(
        make_config(tiny_pipeline_dir("sd"), tmp_path / "m", pair_data(False), loss="sigmoid:1.0,bco_pair:0.5")
    )
    loss, metrics = mixed.loss(mixed.collate([mixed.encoded[0], mixed.encoded[1]]))
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * 2 * math.log(2), abs=1e-5)
    assert "loss/bco_pair" in metrics


@pytest.mark.parametrize("name", ["sdxl", "wan"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_pipeline_dir, pair_data, tmp_path, name):
    results = []
    for checkpointing in (False, True):
        cfg = make_config(
            tiny_pipeline_dir(name),
            tmp_path / str(checkpointing),
            pair_data(name in VIDEO),
            gradient_checkpointing=checkpointing,
            **frames(name),
        )
        task = DiffusionDPO(cfg)
        assert task.model.denoiser.is_gradient_checkpointing == checkpointing
        torch.manual_seed(1)
        for p in task.params:  # a LoRA away from zero, so every gradient path carries signal
            p.data.add_(0.05 * torch.randn_like(p))
        calls = []
        norm = [
            m
            for n, m in task.model.denoiser.named_modules()  # the last block Diffusers checkpoints: after
            if n.endswith("norm2") and ("resnets" in n or n.startswith("blocks."))
        ][-1]  # the LoRA layers
        norm.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(0)
        loss, _ = task.loss(task.collate([task.encoded[0], task.encoded[1]]))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in task.params], len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads0, grads1))
    assert calls1 > calls0  # the checkpointed blocks ran again in backward


def test_mapo_has_no_reference_forward(tiny_pipeline_dir, pair_data, tmp_path):
    task = MaPO(make_config(tiny_pipeline_dir("sd"), tmp_path, pair_data(False), cls=MaPOConfig))
    entered = []
    task.model.reference = lambda: entered.append(1)  # would break the loss if called
    batch = task.collate([task.encoded[0], task.encoded[1]])
    loss, metrics = task.loss(batch)
    assert not entered and torch.isfinite(loss) and "mapo/margin" in metrics
    Trainer(task).train()
    with pytest.raises(ConfigError, match="uses the 'mapo' loss"):
        make_config(tiny_pipeline_dir("sd"), tmp_path, pair_data(False), cls=MaPOConfig, loss="sigmoid")


def test_full_finetune_keeps_a_frozen_reference(tiny_pipeline_dir, pair_data, tmp_path):
    cfg = make_config(
        tiny_pipeline_dir("sd"),
        tmp_path,
        pair_data(False),
        full_finetune=True,
        offload_reference=True,
        max_steps=1,
        learning_rate=1e-4,
    )
    task = DiffusionDPO(cfg)
    before = {n: p.detach().clone() for n, p in task.model.denoiser.named_parameters()}
    loss, _ = task.loss(task.collate([task.encoded[0], task.encoded[1]]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    Trainer(task).train()
    changed = [n for n, p in task.model.denoiser.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    ref = task.model._reference
    assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())
    assert (tmp_path / "run" / "final" / "model_index.json").exists()


def test_timestep_window(tiny_pipeline_dir, pair_data, tmp_path):
    task = DiffusionDPO(
        make_config(tiny_pipeline_dir("sd"), tmp_path, pair_data(False), timestep_min=200, timestep_max=300)
    )
    t = task.sample_timesteps(256)
    assert (t >= 200).all() and (t < 300).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lora_rank": 0}, "lora_rank must be > 0"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -1.0}, "beta must be > 0"),
        ({"timestep_min": 500, "timestep_max": 100}, "timestep_min < timestep_max"),
        ({"loss": "nope"}, "available"),
    ],
)
def test_bad_config(tiny_pipeline_dir, pair_data, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path, pair_data(False), **bad))


def test_video_data_for_an_image_model(tiny_pipeline_dir, pair_data, tmp_path):
    with pytest.raises(ConfigError, match="holds videos but .* is a sd model"):
        DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path, pair_data(True)))


def test_paper_presets():
    sd15, sdxl = sd15_pickapic(), sdxl_pickapic()
    assert sd15.beta == sdxl.beta == 5000.0 and sd15.max_steps == 2000 and sdxl.max_steps == 200
    assert sd15.batch_size * sd15.gradient_accumulation_steps * 16 == 2048


def test_periodic_evaluation_with_the_oracle(tiny_pipeline_dir, pair_data, tmp_path):
    cfg = make_config(
        tiny_pipeline_dir("sd"),
        tmp_path,
        pair_data(False),
        max_steps=2,
        eval_every=1,
        eval_prompts="a red circle on the left",
        eval_samples=2,
        eval_steps=2,
        oracle=True,
    )
    results = Trainer(DiffusionDPO(cfg)).train()
    assert "oracle/all/object_rate" in results
    for step in (1, 2):
        assert (tmp_path / "run" / "eval" / f"step-{step:06d}" / "samples.png").exists()
    assert "oracle/all/object_rate" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_streaming_trains_and_resumes_exactly(tiny_pipeline_dir, tmp_path):
    """--streaming (a parquet read as a stream, encoded every step): runs, moves only the LoRA, and a run cut at
    step 2 and resumed (the stream replayed to its position) ends where the uninterrupted one does."""
    import io

    import datasets
    from PIL import Image

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy()
                        ).save(buf, format="PNG")  # fmt: skip
        return buf.getvalue()

    datasets.Dataset.from_dict({"caption": ["a red circle", "a blue square"] * 3, "jpg_0": [png(i) for i in range(6)],
                                "jpg_1": [png(10 + i) for i in range(6)], "label_0": [1.0, 0.0] * 3}).to_parquet(
        tmp_path / "p.parquet")  # fmt: skip
    kw = dict(streaming=True, max_steps=4, cache="disk")  # the disk cache is skipped when streaming

    class Stop(Exception):
        pass

    full = DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path / "a", tmp_path / "p.parquet", **kw))
    assert full.encoded is None and not (tmp_path / "a" / "cache").exists()
    Trainer(full).train()
    cut = DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path / "b", tmp_path / "p.parquet", checkpoint_every=2,
                                   **kw))  # fmt: skip
    cut.on_step_end = lambda step: (_ for _ in ()).throw(Stop()) if step == 2 else None
    with pytest.raises(Stop):
        Trainer(cut).train()
    resumed = DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path / "b", tmp_path / "p.parquet",
                                       resume_from="latest", **kw))  # fmt: skip
    Trainer(resumed).train()
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0
