"""Checkpoints that can be trusted: a manifest written last, `latest` skipping damaged ones, no pickled code on
load, a failed write (a full disk) leaving the previous checkpoint intact, and faults under two real processes
(a rank killed mid-checkpoint, a rank that raises mid-step) that stop the run quickly and resume exactly."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer_loop import Regression, config
from tiny import write_image_pairs
from tiny.launch import ROOT, cli_args, launch, torchrun

from trainers.base import Trainer, TrainingError, rng_state, set_rng_state
from visalign import checkpoints

pytestmark = pytest.mark.xdist_group("processes")  # one worker runs the multi-process tests, one at a time


def ckpt(root, step: int) -> Path:
    return Path(root) / "checkpoints" / f"step-{step:06d}"


def interrupted_run(out, stop_at=6, **kw):
    """8 planned steps, a checkpoint every 2, stopped after the one at ``stop_at``."""
    task = Regression(config(out, max_steps=8, checkpoint_every=2, keep_checkpoints=3, **kw), stop_at=stop_at, n=20)
    with pytest.raises(KeyboardInterrupt):
        Trainer(task).train()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    task = Regression(config(tmp_path_factory.mktemp("full"), max_steps=8), n=20)
    Trainer(task).train()
    assert float(task.w.detach()) != 0.0
    return task


def test_the_manifest_lists_every_file_and_no_file_needs_pickle(tmp_path):
    interrupted_run(tmp_path, stop_at=2)
    folder = ckpt(tmp_path, 2)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(manifest) == on_disk and {"trainable.safetensors", "optimizer.pt", "rng-0.safetensors"} <= on_disk
    for name, want in manifest.items():
        assert (folder / name).stat().st_size == want["size"] and checkpoints.sha256(folder / name) == want["sha256"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    for name in ("optimizer.pt", "lr_scheduler.pt"):  # raises on anything but tensors, numbers and containers
        torch.load(folder / name, weights_only=True)
    checkpoints.verify(folder)


def test_rng_states_round_trip_exactly_without_pickle(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    checkpoints.save_rng(rng_state(), tmp_path / "rng.safetensors")
    want = random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.randn(3).tolist()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(checkpoints.load_rng(tmp_path / "rng.safetensors"))
    got = random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.randn(3).tolist()
    assert got == want


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": ("trainable.safetensors", truncate, "trainable.safetensors is damaged: .* bytes"),
    "a flipped byte": ("optimizer.pt", flip_a_byte, "optimizer.pt is damaged: its SHA-256"),
    "a missing file": ("rng-0.safetensors", Path.unlink, "rng-0.safetensors is missing"),
    "no manifest": ("manifest.json", Path.unlink, "no manifest.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_latest_skips_a_damaged_checkpoint_and_resumes_exactly(tmp_path, uninterrupted, capsys, damage):
    interrupted_run(tmp_path)
    name, harm, reason = DAMAGE[damage]
    harm(ckpt(tmp_path, 6) / name)
    capsys.readouterr()
    resumed = Regression(config(tmp_path, max_steps=8, checkpoint_every=2, resume_from="latest"), n=20)
    Trainer(resumed).train()
    out = capsys.readouterr().out
    assert "skipping step-000006" in out and f"resuming from {ckpt(tmp_path, 4)}" in out
    assert re.search(reason, out), out
    assert torch.equal(resumed.w, uninterrupted.w) and torch.equal(resumed.b, uninterrupted.b)


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    interrupted_run(tmp_path, stop_at=2)
    name, harm, reason = DAMAGE[damage]
    harm(ckpt(tmp_path, 2) / name)
    task = Regression(config(tmp_path, max_steps=8, resume_from=str(ckpt(tmp_path, 2))), n=20)
    with pytest.raises(TrainingError, match=f"cannot resume from .*{reason}"):
        Trainer(task).train()
    with pytest.raises(TrainingError, match="holds no complete checkpoint .*skipped step-000002"):
        Trainer(Regression(config(tmp_path, max_steps=8, resume_from="latest"), n=20)).train()


def test_a_checkpoint_of_the_pickled_format_is_refused_with_the_reason(tmp_path):
    interrupted_run(tmp_path, stop_at=2)
    folder = ckpt(tmp_path, 2)
    (folder / "manifest.json").unlink()
    (folder / "rng-0.safetensors").rename(folder / "rng-0.pt")
    task = Regression(config(tmp_path, max_steps=8, resume_from=str(folder)), n=20)
    with pytest.raises(TrainingError, match="earlier visalign, without a manifest.json and with pickled RNG"):
        Trainer(task).train()


class Payload:
    """Unpickling this runs a shell command (what a tampered checkpoint could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["optimizer.pt", "lr_scheduler.pt"])
def test_a_pickled_payload_is_not_run_on_resume(tmp_path, name):
    interrupted_run(tmp_path, stop_at=2)
    folder, marker = ckpt(tmp_path, 2), tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, folder / name)
    checkpoints.write_manifest(folder)  # the manifest matches: integrity alone would not stop it
    task = Regression(config(tmp_path, max_steps=8, resume_from="latest"), n=20)
    with pytest.raises(TrainingError, match=f"{name} cannot be loaded safely"):
        Trainer(task).train()
    assert not marker.exists()


