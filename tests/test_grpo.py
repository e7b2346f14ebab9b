"""GRPO on every family at tiny size: the porting checks, LoRA-only updates, timestep selection, CFG and noise
options, invalid rewards, a remote reward that times out, exact resume, and the reward-hacking alarm."""

from __future__ import annotations

import math
import time

import pytest
import torch
from tiny import ONLINE_PROMPTS, VIDEO, build_tiny_pipeline, tiny_model, train_moves_only_lora
from tiny.rewards import Brightness

from reward_models import RewardError, RewardOutput, register_reward
from reward_models.base import RewardSpec
from reward_models.remote import RemoteReward
from reward_models.serving import RewardServer
from trainers.base import Trainer, TrainingError
from trainers.grpo import (
    GRPO,
    PRESETS,
    GRPOConfig,
    dance_grpo_flux_hps,
    flow_grpo_fast_sd3,
    flow_grpo_sd3_pickscore,
)
from visalign.advantages import clip_advantages, group_advantages
from visalign.config import ConfigError
from visalign.metrics import brightness
from visalign.models import FAMILIES

FAMILIES_UNDER_TEST = ["sd", "sdxl", "sd3", "flux", "wan", "cogvideox"]


class Faulty(Brightness):
    """Sample 0 scores NaN, sample 1 is flagged invalid."""

    def score_batch(self, media, prompts):
        scores = brightness(media)
        scores[0] = math.nan
        valid = torch.ones_like(scores, dtype=torch.bool)
        valid[1] = False
        return RewardOutput(scores, valid=valid)


@pytest.fixture(autouse=True, scope="module")
def test_rewards():
    """Registered for this module only, so the reward contract test (which covers every registry entry) never
    sees them."""
    from reward_models.registry import _REGISTRY

    register_reward(RewardSpec("test-brightness", ("image", "video"), needs_prompt=False), lambda: Brightness(),
                    replace=True)  # fmt: skip
    register_reward(RewardSpec("test-darkness", ("image", "video"), needs_prompt=False), lambda: Brightness(-1.0),
                    replace=True)  # fmt: skip
    yield
    _REGISTRY.pop("test-brightness", None)
    _REGISTRY.pop("test-darkness", None)


def make(name, tmp_path, prompt_file, reward=None, **kw):
    values = dict(model=f"tiny-{name}", reward="test-brightness", prompts=prompt_file,
                  output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, group_size=2, steps=3, guidance=3.0,
                  resolution=32, lora_rank=4, lora_alpha=4.0, learning_rate=1e-2, report_to="none", progress=False,
                  lr_scheduler="constant", shuffle_samples=False,
                  num_frames=5 if name in VIDEO else None)  # fmt: skip
    values.update(kw)
    cfg = GRPOConfig(**values)
    return GRPO(cfg, model=tiny_model(name), reward=reward or Brightness())


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_porting_checks_first_ratio_and_lora_only_update(tmp_path, prompt_file, name):
    task = make(name, tmp_path, prompt_file, beta_kl=0.04)
    checks = task.porting_checks([0])
    assert checks["ode_max_abs_diff"] < 1e-5  # noise 0 == the first-order ODE on the same grid
    assert checks["logprob_max_abs_diff"] == 0.0 and checks["ratio_max_abs_dev"] == 0.0  # bit-exact in fp32
    loss, metrics = task.loss([0, 1])  # one inner epoch, one update: every micro-batch sees the rollout's weights
    assert metrics["ratio"] == 1.0 and metrics["clipfrac"] == 0.0 and metrics["kl"] == 0.0  # LoRA B = 0
    ro, rows, slot = task.queue[0]
    assert loss.item() == pytest.approx(-float(ro.advantages[rows].mean()), abs=1e-7)  # -A rho at rho = 1
    task.queue.clear()
    train_moves_only_lora(task)  # loss() took no step: the weights are still the initial ones


