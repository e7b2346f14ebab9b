"""Flow-NRG reward guidance: it raises the reward on every family, weight 0 and the off switch change nothing, the
window and the history, bad input, and the generate / evaluate options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import tiny_model
from tiny.rewards import Brightness

from visalign.config import ConfigError
from visalign.guidance import GuidedView, RewardGuidance
from visalign.metrics import brightness

PROMPTS = ["a red circle", "a blue square"]


def sample(model, hook=None, steps=4, **kw):
    frames = 5 if model.is_video else None
    latents = model.prepare_latents(len(PROMPTS), 32, 32, frames, torch.Generator().manual_seed(3))
    return model.sample(PROMPTS, steps=steps, guidance=2.0, height=32, width=32, latents=latents,
                        num_frames=frames, output_hook=hook, **kw).pixels  # fmt: skip


@pytest.mark.parametrize("name", ["sd", "sd3", "cogvideox", "wan"])
def test_guidance_raises_the_reward_and_weight_zero_changes_nothing(name):
    model = tiny_model(name)
    base = sample(model)
    same = sample(model, RewardGuidance([("b", Brightness(differentiable=True), 0.0)], PROMPTS))
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    w = 1000.0 if name == "wan" else 200.0  # Wan's per-channel latent statistics scale the gradient down
    guide = RewardGuidance([("b", Brightness(differentiable=True), w)], PROMPTS)
    brighter = sample(model, guide)
    assert (brightness(brighter) > brightness(base) + 1e-3).all(), (brightness(base), brightness(brighter))
    darker = sample(model, RewardGuidance([("b", Brightness(-1.0, differentiable=True), w)], PROMPTS))
    assert (brightness(darker) < brightness(base) - 1e-3).all()
    guided_steps = [h["index"] for h in guide.history]
    # CogVideoX: v-prediction with zero terminal SNR, so the first step (abar_T = 0) has nothing to steer
    assert guided_steps == ([1, 2, 3] if name == "cogvideox" else [0, 1, 2, 3])
    assert all(math.isfinite(h["b"]) for h in guide.history)


def test_window_and_two_weighted_rewards():
    model = tiny_model("sd3")
    guide = RewardGuidance([("up", Brightness(differentiable=True), 100.0),
                            ("down", Brightness(-1.0, differentiable=True), 100.0)], PROMPTS, end=0.5)  # fmt: skip
    cancelled = sample(model, guide)
    torch.testing.assert_close(cancelled, sample(model), rtol=0, atol=1e-5)  # equal and opposite weights cancel
    assert [h["index"] for h in guide.history] == [0, 1]  # the first half of 4 steps only
    assert guide.history[0]["up"] == pytest.approx(-guide.history[0]["down"])


def test_guided_view_switches_like_an_adapter():
    model = tiny_model("sd")
    view = GuidedView(model, [("b", Brightness(differentiable=True), 200.0)])
    view.set_adapters("nrg")
    guided = sample(view)
    assert len(view.last.history) == 4
    view.set_adapters(None)
    torch.testing.assert_close(sample(view), sample(model), rtol=0, atol=0)
    view.set_adapters("nrg")
    torch.testing.assert_close(sample(view), guided, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(ConfigError, match="'b' is not"):
        RewardGuidance([("b", Brightness(), 1.0)], PROMPTS)  # not differentiable
    with pytest.raises(ConfigError, match="at least one reward"):
        RewardGuidance([], PROMPTS)
    with pytest.raises(ConfigError, match="window"):
        RewardGuidance([("b", Brightness(differentiable=True), 1.0)], PROMPTS, start=0.5, end=0.5)
    with pytest.raises(ConfigError, match="one --guide_weight for all rewards or one per reward"):
        from apps.generate import guidance_rewards

        guidance_rewards(["oracle"], [1.0, 2.0])

    class NaNReward(Brightness):
        def score_batch(self, media, prompts):
            return brightness(media) * float("nan")

    model = tiny_model("sd")
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 0"):
        sample(model, RewardGuidance([("nan", NaNReward(differentiable=True), 1.0)], PROMPTS))
    with pytest.raises(ValueError, match="deterministic"):
        model.sample(PROMPTS, steps=2, height=32, width=32, sde="ddim", output_hook=lambda *a: a[-1])


def test_generate_and_evaluate_with_reward_guidance(tiny_pipeline_dir, tmp_path, capsys):
    from apps.cli import main

    clip = "clip(model=assets/toyworld/toy-clip)"
    model = str(tiny_pipeline_dir("sd"))
    assert main(["generate", "--model", model, "--prompts", "a red circle", "--out", str(tmp_path / "gen"), "--steps",
                 "2", "--height", "32", "--width", "32", "--guide", clip, "--guide_weight", "5"]) == 0  # fmt: skip
    row = json.loads((tmp_path / "gen" / "metadata.jsonl").read_text().splitlines()[0])
    assert (row["guide"], row["guide_weight"], row["guide_end"]) == ([clip], [5.0], 1.0)
    assert main(["evaluate", "--model", model, "--prompts", "a red circle", "--n", "2", "--steps", "2", "--height",
                 "32", "--width", "32", "--reward", clip, "--guide", clip, "--guide_weight", "50",
                 "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    base, nrg = report["variants"]["base"], report["variants"]["nrg"]
    assert nrg[f"reward/{clip}"] > base[f"reward/{clip}"]  # guided by the reward it is scored with
    assert main(["evaluate", "--model", model, "--prompts", "x", "--guide", clip, "--experts", "e", "--out", "o"]) == 2
    assert "pass --guide or --experts, not both" in capsys.readouterr().err
