"""Two real processes (gloo on a CPU; started by ``tiny.launch.launch``, or by ``accelerate launch`` as a user
does) train what one process with the whole batch trains.

Per-example draws (noise, timestep, flip, the VAE's posterior sample) are seeded by (seed, epoch, example index)
and the global batch of every step holds the same examples whatever the number of processes, so 2 processes x
batch 2 end at the weights of 1 process x batch 4, up to float reduction order; the cache shards that the two ranks
encode are disjoint and complete. (A resume under 2 processes after a rank died: tests/test_checkpoints.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import write_image_pairs
from tiny.launch import ROOT, accelerate_launch, cli_args, launch

from apps.cli import main

pytestmark = pytest.mark.xdist_group("processes")  # one worker runs the multi-process tests, one at a time


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_image_pairs(
        tmp_path_factory.mktemp("dist-pairs"), 8, ["a red circle", "a blue square", "a green triangle"]
    )


def run_args(model, data, out, cache, **kw) -> dict:
    values = dict(model=model, data=data, output_dir=out, cache_dir=cache, max_steps=3, batch_size=4,
                  lr_scheduler="constant", lora_rank=4, resolution=32, report_to="none",
                  progress=False, cache_shard_size=3, random_flip=True, beta=500.0, adam_epsilon=1.0,
                  learning_rate=0.05)  # fmt: skip
    return {**values, **kw}


def lora(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys() and a
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-4  # the runs trained
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= atol, f"{k}: max |diff| {diff:.3g}"


@pytest.mark.parametrize(
    "algo, extra", [("diffusion-dpo", {"loss": "sigmoid:1.0,aot_unpaired:1.0"}), ("mapo", {"beta": 0.1})]
)
def test_two_processes_train_what_one_process_trains(tiny_pipeline_dir, pairs, tmp_path, algo, extra):
    model = str(tiny_pipeline_dir("sd"))
    one = run_args(model, pairs, tmp_path / "one", tmp_path / "cache1", **extra)
    assert main(["train", algo, *cli_args(one)]) == 0
    two = run_args(model, pairs, tmp_path / "two", tmp_path / "cache2", batch_size=2, **extra)
    if algo == "mapo":  # as a user launches it: accelerate launch with the shipped two-process CPU config
        accelerate_launch(ROOT / "examples" / "accelerate" / "cpu2.yaml", ["train", algo, *cli_args(two)])
    else:
        launch(2, ["train", algo, *cli_args(two)])
    assert_same_weights(lora(tmp_path / "one"), lora(tmp_path / "two"))
    # the cache: rank 0 encoded shards 0 and 2, rank 1 shard 1 (8 pairs in shards of 3), and they hold what the
    # one-process build holds
    [entry1], [entry2] = (list((tmp_path / c).iterdir()) for c in ("cache1", "cache2"))
    assert entry1.name == entry2.name and json.loads((entry2 / "meta.json").read_text())["shards"] == 3
    for k in range(3):
        with safe_open(str(entry2 / f"shard-{k:05d}.safetensors"), "pt") as f:
            assert int(f.metadata()["rank"]) == k % 2
        a, b = (load_file(str(e / f"shard-{k:05d}.safetensors")) for e in (entry1, entry2))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


GATHER_SCRIPT = """
import json, sys, torch
from visalign import losses
from visalign.distributed import gather_with_grad, process_state

state = process_state()
g = torch.Generator().manual_seed(0)
r_c, r_r = torch.randn(8, generator=g), torch.randn(8, generator=g)  # the global batch, on every process
rows = slice(4 * state.process_index, 4 * state.process_index + 4)
mine_c, mine_r = r_c[rows].clone().requires_grad_(), r_r[rows].clone().requires_grad_()
objective = losses.build("aot_unpaired", beta=2.0)
loss = objective(chosen_logratios=gather_with_grad(mine_c), rejected_logratios=gather_with_grad(mine_r))[0].mean()
loss.backward()
out = {"loss": loss.item(), "grad_c": (mine_c.grad / state.num_processes).tolist()}
json.dump(out, open(sys.argv[1] + f"/rank{state.process_index}.json", "w"))
state.wait_for_everyone()  # as the trainer's end: no process leaves while gloo still talks to it
state.destroy_process_group()
"""


def test_a_batch_level_loss_sees_the_global_batch(tmp_path):
    """aot sorts log-ratios over the batch: on 2 processes x 4 rows, gathered with gradients, the loss and each
    row's gradient (after DDP's averaging) are the one-process ones; sorted per process they would not be."""
    from visalign import losses

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    launch(2, [str(tmp_path)], script=script)
    g = torch.Generator().manual_seed(0)
    r_c, r_r = torch.randn(8, generator=g).requires_grad_(), torch.randn(8, generator=g)
    objective = losses.build("aot_unpaired", beta=2.0)
    loss = objective(chosen_logratios=r_c, rejected_logratios=r_r)[0].mean()
    loss.backward()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["loss"] == pytest.approx(loss.item(), abs=1e-6) == ranks[1]["loss"]
    torch.testing.assert_close(torch.tensor(ranks[0]["grad_c"] + ranks[1]["grad_c"]), r_c.grad, rtol=1e-5, atol=1e-7)
    local = objective(chosen_logratios=r_c[:4], rejected_logratios=r_r[:4])[0].mean()
    assert abs(local.item() - loss.item()) > 1e-3  # the per-process loss would differ


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist-prompts") / "prompts.txt"
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square"]
    path.write_text("".join(f"a {c} {s}\n" for c in colours for s in shapes))
    return path


GRPO_VALUES = dict(reward="stats(stat=brightness)", max_steps=2, batch_size=4, group_size=2, steps=3, guidance=3.0,
                   resolution=32, lora_rank=4, lora_alpha=4.0, learning_rate=2.0, adam_epsilon=1.0,
                   lr_scheduler="constant", advantage_std="batch", timestep_selection="window", sde_window=2,
                   sde_window_range=3, report_to="none", progress=False)  # fmt: skip


@pytest.mark.parametrize("algo", ["grpo", "drl"])
def test_online_rl_on_two_processes_trains_what_one_process_trains(tiny_pipeline_dir, prompts, tmp_path, algo):
    """Rollout samples seeded by (seed, epoch, prompt, member), rewards gathered before the advantages (batch std
    over every process), the SDE window the same on every process: 2 x 2 prompts = 1 x 4 prompts."""
    values = {**GRPO_VALUES, "model": tiny_pipeline_dir("sd"), "prompts": prompts}
    if algo == "drl":
        del values["reward"]
        values.update(real_data="toyworld", encoder=ROOT / "assets" / "toyworld" / "toy-clip", disc_samples=8,
                      disc_steps=20, disc_batch_size=8)  # fmt: skip
    assert main(["train", algo, *cli_args({**values, "output_dir": tmp_path / "one"})]) == 0
    launch(2, ["train", algo, *cli_args({**values, "output_dir": tmp_path / "two", "batch_size": 2})])
    assert_same_weights(lora(tmp_path / "one"), lora(tmp_path / "two"), atol=1e-5)
