"""Preference data: schemas, validation errors that name the row, atomic writing, the encoded-pair cache."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch
from PIL import Image

from visalign.cache import EncodedPairs, cache_key, encode_pairs, shard_name
from visalign.data import DataError, PreferenceWriter, load_preference_data


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
    assert [data.pair(i).prompt for i in range(len(data))] == ["a", "c"]
    assert [data.source_row(i) for i in range(len(data))] == [0, 2]
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
    assert data.pair(0).meta == {"seed": 3}
    assert load_preference_data(tmp_path, resolution=8).pair(0).prompt == "p"  # a folder with pairs.jsonl


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
    assert sorted(data.pair(i).meta["seed"] for i in range(len(data))) == list(range(8))
    torch.testing.assert_close(data[0]["chosen"], img, atol=1 / 255, rtol=0)
    assert not list((tmp_path / "votes" / "media").glob(".*"))  # no temporary files left


def test_video_pairs_round_trip(tmp_path):
    writer = PreferenceWriter(tmp_path / "v")
    video = torch.rand(5, 3, 16, 16)
    writer.append("a red circle moving left", video, video.flip(0))
    data = load_preference_data(tmp_path / "v")
    assert data.video and data[0]["chosen"].shape == (5, 3, 16, 16)


def test_a_bad_row_is_named_when_it_is_reached(tmp_path):
    """Rows are read on demand: a row with a missing value fails when used, naming its row; labels are checked
    for every row up front (they decide which rows are pairs)."""
    (tmp_path / "ok.png").write_bytes(png_bytes((0, 0, 0)))
    good = {"prompt": "p", "chosen": "ok.png", "rejected": "ok.png"}
    f = write_jsonl(tmp_path, [good, good, {"prompt": "q", "chosen": "ok.png", "rejected": None}, good])
    data = load_preference_data(f)
    assert len(data) == 4 and data[1]["prompt"] == "p"
    with pytest.raises(DataError, match=r"pairs.jsonl: row 2 has no column 'rejected'"):
        data[2]
    write_jsonl(tmp_path, [good, good, {**good, "label": "yes"}])
    with pytest.raises(DataError, match=r"row 2: label 'yes' is not a number"):
        load_preference_data(f)
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_preference_data(tmp_path / "broken.jsonl")


def test_parquet_missing_column_split_and_max_samples(tmp_path):
    import datasets

    img = png_bytes((9, 9, 9))
    datasets.Dataset.from_dict({"caption": ["x"], "jpg_0": [img], "jpg_1": [img]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m.parquet: row 0 has no column 'prompt'"):
        load_preference_data(tmp_path / "m.parquet")
    rows = {"caption": [str(i) for i in range(6)], "jpg_0": [img] * 6, "jpg_1": [img] * 6, "label_0": [1.0] * 6}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows).select([4, 5])}
    ).save_to_disk(tmp_path / "dd")
    assert len(load_preference_data(tmp_path / "dd")) == 6
    val = load_preference_data(tmp_path / "dd", split="validation")
    assert [val.pair(i).prompt for i in range(len(val))] == ["4", "5"]
    assert len(load_preference_data(tmp_path / "dd", limit=3)) == 3
    with pytest.raises(DataError, match=r"no split 'test'; it has train, validation"):
        load_preference_data(tmp_path / "dd", split="test")


def tiny_votes(tmp_path, n, size=32):
    writer = PreferenceWriter(tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        writer.append(
            ["a red circle", "a blue square"][i % 2],
            torch.rand(3, size, size, generator=g),
            torch.rand(3, size, size, generator=g),
        )
    return tmp_path / "d"


def test_encoded_pairs_are_cached_and_invalidated(tiny_pipeline_dir, tmp_path):
    from visalign.models import load_model

    model = load_model(tiny_pipeline_dir("sd"))
    data = load_preference_data(tiny_votes(tmp_path, 3), resolution=32)
    calls = []
    original = model.encode
    model.encode = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    first = encode_pairs(model, data, tmp_path / "cache", batch_size=2, progress=False)
    n_calls = len(calls)
    assert n_calls == 4  # two batches x (chosen, rejected)
    second = encode_pairs(model, data, tmp_path / "cache", batch_size=2, progress=False)
    assert len(calls) == n_calls  # loaded, not re-encoded
    assert torch.equal(first[1]["chosen"], second[1]["chosen"])
    item = second[2]
    assert item["chosen"].shape == (4, 16, 16) and item["prompt"] == "a red circle" and item["index"] == 2
    torch.testing.assert_close(
        item["cond"]["encoder_hidden_states"], model.encode_prompt(["a red circle"])["encoder_hidden_states"][0]
    )
    other = load_preference_data(tmp_path / "d", resolution=16)
    assert cache_key(model, other) != cache_key(model, data)
    assert cache_key(model, data, flip=True) != cache_key(model, data)
    encode_pairs(model, other, tmp_path / "cache", batch_size=2, progress=False)
    assert len(calls) == 2 * n_calls
    batch = second.collate([second[0], second[1]])
    assert batch["chosen"].shape == (2, 4, 16, 16) and batch["cond"]["encoder_hidden_states"].shape[0] == 2
    assert batch["index"].tolist() == [0, 1]


class Ranks:
    """The process-group facts encode_pairs reads, for one rank of a group whose other ranks run before it."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self):
        pass


