"""benchmarks/grpo_reference.py, the Flow-GRPO training loop bench_grpo.py times visalign against: at tiny size its
rollout log-probs are those its update recomputes (ratio 1 before the first step) and its update trains the LoRA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny import build_tiny_pipeline
from tiny.launch import ROOT

from visalign.models import FAMILIES


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("grpo_reference", ROOT / "benchmarks" / "grpo_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_loop_scores_its_own_samples_and_trains_the_lora(reference):
    model = FAMILIES["sd3"](build_tiny_pipeline("sd3"))
    params = model.add_lora(rank=4, alpha=4.0)
    pipe, prompts = model.pipe, ["a red circle", "a red circle", "a blue square", "a blue square"]
    ro = reference.rollout(pipe, prompts, steps=3, guidance=4.5, resolution=32, noise_level=0.7,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert ro["latents"].shape[:2] == (4, 4) and ro["log_probs"].shape == (4, 3) and ro["pixels"].shape[0] == 4
    embeds, pooled = ro["embeds"], ro["pooled"]
    sigmas, x, x_next = ro["sigmas"], ro["latents"][:, 1], ro["latents"][:, 2]
    with torch.no_grad():  # the update's recomputation at step 1 with the rollout's weights: ratio exactly 1
        v = reference.guided(pipe.transformer, x, (sigmas[1] * 1000).expand(4), embeds, pooled, 4.5)
        again = reference.flow_sde_step(v, x, sigmas[1], sigmas[2], noise_level=0.7, sigma_max=sigmas[1],
                                        prev_sample=x_next)  # fmt: skip
    torch.testing.assert_close(again.log_prob, ro["log_probs"][:, 1], rtol=0, atol=1e-6)
    frozen = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    reference.update(model, optimizer, ro, torch.tensor([0.1, 0.9, 0.2, 0.6]), group=2, guidance=4.5,
                     noise_level=0.7, beta_kl=0.04, clip_range=1e-4, train_batch=2)  # fmt: skip
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    after = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
