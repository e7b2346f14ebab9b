"""Benchmark: every registered loss at batch 4096, library call vs a naive per-sample Python loop.

For each entry of ``visalign.losses`` this times one call of the library function (forward, and forward+backward)
on a batch of ``--batch`` pairs (unpaired: examples; listwise: lists of ``--list-size`` candidates), and the same
formula written as a plain Python loop over samples with ``math`` (what a research script often does), and checks
that both agree. Prints a table and saves JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_losses.py                 # CPU, batch 4096
    .venv/bin/python benchmarks/bench_losses.py --device cuda --out bench.json    # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from visalign import losses as L


def ls(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def smooth(x: float, eps: float) -> float:
    return -(1 - eps) * ls(x) - eps * ls(-x)


def log1mexp(a: float) -> float:
    return math.log(-math.expm1(a))


def lambda_list(r: list[float], psi: list[float], beta: float) -> float:
    s = [beta * x for x in r]
    order = sorted(range(len(s)), key=lambda i: -s[i])
    rank = {i: p + 1 for p, i in enumerate(order)}
    total = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if psi[i] > psi[j]:
                w = abs(2 ** psi[i] - 2 ** psi[j]) * abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                total += w * -ls(s[i] - s[j])
    return total


def pro_list(pi: list[float], n: list[float], psi: list[float], sft_weight: float = 0.05) -> float:
    idx = sorted(range(len(psi)), key=lambda i: -psi[i])
    a, p = [pi[i] / n[i] for i in idx], [psi[i] for i in idx]
    total = 0.0
    for k in range(len(a) - 1):
        temps = [p[k] - p[i] for i in range(k + 1, len(a))]
        tk = max(temps)
        logits = [a[k] * tk] + [a[i] * tt for i, tt in zip(range(k + 1, len(a)), temps)]
        m = max(logits)
        total += m + math.log(sum(math.exp(x - m) for x in logits)) - a[k] * tk
    return total + sft_weight * (len(a) - 1) ** 2 * -pi[idx[0]]


def mapo_f(e: float, s: float = 0.5) -> float:
    return 1 - s * e / 2 if abs(s * e) < 1e-6 else s * e / math.expm1(s * e)


B = 0.1  # beta of the naive versions: each loss's registry default where it has one (see NAIVE_BETA)


def naive(name: str, x: dict[str, list]) -> list[float]:
    """The loss written as a per-sample Python loop (the slow baseline), with the registry's default parameters."""
    b = L.get(name).params.get("beta", B)
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            pol = sorted(c - r for c, r in zip(x["chosen_logps"], x["rejected_logps"]))
            ref = sorted(c - r for c, r in zip(x["ref_chosen_logps"], x["ref_rejected_logps"]))
        else:
            pol, ref = sorted(x["chosen_logratios"]), sorted(x["rejected_logratios"])
        return [smooth(b * (p - q), 0.0) for p, q in zip(pol, ref)]
    if name in ("kto", "apo_zero_unpaired", "npo"):
        out = []
        z = max(0.0, sum(x["kl_logratios"]) / len(x["kl_logratios"])) if name == "kto" else 0.0
        for i, r in enumerate(x["logratios"]):
            if name == "npo":
                out.append(-(2 / b) * ls(-b * r))
            elif name == "kto":
                out.append(1 - sig(b * (r - z)) if x["desirable"][i] else 1 - sig(b * (z - r)))
            else:
                out.append(1 - sig(b * r) if x["desirable"][i] else sig(b * r))
        return out
    if name in ("lipo_lambda", "rankdpo"):
        return [lambda_list(r, p, b) for r, p in zip(x["logratios"], x["scores"])]
    if name == "pro":
        return [pro_list(p, n, s) for p, n, s in zip(x["logps"], x["lengths"], x["scores"])]
    if name in ("sft", "cpo", "orpo"):
        scale = len(x["chosen_logps"]) / sum(x["chosen_lengths"])  # token-level mean NLL, spread per sample
    out = []
    for i in range(len(next(iter(x.values())))):
        g = {k: v[i] for k, v in x.items()}
        if "chosen_logratios" in g:
            rc, rr = g["chosen_logratios"], g["rejected_logratios"]
            d = b * (rc - rr)
        if name == "sigmoid":
            v = -ls(d)
        elif name == "hinge":
            v = max(0.0, 1 - d)
        elif name == "ipo":
            v = (rc - rr - 1 / (2 * b)) ** 2
        elif name == "robust":
            v = -ls(d)
        elif name == "cdpo":
            v = smooth(d, 0.1)
        elif name == "exo_pair":
            eps = 1e-3
            v = sig(d) * (ls(d) - math.log1p(-eps)) + sig(-d) * (ls(-d) - math.log(eps))
        elif name == "nca_pair":
            v = -ls(b * rc) - 0.5 * ls(-b * rc) - 0.5 * ls(-b * rr)
        elif name == "bco_pair":
            v = -ls(b * rc) - ls(-b * rr)
        elif name == "sppo_hard":
            v = (rc - 0.5 / b) ** 2 + (rr + 0.5 / b) ** 2
        elif name == "apo_zero":
            v = 1 - sig(b * rc) + sig(b * rr)
        elif name == "apo_down":
            v = sig(b * rc) + 1 - sig(b * (rc - rr))
        elif name == "discopop":
            w = sig(d / 0.05)
            v = (1 - w) * -ls(d) + math.exp(ls(d / 0.05) - d)
        elif name == "sigmoid_norm":
            v = -ls(b * (rc / g["chosen_lengths"] - rr / g["rejected_lengths"]))
        elif name == "poly":
            v = -ls(d) + 1.0 * sig(-d)
        elif name == "soft":
            p = g["preference_probs"]
            v = -(p * ls(d) + (1 - p) * ls(-d))
        elif name == "sft":
            v = -g["chosen_logps"] * scale
        elif name == "simpo":
            v = -ls(b * (g["chosen_logps"] / g["chosen_lengths"] - g["rejected_logps"] / g["rejected_lengths"]) - 0.5)
        elif name == "cpo":
            v = -ls(b * (g["chosen_logps"] - g["rejected_logps"])) - g["chosen_logps"] * scale
        elif name == "orpo":
            ac, ar = g["chosen_logps"] / g["chosen_lengths"], g["rejected_logps"] / g["rejected_lengths"]
            v = -g["chosen_logps"] * scale - b * ls((ac - log1mexp(ac)) - (ar - log1mexp(ar)))
        elif name == "mapo":
            ew, el = g["chosen_errors"], g["rejected_errors"]
            v = ew - b * ls(1000 * (mapo_f(ew) - mapo_f(el)))
        else:
            raise KeyError(f"no naive version of {name!r}")
        out.append(v)
    return out


