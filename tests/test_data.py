"""Preference data: schemas, validation errors that name the row, atomic writing, the encoded-pair cache."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch
from PIL import Image

from visalign.data import (
    DataError,
    PreferenceWriter,
    cache_key,
    encode_pairs,
    load_preference_data,
)


def png_bytes(color, size=(16, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_pickapic_schema_drops_ties_and_puts_the_winner_first():
    import datasets

    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    ds = datasets.Dataset.from_dict(
        {
            "caption": ["a", "b", "c"],
            "jpg_0": [red, red, red],
            "jpg_1": [blue, blue, blue],
            "label_0": [1.0, 0.5, 0.0],
        }
    )
    data = load_preference_data(ds)
    assert [p.prompt for p in data.pairs] == ["a", "c"]
    first, second = data[0], data[1]
    assert first["chosen"][0].mean() == 1.0 and first["chosen"][2].mean() == 0.0  # red won
    assert second["chosen"][2].mean() == 1.0 and second["chosen"][0].mean() == 0.0  # blue won
    assert first["chosen"].shape == (3, 16, 16)


def write_jsonl(tmp_path, rows, name="pairs.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / name


def test_jsonl_with_relative_paths_and_resolution(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (20, 40), (0, 255, 0)).save(tmp_path / "img" / "b.png")
    f = write_jsonl(tmp_path, [{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "seed": 3}])
    data = load_preference_data(f, resolution=8)
    item = data[0]
    assert item["chosen"].shape == item["rejected"].shape == (3, 8, 8)
    assert data.pairs[0].meta == {"seed": 3}
    assert load_preference_data(tmp_path, resolution=8).pairs[0].prompt == "p"  # a folder with pairs.jsonl


def test_parquet(tmp_path):
    import datasets

    datasets.Dataset.from_dict(
        {"prompt": ["x"], "chosen": [png_bytes((1, 2, 3))], "rejected": [png_bytes((4, 5, 6))]}
    ).to_parquet(tmp_path / "d.parquet")
    assert load_preference_data(tmp_path / "d.parquet")[0]["prompt"] == "x"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "p", "chosen": "a.png"}], r"row 0 has no column 'rejected'"),
        (
            [{"caption": "p", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 2}],
            r"row 0: label 2.0 is outside \[0, 1\]",
        ),
        (
            [{"caption": "p", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.3}],
            r"row 0: label_0 must be 0, 0.5 or 1",
        ),
        ([], "the dataset is empty"),
        ([{"prompt": "p", "chosen": "nope.png", "rejected": "nope.png"}], "row 0: media file not found"),
    ],
)
def test_row_errors_name_the_row_and_column(tmp_path, rows, message):
    f = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        load_preference_data(f)


def test_corrupt_image_names_the_row(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes((0, 0, 0)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    f = write_jsonl(
        tmp_path,
        [
            {"prompt": "p", "chosen": "ok.png", "rejected": "ok.png"},
            {"prompt": "q", "chosen": "ok.png", "rejected": "bad.png"},
        ],
    )
    data = load_preference_data(f)
    with pytest.raises(DataError, match=r"row 1 \(rejected\): cannot decode image .*bad.png"):
        data[1]


def test_pair_of_different_sizes(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((0, 0, 0), (16, 16)))
    (tmp_path / "b.png").write_bytes(png_bytes((0, 0, 0), (16, 24)))
    data = load_preference_data(write_jsonl(tmp_path, [{"prompt": "p", "chosen": "a.png", "rejected": "b.png"}]))
    with pytest.raises(DataError, match=r"row 0: chosen is \(3, 16, 16\) but rejected is \(3, 24, 16\)"):
        data[0]


def test_writer_appends_atomically_from_threads(tmp_path):
    writer = PreferenceWriter(tmp_path / "votes")
    img = torch.rand(3, 8, 8)

    def vote(i):
        writer.append(f"prompt {i}", img, 1 - img, label=1.0, seed=i)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = load_preference_data(tmp_path / "votes")
    assert sorted(p.meta["seed"] for p in data.pairs) == list(range(8))
    torch.testing.assert_close(data[0]["chosen"], img, atol=1 / 255, rtol=0)
    assert not list((tmp_path / "votes" / "media").glob(".*"))  # no temporary files left


def test_video_pairs_round_trip(tmp_path):
    writer = PreferenceWriter(tmp_path / "v")
    video = torch.rand(5, 3, 16, 16)
    writer.append("a red circle moving left", video, video.flip(0))
    data = load_preference_data(tmp_path / "v")
    assert data.video and data[0]["chosen"].shape == (5, 3, 16, 16)


def test_encoded_pairs_are_cached_and_invalidated(tiny_pipeline_dir, tmp_path):
    from visalign.models import load_model

    model = load_model(tiny_pipeline_dir("sd"))
    writer = PreferenceWriter(tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        writer.append(
            ["a red circle", "a blue square"][i % 2],
            torch.rand(3, 32, 32, generator=g),
            torch.rand(3, 32, 32, generator=g),
        )
    data = load_preference_data(tmp_path / "d", resolution=32)
    calls = []
    original = model.encode
    model.encode = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    first = encode_pairs(model, data, tmp_path / "cache", batch_size=2, progress=False)
    n_calls = len(calls)
    assert n_calls == 4  # two batches x (chosen, rejected)
    second = encode_pairs(model, data, tmp_path / "cache", batch_size=2, progress=False)
    assert len(calls) == n_calls  # loaded, not re-encoded
    assert torch.equal(first.latents_c, second.latents_c) and first.prompts == second.prompts
    item = second[2]
    assert item["chosen"].shape == (4, 16, 16) and item["prompt"] == "a red circle"
    torch.testing.assert_close(
        item["cond"]["encoder_hidden_states"], model.encode_prompt(["a red circle"])["encoder_hidden_states"][0]
    )
    other = load_preference_data(tmp_path / "d", resolution=16)
    assert cache_key(model, other) != cache_key(model, data)
    encode_pairs(model, other, tmp_path / "cache", batch_size=2, progress=False)
    assert len(calls) == 2 * n_calls
    batch = second.collate([second[0], second[1]])
    assert batch["chosen"].shape == (2, 4, 16, 16) and batch["cond"]["encoder_hidden_states"].shape[0] == 2


def test_two_runs_encoding_the_same_cache_at_once(tiny_pipeline_dir, tmp_path):
    """A second run that publishes the same cache entry first wins; the first keeps its result, no error."""
    from visalign.models import load_model

    model = load_model(tiny_pipeline_dir("sd"))
    writer = PreferenceWriter(tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    writer.append("a red circle", torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g))
    data = load_preference_data(tmp_path / "d", resolution=32)
    original, inner = model.encode, []

    def encode(*a, **k):
        if not inner:  # while this run encodes, another one encodes and publishes the same entry
            inner.append(1)
            model.encode = original
            inner.append(encode_pairs(model, data, tmp_path / "cache", progress=False))
        return original(*a, **k)

    model.encode = encode
    outer = encode_pairs(model, data, tmp_path / "cache", progress=False)
    assert torch.equal(outer.latents_c, inner[1].latents_c)
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 1 and not list((tmp_path / "cache").rglob(".tmp-*"))