def test_bf16_rollout_log_probs_are_those_of_the_kept_samples(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file)
    task.model = FAMILIES["sd3"](build_tiny_pipeline("sd3"), dtype=torch.bfloat16)
    task.params = task.model.add_lora(rank=4)
    task.text = type(task.text)(task.model, None, True)
    ro = task.sample_rollout([0, 1], torch.Generator().manual_seed(0))
    assert ro.trajectory.dtype == torch.bfloat16 and ro.log_probs.dtype == torch.float32
    assert task.porting_checks([0, 1])["logprob_max_abs_diff"] == 0.0  # the rollout scored the rounded sample


def test_advantages_and_kl_are_exact(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, group_size=3, adv_clip_max=1.0, beta_kl=0.5)
    ro = task.rollout([0, 1])
    expected = clip_advantages(group_advantages(ro.rewards, ro.prompt_ids, std="group"), 1.0)
    assert torch.equal(ro.advantages, expected) and ro.advantages.abs().max() <= 1.0
    with torch.no_grad():  # a non-zero LoRA: policy and reference now differ
        for p in task.params:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(6)
    with_kl, m = task.item_loss(ro, rows, 0)
    task.config.beta_kl = 0.0
    without, _ = task.item_loss(ro, rows, 0)
    # flow_grpo's KL: mean((mu - mu_ref)^2) / (2 s^2) with s = a sqrt(sigma / (1 - sigma)), sigmas[1] for sigma = 1
    mu, mu_ref = task.recompute(ro, rows, 0).mean, task.recompute(ro, rows, 0, reference=True).mean
    sched = task.model.sde_schedule(ro.scheduler, 0)
    assert float(sched["sigma"]) == 1.0
    s = 0.7 * math.sqrt(1.0 / (1 - float(sched["sigma_max"])))
    expected_kl = float(((mu - mu_ref) ** 2).flatten(1).mean(1).mean().detach()) / (2 * s**2)
    assert m["kl"] == pytest.approx(expected_kl, rel=1e-4) and m["kl"] > 1e-4
    assert (with_kl - without).item() == pytest.approx(0.5 * m["kl"], rel=1e-3)


def test_one_update_raises_the_log_probs_of_better_than_average_samples(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, group_size=8, beta_kl=0.0)
    ro = task.rollout([0, 1])
    rows = torch.arange(16)

    def total_log_prob():
        with torch.no_grad():
            return sum(task.recompute(ro, rows, j).log_prob for j in range(ro.train_steps.shape[1]))

    before = total_log_prob()
    opt = torch.optim.AdamW(task.params, lr=1e-3)
    while task.queue:
        loss, _ = task.loss(None)
        (loss / task.config.gradient_accumulation_steps).backward()
    opt.step()
    change = total_log_prob() - before
    assert float((ro.advantages * change).sum()) > 0  # the policy-gradient direction
    assert float(torch.corrcoef(torch.stack([change, ro.advantages]))[0, 1]) > 0.3


def test_timestep_selection_modes(tmp_path, prompt_file):
    full = make("sd3", tmp_path / "a", prompt_file, steps=5)
    ro = full.rollout([0])
    assert torch.equal(ro.train_steps, torch.arange(4).expand(2, 4))  # Flow-GRPO: all but the last
    assert full.config.gradient_accumulation_steps == 4 and len(full.queue) == 4
    rand = make("sd3", tmp_path / "b", prompt_file, steps=5, timestep_selection="random", timestep_fraction=0.6,
                group_size=8, batch_size=1)  # fmt: skip
    steps = rand.rollout([0]).train_steps
    assert steps.shape == (8, 3) and (steps.diff(dim=1) > 0).all() and len({tuple(s) for s in steps.tolist()}) > 1
    window = make("sd3", tmp_path / "c", prompt_file, steps=6, timestep_selection="window", sde_window=2)
    ro = window.rollout([0])
    start = int(ro.train_steps[0, 0])
    assert 0 <= start <= 1 and torch.equal(ro.train_steps, torch.arange(start, start + 2).expand(2, 2))
    inside = torch.zeros(6, dtype=torch.bool)
    inside[start : start + 2] = True
    assert (ro.log_probs[:, ~inside] == 0).all() and (ro.log_probs[:, inside] != 0).all()  # ODE outside
    assert window.porting_checks([0])["logprob_max_abs_diff"] == 0.0
    rand_loss, m = rand.loss(None)  # samples at different steps in one micro-batch
    assert torch.isfinite(rand_loss) and m["ratio"] == pytest.approx(1.0, abs=1e-5)