def make_inputs(spec: L.LossSpec, batch: int, list_size: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, lo=-2.0, hi=2.0):
        return torch.rand(*shape, generator=g, dtype=torch.float32) * (hi - lo) + lo

    n_lists = max(1, batch // list_size) if spec.kind == "listwise" else batch
    pool = {
        "chosen_logratios": rand(batch, lo=-5, hi=5), "rejected_logratios": rand(batch, lo=-5, hi=5),
        "chosen_logps": rand(batch, lo=-60, hi=-1), "rejected_logps": rand(batch, lo=-60, hi=-1),
        "ref_chosen_logps": rand(batch, lo=-60, hi=-1), "ref_rejected_logps": rand(batch, lo=-60, hi=-1),
        "chosen_lengths": torch.randint(1, 64, (batch,), generator=g).float(),
        "rejected_lengths": torch.randint(1, 64, (batch,), generator=g).float(),
        "preference_probs": rand(batch, lo=0, hi=1),
        "chosen_errors": rand(batch, lo=0.01, hi=0.3), "rejected_errors": rand(batch, lo=0.01, hi=0.3),
        "logratios": rand(n_lists, list_size, lo=-5, hi=5) if spec.kind == "listwise" else rand(batch, lo=-5, hi=5),
        "desirable": torch.rand(batch, generator=g) < 0.5, "kl_logratios": rand(batch, lo=-1, hi=2),
        "logps": rand(n_lists, list_size, lo=-60, hi=-1),
        "lengths": torch.randint(1, 64, (n_lists, list_size), generator=g).float(),
        "scores": rand(n_lists, list_size, lo=0, hi=1),
    }  # fmt: skip
    return {k: pool[k].to(device) for k in spec.inputs}


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in seconds (after one warm-up call), synchronising CUDA around each call."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_backward(spec: L.LossSpec, inputs: dict[str, torch.Tensor]) -> None:
    spec(**inputs)[0].mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="pairs (or examples, or candidates) per call")
    parser.add_argument("--list-size", type=int, default=4, help="K candidates per list for listwise losses")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per loss (median reported)")
    parser.add_argument("--naive-repeats", type=int, default=3, help="timed calls of the Python-loop baseline")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="benchmarks/results/bench_losses.json", help="where to save the JSON")
    parser.add_argument("--only", nargs="*", help="benchmark only these losses")
    args = parser.parse_args()

    names = args.only or L.available()
    rows = []
    header = f"{'loss':<18}{'kind':<15}{'library fwd':>14}{'library fwd+bwd':>17}{'python loop':>14}{'speed-up':>10}"
    print(f"visalign.losses at batch {args.batch} on {args.device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name in names:
        spec = L.get(name)
        inputs = make_inputs(spec, args.batch, args.list_size, args.device)
        fwd = timed(functools.partial(spec.fn, **inputs), args.repeats, args.device)
        frozen = ("scores", "preference_probs", "kl_logratios", "chosen_lengths", "rejected_lengths", "lengths")
        grad_inputs = {
            k: v.clone().requires_grad_() if v.is_floating_point() and k not in frozen else v
            for k, v in inputs.items()
        }
        fwd_bwd_time = timed(functools.partial(forward_backward, spec, grad_inputs), args.repeats, args.device)
        as_lists = {k: v.cpu().tolist() for k, v in inputs.items()}
        naive_time = timed(functools.partial(naive, name, as_lists), args.naive_repeats, "cpu")
        library = spec(**inputs)[0].double().cpu()
        reference = torch.tensor(naive(name, as_lists), dtype=torch.float64)
        max_rel = ((library - reference).abs() / reference.abs().clamp(min=1e-3)).max().item()
        rows.append({"loss": name, "kind": spec.kind, "batch": args.batch, "library_forward_s": fwd,
                     "library_forward_backward_s": fwd_bwd_time, "python_loop_s": naive_time,
                     "speedup_forward": naive_time / fwd, "max_relative_difference": max_rel})  # fmt: skip
        print(f"{name:<18}{spec.kind:<15}{fwd * 1e3:>11.3f} ms{fwd_bwd_time * 1e3:>14.3f} ms"
              f"{naive_time * 1e3:>11.1f} ms{naive_time / fwd:>9.0f}x"
              + ("" if max_rel < 1e-4 else f"   MISMATCH {max_rel:.2e}"))  # fmt: skip
    result = {
        "benchmark": "visalign.losses call time vs per-sample Python loop",
        "batch": args.batch, "list_size": args.list_size, "repeats": args.repeats, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "command": "benchmarks/bench_losses.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "only"),
        "results": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
