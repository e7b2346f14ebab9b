"""examples/shapes_world/plot_grpo.py reads a GRPO run's evaluation reports and TensorBoard logs."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image
from tiny.launch import ROOT


@pytest.fixture(scope="module")
def plot_grpo():
    spec = importlib.util.spec_from_file_location("plot_grpo", ROOT / "examples" / "shapes_world" / "plot_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root, strict):
    from torch.utils.tensorboard import SummaryWriter

    for step, acc in strict.items():
        results = {"oracle/held_in/strict_acc": acc, "oracle/held_out/strict_acc": acc / 2,
                   "oracle/square/shape_acc": 0.25}  # fmt: skip
        (root / "eval" / f"step-{step:06d}").mkdir(parents=True)
        (root / "eval" / f"step-{step:06d}" / "report.json").write_text(json.dumps({"step": step, "results": results}))
    writer = SummaryWriter(str(root / "logs" / "grpo"))
    for step in range(1, 21):
        writer.add_scalar("reward/mean", 0.8 + step / 100, step)
        writer.add_scalar("kl", step / 1000, step)
    writer.close()
    return root


def test_reads_reports_and_logs_and_writes_the_png(plot_grpo, tmp_path):
    run = fake_run(tmp_path / "run", {0: 0.5, 10: 0.6, 20: 0.7})
    assert plot_grpo.evaluations(run) == {"step": [0, 10, 20], "held_in": [50.0, 60.0, 70.0],
                                          "held_out": [25.0, 30.0, 35.0], "squares": [25.0] * 3}  # fmt: skip
    logged = plot_grpo.scalars(run, "reward/mean", "kl", "missing")
    assert set(logged) == {"reward/mean", "kl"} and logged["kl"][0] == list(range(1, 21))
    assert logged["reward/mean"][1][-1] == pytest.approx(1.0)
    assert plot_grpo.smooth([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    out = tmp_path / "curve.png"
    assert plot_grpo.main([str(out), f"cosine={run}"]) == 0
    assert Image.open(out).size[0] > 1000
    with pytest.raises(SystemExit, match="no eval/step"):
        plot_grpo.main([str(tmp_path / "x.png"), str(tmp_path)])


def test_seeds_given_together_are_drawn_as_mean_and_band(plot_grpo, tmp_path):
    runs = [fake_run(tmp_path / f"seed{i}", {0: 0.5, 10: 0.5 + i / 10, 20: 0.6 + i / 10}) for i in range(3)]
    series = [(ev["step"], ev["held_in"]) for ev in map(plot_grpo.evaluations, runs)]
    steps, mean, low, high = plot_grpo.across(series, "evaluations")
    assert steps == [0, 10, 20] and low == [50.0, 50.0, 60.0] and high == [50.0, 70.0, 80.0]
    assert mean == pytest.approx([50.0, 60.0, 70.0])
    assert plot_grpo.across([([0, 10], [1.0, 2.0]), ([10, 20], [4.0, 5.0])], "x")[:2] == ([10], [3.0])
    with pytest.raises(SystemExit, match="share no step"):
        plot_grpo.across([([0], [1.0]), ([5], [2.0])], "evaluations")
    out = tmp_path / "seeds.png"
    assert plot_grpo.main([str(out), "3 seeds=" + ",".join(map(str, runs)), str(runs[0])]) == 0
    assert Image.open(out).size[0] > 1000