def test_cfg_noise_sharing_and_text_cache(tmp_path, prompt_file):
    task = make("sd", tmp_path, prompt_file, same_noise_per_group=True, group_size=3)
    calls = []
    encode = task.model.encode_prompt
    task.model.encode_prompt = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    ro = task.rollout([0, 1])
    x0 = ro.trajectory[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[1], x0[2]) and not torch.equal(x0[0], x0[3])
    assert not torch.equal(ro.trajectory[0, -1], ro.trajectory[1, -1])  # the SDE noise still differs
    task.rollout([1, 2])
    assert sorted(p for p in sum(calls, []) if p) == sorted(ONLINE_PROMPTS)  # each prompt (and its CFG branch) once
    n_calls = len(calls)
    task.rollout([2, 0])
    assert len(calls) == n_calls
    rows = torch.arange(6)
    matched = task.recompute(ro, rows, 0).log_prob
    task.guidance = 1.0  # training without the rollout's CFG would score other transitions
    assert not torch.allclose(task.recompute(ro, rows, 0).log_prob, matched)


def test_inner_epochs_minibatches_and_derived_accumulation(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, batch_size=2, group_size=4, inner_epochs=2, samples_per_update=4,
                train_batch_size=2, max_steps=4, shuffle_samples=True)  # fmt: skip
    cfg = task.config
    assert cfg.updates_per_rollout == 4 and cfg.gradient_accumulation_steps == 2 * 2
    task.rollout([0, 1])
    assert len(task.queue) == 2 * 2 * 2 * 2  # epochs x updates x micro-batches x trained steps
    seen = [tuple(rows.tolist()) for _, rows, slot in list(task.queue)[:8] if slot == 0]
    assert sorted(sum(seen, ())) == list(range(8))  # one inner epoch covers every sample once
    results = Trainer(task).train()
    assert results == {} and task.micro == 16 and task.rollouts == 1
    with pytest.raises(ConfigError, match="derives gradient_accumulation_steps"):
        make("sd3", tmp_path, prompt_file, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="multiple of the 4 optimizer steps"):
        make("sd3", tmp_path, prompt_file, inner_epochs=4, max_steps=2)
    with pytest.raises(ConfigError, match="samples_per_update"):
        make("sd3", tmp_path, prompt_file, samples_per_update=3)


def test_invalid_and_nan_rewards_are_excluded_and_counted(tmp_path, prompt_file):
    task = make("sd3", tmp_path, prompt_file, reward=Faulty(), group_size=3)
    loss, metrics = task.loss([0, 1])
    ro = task.queue[0][0]
    assert metrics["rollout/invalid"] == 2.0 and ro.valid.tolist() == [False, False, True, True, True, True]
    assert (ro.advantages[:2] == 0).all()
    # the rest of prompt 0's group is a singleton: no baseline, advantage 0; prompt 1's group is normal
    assert ro.advantages[2] == 0 and ro.advantages[3:].abs().sum() > 0
    for p in task.params:
        p.grad = None
    bad, _ = task.item_loss(ro, torch.tensor([0, 1]), 0)
    bad.backward()
    assert all(p.grad is None for p in task.params)  # never trained on: not even a zero gradient


class TiedSecondGroup(Brightness):
    """Brightness, except that the second prompt's group (rows 3-5 with group_size 3) ties at 0.5."""

    def score_batch(self, media, prompts):
        scores = brightness(media)
        scores[3:] = 0.5
        return scores


