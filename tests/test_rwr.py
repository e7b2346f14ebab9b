"""Flow-RWR at tiny size: the exact weighted regression, LoRA-only updates on image and video families, the
direction of one update, invalid samples, exact resume, and bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import VIDEO, tiny_model, train_moves_only_lora
from tiny.rewards import Brightness

from reward_models import RewardOutput
from trainers.base import Trainer
from trainers.rwr import RWR, RWRConfig
from visalign.config import ConfigError
from visalign.metrics import brightness
from visalign.models import index_cond


def make(name, tmp_path, prompt_file, reward=None, **kw):
    values = dict(model=f"tiny-{name}", prompts=prompt_file, reward="brightness", output_dir=str(tmp_path / "run"),
                  max_steps=1, batch_size=2, group_size=4, steps=3, guidance=3.0, resolution=32, lora_rank=4,
                  lora_alpha=4.0, learning_rate=1e-2, report_to="none", progress=False, lr_scheduler="constant",
                  shuffle_samples=False, num_frames=5 if name in VIDEO else None)  # fmt: skip
    values.update(kw)
    return RWR(RWRConfig(**values), model=tiny_model(name), reward=reward or Brightness())


def test_the_loss_is_the_softmax_weighted_error_of_each_group(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, temperature=0.5)
    ro = task.rollout([0, 1])
    assert len(task.queue) == 1 and task.config.gradient_accumulation_steps == 1
    _, rows, _ = task.queue.popleft()
    assert rows.tolist() == list(range(8))  # whole groups, in order
    torch.manual_seed(7)
    loss, metrics = task.item_loss(ro, rows, 0)
    torch.manual_seed(7)
    x0 = ro.clean
    assert x0.shape == ro.trajectory[:, -1].shape and not torch.equal(x0, ro.trajectory[:, -1])
    noise, t = torch.randn_like(x0), task.model.sample_timesteps(8)
    with torch.no_grad():
        errors = task.model.denoising_error(x0, noise, t, index_cond(ro.cond, rows), ro.uncond, 3.0).view(2, 4)
    weights = torch.softmax(ro.advantages.view(2, 4) / 0.5, dim=1)
    assert loss.item() == pytest.approx(float((weights * errors).sum(1).mean()), rel=1e-5)
    assert metrics["rwr/max_weight"] == pytest.approx(float(weights.amax(1).mean()), rel=1e-5)
    assert torch.allclose(ro.advantages.view(2, 4).mean(1), torch.zeros(2), atol=1e-5)  # per-group normalised


@pytest.mark.parametrize("name", ["sd", "sd3", "wan", "cogvideox"])
def test_a_step_moves_only_the_lora(tmp_path, prompt_file, name):
    task = make(name, tmp_path, prompt_file)
    train_moves_only_lora(task)


def test_one_update_fits_the_heavily_weighted_samples_better(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, batch_size=1, group_size=8, temperature=0.3)
    ro = task.rollout([0])
    rows = torch.arange(8)
    torch.manual_seed(3)
    x0 = ro.clean.repeat(4, 1, 1, 1)
    noise, t = torch.randn_like(x0), task.model.sample_timesteps(32)
    cond, uncond = index_cond(ro.cond, rows.repeat(4)), index_cond(ro.uncond, rows.repeat(4))

    def errors():
        with torch.no_grad():
            return task.model.denoising_error(x0, noise, t, cond, uncond, 3.0).view(4, 8).mean(0)

    before = errors()
    opt = torch.optim.AdamW(task.params, lr=3e-3)
    loss, _ = task.loss(None)
    loss.backward()
    opt.step()
    drop = before - errors()
    weights = torch.softmax(ro.advantages / 0.3, dim=0)
    assert float(torch.corrcoef(torch.stack([drop, weights]))[0, 1]) > 0.3  # the best samples gain the most


def test_the_anchor_adds_the_distance_to_the_base_predictions(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, beta_kl=2.0)
    ro = task.rollout([0, 1])
    _, rows, _ = task.queue.popleft()
    torch.manual_seed(5)
    loss0, metrics = task.item_loss(ro, rows, 0)
    assert metrics["rwr/anchor"] == 0.0  # LoRA B = 0: the policy is the base
    with torch.no_grad():
        for p in task.params:
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(5)
    loss1, metrics = task.item_loss(ro, rows, 0)
    task.config.beta_kl = 0.0
    torch.manual_seed(5)
    plain, _ = task.item_loss(ro, rows, 0)
    assert metrics["rwr/anchor"] > 0
    assert loss1.item() == pytest.approx(plain.item() + 2.0 * metrics["rwr/anchor"], rel=1e-5)


class HalfInvalid(Brightness):
    """Sample 0 scores NaN; samples 4-7 (the whole second group) are flagged invalid."""

    def score_batch(self, media, prompts):
        scores = brightness(media)
        scores[0] = math.nan
        valid = torch.ones_like(scores, dtype=torch.bool)
        valid[4:] = False
        return RewardOutput(scores, valid=valid)


def test_invalid_samples_weigh_nothing_and_invalid_groups_are_skipped(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, reward=HalfInvalid())
    ro = task.rollout([0, 1])
    assert ro.metrics["rollout/invalid"] == 5.0
    _, rows, _ = task.queue.popleft()
    torch.manual_seed(0)
    loss, metrics = task.item_loss(ro, rows, 0)
    torch.manual_seed(0)
    x0 = ro.clean[:4]  # only the first group is left; its sample 0 gets weight 0
    noise, t = torch.randn_like(x0), task.model.sample_timesteps(4)
    with torch.no_grad():
        rows = torch.arange(4)
        e = task.model.denoising_error(x0, noise, t, index_cond(ro.cond, rows), index_cond(ro.uncond, rows), 3.0)
    w = torch.softmax(ro.advantages[1:4], dim=0)
    assert loss.item() == pytest.approx(float((w * e[1:]).sum()), rel=1e-5)


def test_resume_equals_uninterrupted(tmp_path, prompt_file):
    kw = dict(inner_epochs=2, samples_per_update=4, train_batch_size=4, shuffle_samples=True)  # 4 steps per rollout
    full = make("sd3", tmp_path / "a", prompt_file, max_steps=8, **kw)
    Trainer(full).train()

    class Stop(Exception):
        pass

    cut = make("sd3", tmp_path / "b", prompt_file, max_steps=8, checkpoint_every=4, **kw)

    def stop(step):
        if step == 4:
            raise Stop

    cut.on_step_end = stop
    with pytest.raises(Stop):
        Trainer(cut).train()
    resumed = make("sd3", tmp_path / "b", prompt_file, max_steps=8, resume_from="latest", **kw)
    Trainer(resumed).train()
    a, b = full.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"train_batch_size": 2}, "multiple of group_size"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"rwr_scores": "rank"}, "rwr_scores must be"),
        ({"skip_flat_groups": True}, "regresses on a tied group"),
    ],
)
def test_bad_config(prompt_file, bad, message):
    with pytest.raises(ConfigError, match=message):
        RWRConfig(model="m", prompts=prompt_file, reward="brightness", batch_size=2, group_size=4, **bad)
