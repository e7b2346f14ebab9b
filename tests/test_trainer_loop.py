"""The shared loop on an analytic task: it learns, resumes exactly, accumulates, stops on NaN, logs."""

from __future__ import annotations

import os

import pytest
import torch

from trainers.base import TrainConfig, Trainer, TrainingError, batch_order
from visalign.config import ConfigError


class Regression:
    """y = 3x + 1; the loss draws noise from the global RNG so that RNG restore is tested too."""

    def __init__(self, config: TrainConfig, noise: float = 0.01, nan_at: int | None = None, stop_at=None, n=64):
        self.config = config
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.b = torch.nn.Parameter(torch.zeros(()))
        self.noise, self.nan_at, self.stop_at = noise, nan_at, stop_at
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, generator=g)
        self.y = 3 * self.x + 1
        self.calls = 0
        self.exported = None

    def trainable_parameters(self):
        return [self.w, self.b]

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def collate(self, rows):
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def loss(self, batch):
        x, y = batch
        self.calls += 1
        pred = self.w * x + self.b + self.noise * torch.randn_like(x)
        loss = (pred - y).pow(2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"w": self.w.detach()}

    def state_dict(self):
        return {"w": self.w.detach().clone(), "b": self.b.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
            self.b.copy_(state["b"])

    def on_step_end(self, step):
        if self.stop_at == step:
            raise KeyboardInterrupt

    def evaluate(self, step, out_dir):
        return {"abs_err_w": abs(self.w.item() - 3.0)}

    def export(self, out_dir, results):
        self.exported = (out_dir, results)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        batch_size=4,
        learning_rate=0.1,
        report_to="none",
        progress=False,
        lr_scheduler="cosine",
        warmup_steps=1,
    )
    return TrainConfig(**{**base, **kw})


def test_learns_and_exports(tmp_path):
    task = Regression(config(tmp_path, max_steps=150, lr_scheduler="constant"))
    results = Trainer(task).train()
    assert abs(float(task.w) - 3) < 0.1 and abs(float(task.b) - 1) < 0.1
    assert results["abs_err_w"] < 0.1 and task.exported[1] == results
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "step-000150").is_dir()


def test_resume_equals_uninterrupted(tmp_path):
    full = Regression(config(tmp_path / "a", max_steps=6), n=20)  # 5 batches per epoch: crosses an epoch
    Trainer(full).train()
    cut = Regression(config(tmp_path / "b", max_steps=6, checkpoint_every=3), stop_at=3, n=20)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cut).train()
    resumed = Regression(config(tmp_path / "b", max_steps=6, resume_from="latest"), n=20)
    Trainer(resumed).train()
    assert torch.equal(resumed.w, full.w) and torch.equal(resumed.b, full.b)
    assert float(full.w) != 0.0


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    big = Regression(config(tmp_path / "a", batch_size=4), noise=0.0)
    Trainer(big).train()
    acc = Regression(config(tmp_path / "b", batch_size=2, gradient_accumulation_steps=2), noise=0.0)
    Trainer(acc).train()
    torch.testing.assert_close(acc.w, big.w)
    torch.testing.assert_close(acc.b, big.b)


def test_nan_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    task = Regression(config(tmp_path, checkpoint_every=2), nan_at=5)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 5, micro-batch 0 .*step-000004"):
        Trainer(task).train()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # complete ones only, no temporary folder left
    assert (tmp_path / "checkpoints" / "step-000004" / "trainer_state.json").exists()


def test_keeps_only_recent_checkpoints(tmp_path):
    Trainer(Regression(config(tmp_path, checkpoint_every=1, keep_checkpoints=2))).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005", "step-000006"]


def test_tensorboard_logs(tmp_path):
    Trainer(Regression(config(tmp_path, report_to="tensorboard"))).train()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_batch_order_is_a_seeded_sharded_permutation():
    a = batch_order(10, 2, seed=0, epoch=0, rank=0, world=2)
    b = batch_order(10, 2, seed=0, epoch=0, rank=1, world=2)
    assert len(a) == len(b) == 2 and not set(sum(a, [])) & set(sum(b, []))
    assert a == batch_order(10, 2, seed=0, epoch=0, rank=0, world=2)
    assert a != batch_order(10, 2, seed=0, epoch=1, rank=0, world=2)
    # world-size invariance: the global batch of every step holds the same examples; together the ranks cover
    # the epoch once (12 examples, 3 processes x 2 = 1 process x 6), the shards disjoint
    one = batch_order(12, 6, seed=3, epoch=1, rank=0, world=1)
    three = [batch_order(12, 2, seed=3, epoch=1, rank=r, world=3) for r in range(3)]
    for step, batch in enumerate(one):
        assert sum((three[r][step] for r in range(3)), []) == batch
    assert sorted(i for r in three for b in r for i in b) == list(range(12))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ],
)
def test_config_validation(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **bad)


def test_dataset_smaller_than_a_batch(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        Trainer(Regression(config(tmp_path, batch_size=8), n=4))


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match="holds no checkpoint"):
        Trainer(Regression(config(tmp_path, resume_from="latest"))).train()


def test_mixed_precision_follows_accelerate_unless_set(tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` (or its config file) reaches the run through the environment;
    an explicit ``--mixed_precision`` still wins."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert Trainer(Regression(config(tmp_path / "a"))).accelerator.mixed_precision == "bf16"
    assert Trainer(Regression(config(tmp_path / "b", mixed_precision="no"))).accelerator.mixed_precision == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert Trainer(Regression(config(tmp_path / "c"))).accelerator.mixed_precision == "no"


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharding_config_on_one_process_trains_unsharded(tmp_path, monkeypatch, flag):
    """An FSDP or DeepSpeed config is taken off the environment (accelerate forms a plain group; visalign shards:
    tests/test_sharding.py); with a single process there is nothing to shard over, and the run says so."""
    from visalign import sharding

    monkeypatch.setattr(sharding, "_launch", None)
    monkeypatch.setenv(flag, "true")
    trainer = Trainer(Regression(config(tmp_path)))
    assert trainer.sharding.strategy in ("full_shard", "shard_grad_op") and not trainer.sharded
    assert flag not in os.environ and trainer.accelerator.distributed_type == "NO"
    monkeypatch.setattr(sharding, "_launch", None)