def test_skip_flat_groups_trains_the_same_policy_gradient_on_fewer_samples(tmp_path, prompt_file):
    def grads(task, ro, micro_batches):
        for p in task.params:
            p.grad = None
        for rows in micro_batches:  # the accumulation the loop does: each micro-batch's loss over their count
            loss, _ = task.item_loss(ro, rows, 0)
            (loss / len(micro_batches)).backward()
        return torch.cat([p.grad.flatten() for p in task.params])

    task = make("sd3", tmp_path, prompt_file, reward=TiedSecondGroup(), group_size=3, beta_kl=0.0)
    with torch.no_grad():  # a non-zero LoRA, so the policy gradient reaches every LoRA weight
        for p in task.params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    ro = task.rollout([0, 1])
    assert ro.metrics["rollout/flat_groups"] == 0.5 and ro.metrics["rollout/trained_samples"] == 6.0
    assert (ro.advantages[3:] == 0).all() and ro.trained.all()
    g_all = grads(task, ro, [torch.arange(6)])
    assert g_all.abs().max() > 1e-5  # tolerances below are 1e-4 relative, 1e-9 absolute
    task.config.skip_flat_groups = True
    task.score(ro)
    assert ro.trained.tolist() == [True] * 3 + [False] * 3 and ro.sample_weight == 2.0
    assert ro.metrics["rollout/trained_samples"] == 3.0
    g_skip = grads(task, ro, [torch.arange(6)])
    # the flat group's terms were zero: the same gradient, as a mean over the 3 samples trained instead of all 6
    torch.testing.assert_close(g_skip, 2 * g_all, rtol=1e-4, atol=1e-9)
    # split unevenly into micro-batches (as over processes), each samples' weight is still 1 / (samples trained)
    g_split = grads(task, ro, [torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])])
    torch.testing.assert_close(g_split, g_skip, rtol=1e-4, atol=1e-9)
    with pytest.raises(ConfigError, match="advantage_history"):
        make("sd3", tmp_path, prompt_file, skip_flat_groups=True, advantage_history=16)


def test_remote_reward_timeout_fails_the_step_clearly(tmp_path, prompt_file):
    class Slow(Brightness):
        def score_batch(self, media, prompts):
            time.sleep(3.0)
            return brightness(media)

    with RewardServer(Slow()) as server:
        task = make("sd3", tmp_path, prompt_file, reward=RemoteReward(server.url, timeout=0.3, encoding="f32"))
        start = time.monotonic()
        with pytest.raises(TrainingError, match=r"reward failed on rollout 1 .*no response .* within 0.3 s"):
            Trainer(task).train()
        assert time.monotonic() - start < 2.5
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_equals_uninterrupted(tmp_path, prompt_file):
    kw = dict(
        max_steps=4,
        inner_epochs=2,
        samples_per_update=2,
        train_batch_size=2,
        group_size=2,
        batch_size=2,
        ema_decay=0.5,
        advantage_history=4,
        shuffle_samples=True,
        beta_kl=0.1,
    )  # 4 updates per rollout
    full = make("sd3", tmp_path / "a", prompt_file, max_steps=8, **{k: v for k, v in kw.items() if k != "max_steps"})
    Trainer(full).train()

    class Stop(Exception):
        pass

    cut = make("sd3", tmp_path / "b", prompt_file, checkpoint_every=4, **{**kw, "max_steps": 8})

    def stop(step):
        if step == 4:
            raise Stop

    cut.on_step_end = stop
    with pytest.raises(Stop):
        Trainer(cut).train()
    resumed = make("sd3", tmp_path / "b", prompt_file, resume_from="latest", **{**kw, "max_steps": 8})
    Trainer(resumed).train()
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(k.startswith("grpo/ema/") for k in a) and any(k.startswith("grpo/tracker/") for k in a)


