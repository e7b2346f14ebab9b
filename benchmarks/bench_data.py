"""Does memory grow with the dataset? Peak RSS of a short Diffusion-DPO run on Pick-a-Pic-schema parquet files of
growing size, against the naive way (every row read into a Python list, as ``list(Dataset.from_parquet(...))``),
and the cache build's throughput with 2 processes against 1.

    python benchmarks/bench_data.py                       # 3k and 30k pairs, toy-sd, 64 px JPEGs
    python benchmarks/bench_data.py --sizes 3000 30000 --steps 5 --skip_cache_scaling

Each figure comes from a fresh process (its own ``ru_maxrss``). The data are generated here: ``caption``, ``jpg_0``,
``jpg_1`` (64 px JPEG bytes, about 2 KB each), ``label_0`` (5% ties), written in row groups so that generating
them does not hold them either. Prints a table and writes ``benchmarks/results/bench_data_cpu.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY_SD = ROOT / "assets" / "toyworld" / "toy-sd"


def write_pickapic(path: Path, n: int, seed: int = 0, group: int = 1000, size: int = 64) -> Path:
    """``n`` Pick-a-Pic-schema rows of random ``size`` px JPEG pairs, written ``group`` rows at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])  # fmt: skip

    def jpeg():
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth-ish: upsampled noise, realistic sizes
        buf = io.BytesIO()
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, group):
            m = min(group, n - start)
            labels = rng.choice([0.0, 1.0, 0.5], size=m, p=[0.475, 0.475, 0.05])
            rows = {
                "caption": [f"a {colours[i % 4]} {shapes[i % 3]} number {start + i}" for i in range(m)],
                "jpg_0": [jpeg() for _ in range(m)],
                "jpg_1": [jpeg() for _ in range(m)],
                "label_0": labels.tolist(),
            }
            writer.write_table(pa.table(rows, schema=schema))
    return path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class AnonPeak:
    """The peak of this process's anonymous memory (``RssAnon``: heap and tensors, not the pages of memory-mapped
    files, which the kernel can drop and re-read), sampled every 20 ms in a thread."""

    def __init__(self):
        import threading

        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def read(self) -> float:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            self.stop.wait(0.02)

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.read())


def child(argv: list[str]) -> None:
    """In a fresh process: run one measured job, print its peak RSS and seconds as JSON."""
    mode, data = argv[0], argv[1]
    anon = AnonPeak()
    start = time.perf_counter()
    if mode == "naive":  # the naive way: every row, image bytes included, in a Python list
        import datasets

        rows = list(datasets.Dataset.from_parquet(data))
        n = len(rows)
    elif mode == "train":
        from apps.cli import main

        out, cache, steps = argv[2], argv[3], argv[4]
        args = ["train", "diffusion-dpo", "--model", str(TOY_SD), "--data", data, "--output_dir", out,
                "--max_steps", steps, "--batch_size", "4", "--report_to", "none", "--progress", "False",
                "--cache", cache, "--cache_dir", out + "-cache", "--resolution", "64"]  # fmt: skip
        assert main(args) == 0
        n = None
    else:  # "encode": the cache build alone (under torchrun: every rank its share of the shards)
        from visalign.cache import encode_pairs
        from visalign.data import load_preference_data
        from visalign.distributed import process_state
        from visalign.models import load_model

        state = process_state()
        model = load_model(str(TOY_SD))
        pairs = load_preference_data(data, resolution=64)
        state.wait_for_everyone()
        start = time.perf_counter()
        encode_pairs(model, pairs, argv[2], shard_size=256, batch_size=32, progress=False)
        n = len(pairs)
        if not state.is_main_process:
            return
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "peak_anon_mib": anon.close(), "seconds": seconds, "n": n}))


def measure(argv: list[str], env: dict, nproc: int = 1) -> dict:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]  # fmt: skip
    done = subprocess.run([*launcher, str(Path(__file__).resolve()), "--child", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{done.stderr[-4000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work", default="/tmp/visalign-bench-data")
    parser.add_argument("--skip_cache_scaling", action="store_true")
    parser.add_argument("--only_cache_scaling", action="store_true", help="measure the cache build alone")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_data_cpu.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()  # fmt: skip
    results: dict = {"machine": f"{cpu}, {os.cpu_count()} cores", "rows": []}
    for n in [] if args.only_cache_scaling else args.sizes:
        data = work / f"pickapic-{n}.parquet"
        if not data.exists():
            t = time.perf_counter()
            write_pickapic(data, n)
            print(f"wrote {n} pairs ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        row = {"pairs": n, "parquet_mib": data.stat().st_size / 2**20}
        row["naive_list"] = measure(["naive", str(data)], env)
        for cache in ("none", "disk"):
            out = work / f"run-{n}-{cache}"
            for old in (out, Path(f"{out}-cache")):  # measure a cold build, not a cache left by an earlier run
                shutil.rmtree(old, ignore_errors=True)
            row[f"train_cache_{cache}"] = measure(["train", str(data), str(out), cache, str(args.steps)], env)
        results["rows"].append(row)
        print(json.dumps(row))
    if not args.skip_cache_scaling:
        data = work / f"pickapic-{args.sizes[0]}.parquet"
        if not data.exists():
            write_pickapic(data, args.sizes[0])
        scaling = {}
        for nproc in (1, 2):
            cache = work / f"encode-{nproc}"
            shutil.rmtree(cache, ignore_errors=True)
            r = measure(["encode", str(data), str(cache)], env, nproc)
            scaling[f"{nproc}_process"] = {**r, "pairs_per_s": r["n"] / r["seconds"]}
            print(f"cache build, {nproc} process(es): {r['n'] / r['seconds']:.0f} pairs/s")
        results["cache_build"] = scaling
    print("\npeak RSS (peak anonymous memory)")
    print("| pairs | parquet | naive list of rows | train, --cache none | train, --cache disk |")
    print("|---|---|---|---|---|")
    keys = ("naive_list", "train_cache_none", "train_cache_disk")
    for r in results["rows"]:
        cells = [f"{r[k]['peak_rss_mib']:.0f} MiB ({r[k]['peak_anon_mib']:.0f})" for k in keys]
        print(f"| {r['pairs']:,} | {r['parquet_mib']:.0f} MiB | " + " | ".join(cells) + " |")
    if len(results["rows"]) >= 2:
        a, b = results["rows"][0], results["rows"][-1]
        for key in keys:
            for what in ("peak_rss_mib", "peak_anon_mib"):
                growth = b[key][what] / a[key][what] - 1
                results[f"growth_{key}_{what}"] = growth
                print(f"{key}: {what} {100 * growth:+.1f}% from {a['pairs']:,} to {b['pairs']:,} pairs")
    if args.only_cache_scaling:
        args.out = args.out.replace(".json", "_cache_build.json")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