def test_sharded_cache_is_the_same_whoever_builds_it_and_resumes(tiny_pipeline_dir, tmp_path):
    """5 pairs in shards of 2: built by one process at batch 3, or by two ranks at batch 1, the latents are
    the same up to float reduction order; a build that lost a shard redoes that shard only."""
    from visalign.models import load_model

    model = load_model(tiny_pipeline_dir("sd"))
    data = load_preference_data(tiny_votes(tmp_path, 5), resolution=32)
    one = encode_pairs(model, data, tmp_path / "a", batch_size=3, shard_size=2, progress=False)
    assert len(one) == 5 and sorted(p.name for p in one.folder.glob("shard-*")) == [shard_name(k) for k in range(3)]
    calls = []
    original = model.encode
    model.encode = lambda *a, **k: (calls.append(a[0].shape[0]), original(*a, **k))[1]
    # rank 1 alone first: it writes its shard, then finds rank 0's missing (as on machines without a shared disk)
    with pytest.raises(DataError, match=r"2 cache shards written by other processes are not visible here"):
        encode_pairs(model, data, tmp_path / "b", batch_size=1, shard_size=2, progress=False, state=Ranks(1, 2))
    # rank 0 then encodes its own two shards only, and publishes the entry
    two = encode_pairs(model, data, tmp_path / "b", batch_size=1, shard_size=2, progress=False, state=Ranks(0, 2))
    assert sum(calls) == 10  # each pair's two images once, over both ranks
    for i in range(5):
        a, b = one[i], two[i]
        torch.testing.assert_close(a["chosen"], b["chosen"], rtol=0, atol=1e-5)  # batch 3 vs 1: float order only
        torch.testing.assert_close(a["rejected"], b["rejected"], rtol=0, atol=1e-5)
        assert a["prompt"] == b["prompt"] == data.pair(i).prompt
    (two.folder / "meta.json").unlink()
    (two.folder / shard_name(1)).unlink()
    calls.clear()
    again = encode_pairs(model, data, tmp_path / "b", batch_size=2, shard_size=2, progress=False)
    assert calls == [2, 2]  # shard 1 only: pairs 2 and 3
    torch.testing.assert_close(again[3]["chosen"], one[3]["chosen"], rtol=0, atol=1e-5)
    assert not list(two.folder.glob(".tmp-*"))
    with pytest.raises(IndexError):
        again[5]


def test_flip_caches_the_latents_of_the_mirrored_images(tiny_pipeline_dir, tmp_path):
    from visalign.cache import encode_media
    from visalign.models import load_model

    model = load_model(tiny_pipeline_dir("sd"))
    data = load_preference_data(tiny_votes(tmp_path, 2), resolution=32)
    cached = encode_pairs(model, data, tmp_path / "cache", flip=True, progress=False)
    item = cached[1]
    expected = encode_media(model, data[1]["chosen"].flip(-1)[None], [data.source_row(1)], 0, "chosen_flip")[0]
    torch.testing.assert_close(item["chosen_flip"], expected)
    assert not torch.allclose(item["chosen_flip"], item["chosen"])
    assert EncodedPairs.collate([item, cached[0]])["rejected_flip"].shape == (2, 4, 16, 16)


def test_streaming_shards_by_process_drops_ties_and_decodes_as_it_goes(tmp_path):
    """A streamed parquet (as a hub dataset with --streaming): each process reads its own share, ties dropped,
    winner first; together the processes see every pair once; the order is reshuffled every epoch."""
    import datasets

    from visalign.data import StreamingPairs

    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    n = 12
    datasets.Dataset.from_dict({"caption": [str(i) for i in range(n)], "jpg_0": [red] * n, "jpg_1": [blue] * n,
                                "label_0": [0.5 if i % 4 == 3 else float(i % 2) for i in range(n)]}).to_parquet(
        tmp_path / "s.parquet")  # fmt: skip

    class Rank:
        def __init__(self, r):
            self.process_index, self.num_processes = r, 2

    shares = [load_preference_data(tmp_path / "s.parquet", streaming=True, state=Rank(r), resolution=8)
              for r in range(2)]  # fmt: skip
    assert all(isinstance(s, StreamingPairs) for s in shares)
    items = [list(s) for s in shares]
    prompts = [[it["prompt"] for it in part] for part in items]
    assert not set(prompts[0]) & set(prompts[1])
    assert sorted(prompts[0] + prompts[1], key=int) == [str(i) for i in range(n) if i % 4 != 3]
    for it in items[0] + items[1]:  # label_0 = 1: jpg_0 (red) won; 0: jpg_1 (blue) won
        red_won = int(it["prompt"]) % 2 == 1
        assert it["chosen"].shape == (3, 8, 8) and (it["chosen"][0].mean() == 1.0) == red_won
    assert len({it["index"] for part in items for it in part}) == n - 3  # unique indices over processes
    for share in shares:
        share.set_epoch(1)
    again = [[it["prompt"] for it in share] for share in shares]
    assert again != prompts and not set(again[0]) & set(again[1])  # another order, still disjoint and complete
    assert sorted(again[0] + again[1], key=int) == [str(i) for i in range(n) if i % 4 != 3]
    bad = datasets.Dataset.from_dict({"caption": ["x"], "jpg_0": [red], "jpg_1": [blue], "label_0": [0.3]})
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"streamed row 0 of process 0: label_0 must be 0, 0.5 or 1"):
        load_preference_data(tmp_path / "bad.parquet", streaming=True, state=Rank(0))