@pytest.mark.parametrize("writer, target", [("torch.save", "optimizer.pt"),
                                            ("safetensors.torch.save_file", "trainable.safetensors"),
                                            ("safetensors.torch.save_file", "rng-0.safetensors")])  # fmt: skip
def test_a_full_disk_mid_checkpoint_leaves_the_previous_one_intact(tmp_path, uninterrupted, monkeypatch, writer,
                                                                   target):  # fmt: skip
    module_name, attr = writer.rsplit(".", 1)
    module = __import__(module_name, fromlist=[attr])
    real = getattr(module, attr)

    def full_disk(obj, path, *args, **kwargs):
        if f"step-{4:06d}" in str(path) and Path(path).name == target:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, attr, full_disk)
    task = Regression(config(tmp_path, max_steps=8, checkpoint_every=2, keep_checkpoints=1), n=20)
    with pytest.raises(TrainingError, match=r"No space left on device.*previous checkpoint .*step-000002 is intact"):
        Trainer(task).train()
    monkeypatch.setattr(module, attr, real)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]  # no .tmp left
    checkpoints.verify(ckpt(tmp_path, 2))
    resumed = Regression(config(tmp_path, max_steps=8, checkpoint_every=2, resume_from="latest"), n=20)
    Trainer(resumed).train()
    assert torch.equal(resumed.w, uninterrupted.w) and torch.equal(resumed.b, uninterrupted.b)


# ----------------------------------------------------------------- two real processes (torchrun, gloo on a CPU)
FAULT_SCRIPT = """
import os, signal, sys, time
from trainers import base
from visalign import checkpoints

mode, at = os.environ["FAULT_MODE"], int(os.environ["FAULT_AT_STEP"])
rank = int(os.environ["RANK"])


def stamp():  # when the fault happens, for the test to time how long the other rank takes to stop
    open(os.environ["FAULT_STAMP"], "w").write(repr(time.time()))

if mode == "kill-in-checkpoint":  # rank 1 dies right after writing its part of checkpoint step `at`
    real_save_rng = checkpoints.save_rng

    def save_rng(state, path):
        real_save_rng(state, path)
        if rank == 1 and f"step-{at:06d}" in str(path):
            stamp()
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.save_rng = save_rng
elif mode == "raise-mid-step":  # rank 1 raises while the others average gradients of step `at`
    real_sync = base.Trainer._sync_gradients

    def sync(self, *args, **kwargs):
        if rank == 1 and self.step + 1 == at:
            stamp()
            raise RuntimeError(f"injected fault in rank 1 at step {at}")
        return real_sync(self, *args, **kwargs)

    base.Trainer._sync_gradients = sync
from apps.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_image_pairs(tmp_path_factory.mktemp("ckpt-pairs"), 8, ["a red circle", "a blue square"])


def dpo_args(model, data, out, cache, **kw) -> list[str]:
    values = dict(model=model, data=data, output_dir=out, cache_dir=cache, max_steps=4, batch_size=2,
                  checkpoint_every=2, lr_scheduler="constant", lora_rank=4, resolution=32, report_to="none",
                  progress=False, beta=500.0, adam_epsilon=1.0, learning_rate=0.05)  # fmt: skip
    return ["train", "diffusion-dpo", *cli_args({**values, **kw})]


def final_lora(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def two_process_full(tiny_pipeline_dir, pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-full")
    launch(2, dpo_args(tiny_pipeline_dir("sd"), pairs, root / "out", root / "cache"))
    return final_lora(root / "out")


@pytest.mark.parametrize("mode, at, says", [
    ("kill-in-checkpoint", 4, "Signal 9 (SIGKILL)"),
    pytest.param("raise-mid-step", 3, "injected fault in rank 1 at step 3", marks=pytest.mark.slow),
])  # fmt: skip (a rank that raises stops the run as a killed one does: the kill case runs by default)
def test_a_failed_rank_stops_the_run_quickly_and_latest_resumes_exactly(tiny_pipeline_dir, pairs, tmp_path,
                                                                       two_process_full, mode, at, says):  # fmt: skip
    model, out, cache = tiny_pipeline_dir("sd"), tmp_path / "out", tmp_path / "cache"
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    env = {"FAULT_MODE": mode, "FAULT_AT_STEP": str(at), "FAULT_STAMP": str(tmp_path / "t"), "PYTHONPATH": str(ROOT)}
    with pytest.raises(AssertionError, match="exited") as failed:
        torchrun(2, dpo_args(model, pairs, out, cache), script=script, timeout=120, env=env)
    elapsed = time.time() - float((tmp_path / "t").read_text())
    assert elapsed < 20, f"the other rank took {elapsed:.0f} s to stop"  # not gloo's 30-minute timeout
    assert says in str(failed.value) and "rank      : 1" in str(failed.value)  # torchrun names the failed rank
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000002"]
    checkpoints.verify(out / "checkpoints" / "step-000002")
    if mode != "kill-in-checkpoint":
        return  # resuming after a raise is the same as after a kill (one launcher run less in the default suite)
    launch(2, dpo_args(model, pairs, out, cache, resume_from="latest"))
    resumed = final_lora(out)
    assert resumed.keys() == two_process_full.keys()
    assert all(torch.equal(resumed[k], two_process_full[k]) for k in resumed)
