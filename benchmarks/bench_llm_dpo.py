"""Time one LLM-DPO optimizer step of ``trainers/llm_preference.py`` against the naive ways of doing it.

visalign's step: examples tokenized once when the task is built; each step collates a batch, runs the policy (with
its LoRA) and the reference (the same network, LoRA disabled: no second copy of the weights), computes
``visalign.losses`` DPO, backward, AdamW. The naive steps, as research scripts often do them:

* "reference copy": the reference log-probs come from a separate frozen copy of the base model;
* "re-tokenize": the batch's raw rows are tokenized again at every step (chat template / tokenizer call);
* both at once.

All four compute the same loss (checked). A tiny Llama and a word-level tokenizer are built in code (offline).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_llm_dpo.py            # CPU, saves benchmarks/results/...
    .venv/bin/python benchmarks/bench_llm_dpo.py --hidden 256 --layers 4      # a bigger toy
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_losses import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from trainers.llm_preference import LLMPreferenceConfig, LLMPreferenceTask  # noqa: E402
from visalign.text import CompletionTokenizer, sequence_logps  # noqa: E402


def build(args, root: Path):
    """A tiny Llama, a word-level tokenizer and ``args.rows`` random preference rows written to ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(args.vocab)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")  # fmt: skip
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4 * (args.prompt_tokens + args.completion_tokens))  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"prompt": text(args.prompt_tokens), "chosen": " " + text(args.completion_tokens),
             "rejected": " " + text(args.completion_tokens)} for _ in range(args.rows)]  # fmt: skip
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, tokenizer, rows, str(data)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=1000, help="words in the tokenizer")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--completion-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--rows", type=int, default=64, help="pairs in the dataset")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--out", default="benchmarks/results/bench_llm_dpo.json", help="where to save the JSON")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-llm-dpo-"))
    model, tokenizer, rows, data = build(args, root)
    copy_of_base = copy.deepcopy(model).requires_grad_(False).eval()  # the naive reference, made before LoRA
    cfg = LLMPreferenceConfig(model="tiny-llama (built in code)", data=data, output_dir=str(root / "run"),
                              batch_size=args.batch, report_to="none", progress=False)  # fmt: skip
    task = LLMPreferenceTask(cfg, model=model, tokenizer=tokenizer)
    copy_of_base.to(task.device)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-6)  # tiny steps: the model barely moves
    raw, examples = rows[: args.batch], task.train_examples[: args.batch]
    tok = CompletionTokenizer(task.tokenizer, cfg)

    def loss_with_copy(batch):
        """The reference log-probs from the separate copy, handed to the task as if precomputed."""
        batch = {k: v.to(task.device) for k, v in batch.items()}
        with torch.no_grad():
            args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref, _ = sequence_logps(copy_of_base, *args)
        rc, rr = ref.chunk(2)
        return task.loss({**batch, "ref_chosen_logps": rc, "ref_rejected_logps": rr})[0]

    def tokenized_now():
        return task.collate([tok.pair(r, f"row {i}") for i, r in enumerate(raw)])

    variants = {
        "visalign (tokenized once, reference = LoRA off)": lambda: task.loss(task.collate(examples))[0],
        "naive: separate reference copy": lambda: loss_with_copy(task.collate(examples)),
        "naive: re-tokenize every step": lambda: task.loss(tokenized_now())[0],
        "naive: both": lambda: loss_with_copy(tokenized_now()),
    }
    losses = {name: float(fn().detach()) for name, fn in variants.items()}
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses  # same computation, same loss

    def step(fn):
        optimizer.zero_grad(set_to_none=True)
        fn().backward()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # Round-robin over the variants, so that a slow spell of the machine hits all of them alike.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 3):
        for name, fn in variants.items():
            start = time.perf_counter()
            step(fn)
            if round_ >= 3:  # warm-up rounds are not counted
                times[name].append(time.perf_counter() - start)

    base_params = sum(p.numel() for p in copy_of_base.parameters())
    extra_bytes = sum(p.numel() * p.element_size() for p in copy_of_base.parameters())
    lora_params = sum(p.numel() for p in task.trainable_parameters())
    results = []
    print(f"LLM-DPO step: Llama {args.layers}x{args.hidden} ({base_params / 1e6:.2f}M params, LoRA r=8 "
          f"{lora_params / 1e3:.1f}k), {args.batch} pairs of {args.prompt_tokens}+{args.completion_tokens} tokens, "
          f"on {task.device} ({torch.get_num_threads()} threads)")  # fmt: skip
    fastest = None
    for name in variants:
        seconds = statistics.median(times[name])
        fastest = fastest or seconds
        copy_bytes = extra_bytes if "copy" in name or "both" in name else 0
        results.append({"variant": name, "step_s": seconds, "relative": seconds / fastest,
                        "extra_weight_bytes": copy_bytes})  # fmt: skip
        print(f"  {name:<50}{seconds * 1e3:>9.1f} ms  x{seconds / fastest:.2f}  "
              f"extra weights {copy_bytes / 2**20:.2f} MiB")  # fmt: skip
    retokenize = median_time(tokenized_now, args.repeats)
    print(f"  tokenizing {args.batch} pairs (the per-step cost the naive loop adds): {retokenize * 1e3:.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "one LLM-DPO optimizer step (forward policy + reference, DPO loss, backward, AdamW)",
        "model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab + 3, "params": base_params,
                  "lora_params": lora_params},
        "batch_pairs": args.batch, "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
        "device": str(task.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": cpu_name(),
        "retokenize_batch_s": retokenize, "results": results,
        "command": "benchmarks/bench_llm_dpo.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                             for k, v in vars(args).items() if k != "out"),
    }, indent=2) + "\n")  # fmt: skip
    print(f"saved {out}")


if __name__ == "__main__":
    main()
