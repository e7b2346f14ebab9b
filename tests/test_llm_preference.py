"""Text-LLM preference training (``trainers/llm_preference.py``) on a tiny Llama built offline.

The synthetic task: a prompt is three distinct letters from ``a..h`` ("c a f"); the chosen completion gives their
capital partners in order ("C A F"), the rejected one three capitals of letters not in the prompt. Learning it
means raising the partners of whatever letters the prompt holds, so held-out prompts measure generalisation.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from trainers.base import Trainer
from trainers.llm_preference import LLMPreferenceConfig, LLMPreferenceTask
from visalign import losses
from visalign.errors import ConfigError, VisalignError
from visalign.text import sequence_logps

LOWER = list("abcdefgh")
UPPER = [c.upper() for c in LOWER]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny Llama + word-level tokenizer (with a chat template) and the synthetic data files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("llm")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<user>": 3, "<assistant>": 4,
             **{w: i + 5 for i, w in enumerate(LOWER + UPPER)}}  # fmt: skip
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    rng = random.Random(0)

    def pair():
        prompt = rng.sample(LOWER, 3)
        others = [c.upper() for c in LOWER if c not in prompt]
        return {"prompt": " ".join(prompt), "chosen": " " + " ".join(c.upper() for c in prompt),
                "rejected": " " + " ".join(rng.sample(others, 3))}  # fmt: skip

    rows = [pair() for _ in range(96)]
    train, held_out = rows[:64], rows[64:]
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in train
                for k in ("chosen", "rejected")]  # fmt: skip
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in train[:8]]  # fmt: skip
    lists = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"], " " + r["rejected"].split()[0]],
              "scores": [1.0, 0.0, 0.5]} for r in train]  # fmt: skip
    return {
        "model": str(root / "model"),
        "tokenizer": tokenizer,
        "root": root,
        "rows": train,
        "train": write_jsonl(root / "train.jsonl", train),
        "eval": write_jsonl(root / "eval.jsonl", held_out),
        "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired),
        "chat": write_jsonl(root / "chat.jsonl", chat),
        "lists": write_jsonl(root / "lists.jsonl", lists),
    }


def make_config(world, tmp_path, **overrides) -> LLMPreferenceConfig:
    base = dict(model=world["model"], data=world["train"], eval_data=world["eval"], output_dir=str(tmp_path / "run"),
                max_steps=4, batch_size=8, learning_rate=1e-2, lr_scheduler="constant", report_to="none",
                progress=False)  # fmt: skip
    return LLMPreferenceConfig(**{**base, **overrides})


def first_batch(task, n=8):
    return task.collate(task.train_examples[:n])


# ------------------------------------------------------------------------------------------------ behaviour
# KTO sees one completion per example, so it gets batches of 16 examples (8 pairs' worth) and a gentler rate; with
# these settings every loss clears 0.9 for seeds 0-3 (min 0.94), not just for the seed tested here.
@pytest.mark.parametrize(
    "loss, data, overrides",
    [
        ("sigmoid", "train", {}),
        ("ipo", "train", {}),
        ("kto", "unpaired", {"batch_size": 16, "learning_rate": 5e-3, "max_steps": 40}),
        ("orpo", "train", {}),
    ],
)
def test_learns_the_preference_on_held_out_prompts(world, tmp_path, loss, data, overrides):
    cfg = make_config(world, tmp_path, **{"loss": loss, "data": world[data], "max_steps": 60, **overrides})
    cfg.eval_every = cfg.max_steps // 2
    task = LLMPreferenceTask(cfg)
    before = task.evaluate(0, tmp_path / "eval0")
    results = Trainer(task).train()
    mid = json.loads((tmp_path / "run" / "eval" / f"step-{cfg.eval_every:06d}" / "metrics.json").read_text())
    assert results["implicit_accuracy"] >= 0.9, results
    assert before["logps/margin"] < mid["logps/margin"] < results["logps/margin"], (before, mid, results)
    assert results["logps/margin"] > before["logps/margin"] + 0.5
    if task.needs_reference:  # LoRA starts at zero: the policy is the reference, every log-ratio is 0
        assert before["implicit_accuracy"] == 0.0 and before["implicit_margin"] == 0.0


def test_sigmoid_loss_at_init_is_log_2_with_lora_and_logs_trl_metrics(world, tmp_path):
    task = LLMPreferenceTask(make_config(world, tmp_path))
    loss, metrics = task.loss(first_batch(task))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].item() == 0.0 and metrics["rewards/chosen"].item() == 0.0
    assert TRL_METRICS <= set(metrics)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(world, tmp_path):
    out = []
    for checkpointing in (False, True):
        cfg = make_config(world, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        task = LLMPreferenceTask(cfg)
        assert task.model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(1)
        params = [p for p in task.model.parameters() if p.requires_grad]
        for p in params:
            p.data.add_(0.02 * torch.randn_like(p))
        task.model.train()
        loss, _ = task.loss(first_batch(task))
        loss.backward()
        out.append((loss.item(), [p.grad for p in params]))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(out[0][1], out[1][1]))


def test_completion_logps_mask_the_prompt_and_padding(world, tmp_path):
    task = LLMPreferenceTask(make_config(world, tmp_path))
    examples = task.train_examples[:4]
    eos = task.tokenizer.eos_token_id
    assert all(e["chosen_ids"][-1] == eos and len(e["chosen_ids"]) == 4 for e in examples)  # 3 letters + EOS
    batch = task.collate(examples)
    with torch.no_grad():
        logps, lengths = sequence_logps(task.model, batch["input_ids"], batch["attention_mask"],
                                        batch["completion_mask"])  # fmt: skip
        for i, e in enumerate(examples):  # one unpadded sequence at a time, by hand
            for j, completion in ((i, e["chosen_ids"]), (i + len(examples), e["rejected_ids"])):
                ids = torch.tensor([e["prompt_ids"] + completion])
                logits = task.model(input_ids=ids).logits[0].float().log_softmax(-1)
                start = len(e["prompt_ids"])
                expected = sum(logits[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))
                torch.testing.assert_close(logps[j], expected, atol=1e-5, rtol=0)
                assert lengths[j] == len(completion)


def test_lora_trains_the_adapter_and_leaves_the_base_alone(world, tmp_path):
    task = LLMPreferenceTask(make_config(world, tmp_path, max_steps=3))
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    Trainer(task).train()
    after = dict(task.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_resume_equals_uninterrupted(world, tmp_path):
    class StopAt2(LLMPreferenceTask):
        def on_step_end(self, step):
            if step == 2:
                raise KeyboardInterrupt

    full = LLMPreferenceTask(make_config(world, tmp_path / "a", max_steps=4, batch_size=4, eval_data=None))
    Trainer(full).train()
    cut = StopAt2(make_config(world, tmp_path / "b", max_steps=4, batch_size=4, checkpoint_every=2, eval_data=None))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cut).train()
    resumed = LLMPreferenceTask(make_config(world, tmp_path / "b", max_steps=4, batch_size=4, eval_data=None,
                                            resume_from="latest"))  # fmt: skip
    Trainer(resumed).train()
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_export_reloads_with_peft(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = LLMPreferenceTask(make_config(world, tmp_path, max_steps=3))
    results = Trainer(task).train()
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert (final / "tokenizer.json").exists()
    card = (final / "README.md").read_text()
    assert "library_name: peft" in card and "implicit_accuracy" in card and results["pairs"] == 32
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model"]), final)
    batch = first_batch(task, 4)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(reloaded, *args)[0], sequence_logps(task.model, *args)[0])


def test_full_finetune_uses_a_frozen_copy_and_exports_the_model(world, tmp_path):
    from transformers import AutoModelForCausalLM

    task = LLMPreferenceTask(make_config(world, tmp_path, finetune="full", max_steps=2, eval_data=None))
    reference = {n: p.detach().clone() for n, p in task.ref_model.named_parameters()}
    loss, _ = task.loss(first_batch(task))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)  # policy == its frozen copy at the start
    Trainer(task).train()
    assert all(torch.equal(p, reference[n]) for n, p in task.ref_model.named_parameters())
    changed = [n for n, p in task.model.named_parameters() if not torch.equal(p, reference[n])]
    assert changed and "library_name: transformers" in (tmp_path / "run" / "final" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ids = torch.tensor([[5, 6, 7, 13, 14]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, task.model(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------ data formats
def test_conversational_rows_go_through_the_chat_template(world, tmp_path):
    tok = world["tokenizer"]
    user = {"role": "user", "content": "a b c"}
    implicit = {"chosen": [user, {"role": "assistant", "content": "A B C"}],
                "rejected": [user, {"role": "assistant", "content": "D E F"}]}  # fmt: skip
    rows = json.loads(open(world["chat"]).readline())
    data = write_jsonl(tmp_path / "chat.jsonl", [rows, implicit])
    task = LLMPreferenceTask(make_config(world, tmp_path, data=data, eval_data=None, batch_size=2))
    explicit, implied = task.train_examples
    ids = tok.convert_tokens_to_ids
    prompt = rows["prompt"][0]["content"].split()
    assert explicit["prompt_ids"] == ids(["<user>", *prompt, "<eos>", "<assistant>"])
    assert explicit["chosen_ids"] == ids([*rows["chosen"][0]["content"].split(), "<eos>"])
    assert implied["prompt_ids"] == ids(["<user>", "a", "b", "c", "<eos>", "<assistant>"])
    assert implied["rejected_ids"] == ids(["D", "E", "F", "<eos>"])
    loss, _ = task.loss(task.collate(task.train_examples))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_pairs_are_unpaired_for_kto_with_mismatched_kl_pairs(world, tmp_path):
    from_pairs = LLMPreferenceTask(make_config(world, tmp_path, loss="kto", eval_data=None))
    explicit = LLMPreferenceTask(make_config(world, tmp_path, loss="kto", data=world["unpaired"], eval_data=None))
    assert from_pairs.train_examples == explicit.train_examples and len(explicit.train_examples) == 128
    batch = from_pairs.collate(from_pairs.train_examples[:4])
    assert batch["desirable"].tolist() == [True, False, True, False]
    # KL pair i is prompt i with completion i-1 (cyclic).
    kl_ids = batch["kl_input_ids"][1][batch["kl_completion_mask"][1].bool()].tolist()
    assert kl_ids == from_pairs.train_examples[0]["completion_ids"]
    loss, metrics = from_pairs.loss(batch)
    assert loss.item() == pytest.approx(0.5, abs=1e-6) and metrics["kl"].item() == 0.0  # 1 - sigmoid(0) at init


def test_precomputed_reference_logps_replace_the_reference_forward(world, tmp_path):
    rows = [{**r, "ref_chosen_logps": -5.0, "ref_rejected_logps": -7.0} for r in world["rows"][:8]]
    task = LLMPreferenceTask(make_config(world, tmp_path, data=write_jsonl(tmp_path / "r.jsonl", rows),
                                         eval_data=None))  # fmt: skip
    batch = first_batch(task)
    loss, metrics = task.loss(batch)
    with torch.no_grad():
        logps, _ = sequence_logps(task.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    pc, pr = logps.chunk(2)
    expected, _ = losses.get("sigmoid")(chosen_logratios=pc + 5.0, rejected_logratios=pr + 7.0, beta=0.1)
    torch.testing.assert_close(loss.detach(), expected.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], 0.1 * (pc + 5.0).mean())
    rows[5] = world["rows"][5]
    with pytest.raises(VisalignError, match=r"row 5 has no column 'ref_chosen_logps', other rows do"):
        LLMPreferenceTask(make_config(world, tmp_path, data=write_jsonl(tmp_path / "r.jsonl", rows), eval_data=None))


def test_listwise_rows_train_lipo_and_evaluate_best_against_worst(world, tmp_path):
    task = LLMPreferenceTask(make_config(world, tmp_path, loss="lipo_lambda", data=world["lists"], eval_data=None,
                                         eval_fraction=0.25))  # fmt: skip
    assert len(task.train_examples) == 48 and len(task.eval_examples) == 16
    batch = first_batch(task, 4)
    assert batch["input_ids"].shape[0] == 12 and batch["scores"].shape == (4, 3)
    loss, metrics = task.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and {"logps/chosen", "rewards/accuracies"} <= set(metrics)
    assert task.evaluate(0, tmp_path / "eval")["pairs"] == 16


def test_truncation_keeps_the_prompt_end_and_the_completion_start(world, tmp_path):
    task = LLMPreferenceTask(make_config(world, tmp_path, max_prompt_length=2, max_length=4, eval_data=None))
    tok = world["tokenizer"]
    row, example = world["rows"][0], task.train_examples[0]
    assert example["prompt_ids"] == tok.convert_tokens_to_ids(row["prompt"].split()[-2:])
    assert example["chosen_ids"] == tok.convert_tokens_to_ids(row["chosen"].split()[:2])
    with pytest.raises(VisalignError, match=r"row 0: the prompt has 3 tokens, so max_length 3 leaves no completion"):
        LLMPreferenceTask(make_config(world, tmp_path, max_length=3, eval_data=None))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[2].pop("rejected"), r"train\.jsonl: row 2 has no column 'rejected'"),
        (lambda rows: rows[1].update(chosen="  "), r"row 1: column 'chosen' is an empty completion"),
        (lambda rows: rows[3].update(prompt=[{"role": "user", "content": "a"}]), r"row 3: 'prompt' and 'chosen'"),
    ],
)
def test_bad_rows_name_the_row_and_the_column(world, tmp_path, edit, message):
    rows = [dict(r) for r in world["rows"][:8]]
    edit(rows)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(VisalignError, match=message):
        LLMPreferenceTask(make_config(world, tmp_path, data=data, eval_data=None))


def test_bad_unpaired_label_and_eval_data_without_pairs(world, tmp_path):
    rows = [{"prompt": "a b c", "completion": " A B C", "label": "yes"}] * 4
    with pytest.raises(VisalignError, match=r"row 0: column 'label' must be true \(desirable\) or false"):
        LLMPreferenceTask(make_config(world, tmp_path, loss="kto", data=write_jsonl(tmp_path / "u.jsonl", rows),
                                      eval_data=None))  # fmt: skip
    with pytest.raises(VisalignError, match=r"unpaired\.jsonl: row 0 has no column 'chosen'"):
        LLMPreferenceTask(make_config(world, tmp_path, loss="kto", eval_data=world["unpaired"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss": "dpo"}, r"unknown loss 'dpo'; available: .*sigmoid"),
        ({"loss": "mapo"}, r"loss \['mapo'\] works on diffusion denoising errors; text losses: .*orpo"),
        ({"loss": "robust", "loss_params": '{"label_smoothing": 0.7}'}, r"label_smoothing must lie in \[0, 0.5\)"),
        ({"loss_params": "{oops"}, r"loss_params is not a JSON object"),
        ({"loss": "kto", "batch_size": 1}, r"KTO .* use batch_size >= 2"),
        ({"eval_fraction": 1.0}, r"eval_fraction must lie in \[0, 1\)"),
    ],
)
def test_bad_config(world, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(world, tmp_path, **overrides)


# ------------------------------------------------------------------------------------------------ the command
def test_visalign_train_llm_dpo(world, tmp_path, capsys):
    from apps import train

    out = tmp_path / "cli"
    results = train.main(["llm-dpo", "--model", world["model"], "--data", world["train"], "--eval_data",
                          world["eval"], "--output_dir", str(out), "--max_steps", "2", "--batch_size", "4",
                          "--report_to", "none", "--progress", "false", "--beta", "0.2"])  # fmt: skip
    assert results["pairs"] == 32 and (out / "final" / "README.md").exists()
    assert "beta: 0.2" in (out / "config.yaml").read_text()
    assert "implicit_accuracy" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"unknown algorithm 'nope'; available: .*llm-dpo"):
        train.main(["nope"])
    train.main([])
    assert "llm-dpo" in capsys.readouterr().out


def test_yaml_config_with_loss_params(world, tmp_path):
    from apps.train import resolve
    from visalign.config import parse_config

    config_cls, _ = resolve("llm-dpo")
    (tmp_path / "c.yaml").write_text(f"model: {world['model']}\ndata: {world['train']}\nloss: robust\n"
                                     "loss_params: {label_smoothing: 0.1}\n")  # fmt: skip
    cfg = parse_config(config_cls, ["--config", str(tmp_path / "c.yaml"), "--beta", "0.3"])
    assert cfg.objective().params == {"label_smoothing": 0.1, "beta": 0.3}
