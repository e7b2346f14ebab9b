"""Offline, CPU-only test harness. Tiny real pipelines of every family are built in code (tests/tiny/)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _short_stream_shutdown_pause():
    """``datasets`` pauses 5 s each time a streamed parquet's iteration ends (a guard for Arrow's reader threads,
    which have all finished by then); the streaming tests end many short streams, so they pause 0.5 s."""
    import datasets

    saved = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.5
    yield
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = saved


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """``tiny_pipeline_dir(name) -> Path``: a saved tiny pipeline folder, built once per session."""
    from tiny import build_tiny_pipeline

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            build_tiny_pipeline(name).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    """A prompt file of ``tiny.ONLINE_PROMPTS`` for the online trainers (GRPO, RWR)."""
    from tiny import ONLINE_PROMPTS

    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(ONLINE_PROMPTS) + "\n")
    return str(path)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def segment_data(tmp_path_factory):
    """Two tiny preference datasets (early, late) for timestep-segment experts."""
    from tiny.segment import write_pairs

    root = tmp_path_factory.mktemp("segment-pairs")
    return [str(write_pairs(root / "early", 0)), str(write_pairs(root / "late", 1))]


@pytest.fixture(scope="session")
def trained_experts(tiny_pipeline_dir, segment_data, tmp_path_factory):
    """``visalign train timestep-segment`` on the tiny SD pipeline: experts ``early`` / ``late``, two steps each;
    the run folder (experts in ``final/``)."""
    from tiny.segment import cli_args, segment_args

    from apps.cli import main

    out = tmp_path_factory.mktemp("segment") / "run"
    args = cli_args(segment_args(tiny_pipeline_dir("sd"), segment_data, out))
    assert main(["train", "timestep-segment", *args]) == 0
    return out