def test_monitor_raises_the_alarm_on_a_hackable_reward(tmp_path, prompt_file):
    # the training reward pays for brightness; the gold metric is darkness: hacking by construction. On 4 evaluation
    # samples of the tiny model the first steps are noisy: seeds 1, 2, 3 brighten from step 1, seed 0 from step 4
    task = make("sd", tmp_path, prompt_file, max_steps=6, eval_every=1, eval_prompts=prompt_file, eval_samples=4,
                eval_steps=3, eval_reward="test-darkness", early_stop=True, monitor_patience=2,
                monitor_min_gold_drop=1e-3, learning_rate=3e-2, group_size=4, beta_kl=0.0, seed=2)  # fmt: skip
    Trainer(task).train()
    history = task.monitor.history()
    assert task.monitor.alarm and task.monitor.steps[-1] < 6  # stopped early
    assert len(set(task.monitor.steps)) == len(task.monitor.steps)  # the stopping step is evaluated once
    assert task.monitor.steps[0] == 0 and (tmp_path / "run" / "eval" / "step-000000" / "report.json").exists()
    assert history[-1]["reward"] > history[0]["reward"] and history[-1]["gold"] < history[0]["gold"]
    assert (tmp_path / "run" / "monitor" / "monitor.png").exists()
    assert "drift/saturation" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_presets_and_bad_configs(prompt_file):
    sd3 = flow_grpo_sd3_pickscore(prompts=prompt_file)
    assert (sd3.steps, sd3.group_size, sd3.guidance, sd3.beta_kl, sd3.noise_level) == (10, 24, 4.5, 0.01, 0.7)
    assert sd3.trained_steps == 9 and sd3.resolution == 512
    fast = flow_grpo_fast_sd3(prompts=prompt_file)
    assert fast.trained_steps == 2 and fast.beta_kl == 0.0 and fast.clip_range == 1e-5
    flux = dance_grpo_flux_hps(prompts=prompt_file)
    assert flux.sampler == "dance-sde" and flux.trained_steps == round(0.6 * 16)
    assert set(PRESETS) >= {"flow-grpo-sd3-pickscore", "dance-grpo-flux-hps", "toy-flow-clip"}
    for bad, message in [({"sampler": "euler"}, "sampler must be"), ({"timestep_selection": "last"}, "one of"),
                         ({"steps": 1}, "steps >= 2"), ({"advantage_std": "none", "advantage_history": 3}, "z-scores"),
                         ({"prompts": None}, "prompts is required"), ({"clip_range": 0.0}, "clip_range")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            GRPOConfig(model="m", reward="r", **{"prompts": prompt_file, **bad})


def test_wrong_sampler_kind_and_the_command(tmp_path, prompt_file, tiny_pipeline_dir):
    with pytest.raises(ConfigError, match="needs ddim"):
        make("sd", tmp_path, prompt_file, sampler="flow-sde")
    from apps.train import main, resolve

    assert resolve("drl")[0].__name__ == "DRLConfig"
    out = tmp_path / "cli"
    main(["grpo", "--model", str(tiny_pipeline_dir("flux")), "--reward", "test-brightness", "--prompts", prompt_file,
          "--resolution", "32", "--steps", "2", "--group_size", "2", "--batch_size", "2", "--lora_rank", "2",
          "--max_steps", "1", "--report_to", "none", "--no_progress", "--output_dir", str(out)])  # fmt: skip
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists() and (out / "config.yaml").exists()
    with pytest.raises(RewardError):  # a reward failing outside a rollout is the reward's own error
        RemoteReward("http://127.0.0.1:9", timeout=0.2)


def test_eval_seed_picks_the_evaluation_seeds(tmp_path, prompt_file):
    kw = dict(eval_prompts=prompt_file, eval_samples=2, eval_steps=2)
    figures = {}
    for name, seed in (("default", None), ("same", 0), ("other", 7)):
        task = make("sd", tmp_path / name, prompt_file, eval_seed=seed, **kw)
        figures[name] = task.evaluate_at(0, tmp_path / name / "eval", ema=False)["reward/test-brightness"]
    assert figures["same"] == figures["default"] != figures["other"]


def test_rollouts_never_start_from_an_evaluated_videos_noise():
    from trainers.grpo import sample_seed

    # evaluation samples video i from seed (eval_seed + i); a rollout sample's seed is a hash of (seed, epoch,
    # prompt, member), the same on whichever process samples it, and never a small integer
    evaluated = set(range(0, 100_000))
    used = {sample_seed(s, e, p, j) for s in (0, 1, 42) for e in range(5) for p in range(100) for j in range(8)}
    assert not used & evaluated and len(used) == 3 * 5 * 100 * 8
