"""Preference training of transformers causal LMs (DPO, IPO, KTO, ORPO, ... any loss of ``visalign.losses``).

``visalign train llm-dpo --model M --data D [--loss sigmoid] [--beta 0.1] ...`` tokenizes the data once, then runs
on the shared loop (``trainers/base.py``). Each step computes the summed completion-token log-probs of the policy
(and of the reference), forms the log-ratios of DESIGN.md (``r = sum log pi(y|x) - sum log pi_ref(y|x)``, prompt
tokens masked out) and hands them, with token counts, to the chosen loss.

Data (TRL's dataset formats; a ``.jsonl``/``.parquet`` file, a saved dataset folder or a hub id):

* pairs ``prompt, chosen, rejected`` (pairwise and reference-free losses) — standard text, or conversational
  (lists of ``{"role", "content"}`` messages rendered through the tokenizer's chat template; without a
  ``prompt`` column the prompt is the messages ``chosen`` and ``rejected`` share); optional precomputed
  reference log-probs ``ref_chosen_logps, ref_rejected_logps``; ``label`` (P(chosen wins)) for ``soft``;
* unpaired ``prompt, completion, label`` (bool) for KTO-style losses; pairs are split into one desirable and one
  undesirable example each (as TRL's ``unpair_preference_dataset``); NPO uses the undesirable examples only;
* lists ``prompt, completions, scores`` (K each, the same K in every row) for listwise losses.

Reference: the same network with the LoRA disabled (``finetune=lora``), or a frozen copy (``finetune=full``);
reference-free losses (SimPO, CPO, ORPO, SFT) run no reference forward at all.

Departures from TRL, and why: a row whose completion is empty, or which ``max_length`` truncation leaves without
a completion token, is an error naming the row (TRL drops or keeps it silently); ``max_prompt_length`` keeps the
end of the prompt, next to the answer, and ``max_length`` then keeps the start of the sequence.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from trainers.base import TrainConfig, write_model_card
from visalign import losses
from visalign.config import field
from visalign.data import DataError
from visalign.data import _rows as read_rows
from visalign.errors import ConfigError

COLUMNS = {
    "pair": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "listwise": ("prompt", "completions", "scores"),
}
LAYOUTS = {"pairwise": "pair", "reference_free": "pair", "sft": "pair", "unpaired": "unpaired", "listwise": "listwise"}
# Tensor inputs that only exist with a reference model.
REFERENCE_INPUTS = {"chosen_logratios", "rejected_logratios", "ref_chosen_logps", "ref_rejected_logps", "logratios",
                    "kl_logratios"}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class LLMPreferenceConfig(TrainConfig):
    """Options of ``visalign train llm-dpo`` (the shared loop's options, plus these)."""

    model: str = field(help="transformers causal LM: hub id or local folder")
    data: str = field(help="training data: .jsonl, .parquet, saved dataset folder or hub id (TRL formats)")
    tokenizer: str | None = field(None, help="tokenizer hub id or folder (default: the model's)")
    eval_data: str | None = field(None, help="held-out pairs for evaluation (implicit accuracy, margins)")
    eval_fraction: float = field(0.0, help="hold out this share of the training rows for evaluation (seeded)")
    loss: str = field("sigmoid", help="a visalign.losses name, or weighted terms 'sigmoid:1.0,sft:0.5'")
    beta: float | None = field(None, help="loss strength beta (default: each loss's own, e.g. 0.1 for DPO)")
    loss_params: str = field("{}", help='JSON object of other loss hyper-parameters, e.g. {"label_smoothing": 0.1}')
    finetune: Literal["lora", "full"] = field("lora", help="train a LoRA (reference = adapter off) or all weights")
    lora_rank: int = field(8, help="LoRA rank r")
    lora_alpha: float = field(16.0, help="LoRA alpha (scale alpha / r)")
    lora_dropout: float = field(0.0, help="LoRA dropout")
    lora_target_modules: str = field("all-linear", help="comma-separated module names, or 'all-linear'")
    max_length: int | None = field(None, help="truncate prompt+completion to this many tokens (keeps the start)")
    max_prompt_length: int | None = field(None, help="truncate prompts to their last N tokens")
    add_eos: bool = field(True, help="append the EOS token to text completions that lack it (as TRL)")
    dtype: Literal["fp32", "bf16", "fp16"] = field("fp32", help="dtype of the model weights")
    disable_dropout: bool = field(True, help="turn dropout off in the model, so policy and reference agree")
    eval_batch_size: int = field(16, help="pairs per evaluation forward")

    def __post_init__(self):
        super().__post_init__()
        if not self.model or not self.data:
            raise ConfigError("--model and --data are required")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.lora_rank < 1 or self.eval_batch_size < 1:
            raise ConfigError("lora_rank and eval_batch_size must be >= 1")
        for name in ("max_length", "max_prompt_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        self.objective()  # fail now, not at step 1: unknown loss names list the available ones
        if self.layout == "unpaired" and "kl_logratios" in self.objective().inputs and self.batch_size < 2:
            raise ConfigError("KTO estimates its KL term from mismatched pairs within a batch: use batch_size >= 2")

    def loss_kwargs(self) -> dict[str, Any]:
        """``beta`` (if set) and ``loss_params`` as one mapping (a YAML config may give ``loss_params`` as a dict)."""
        params = self.loss_params
        if isinstance(params, str):
            try:
                params = json.loads(params or "{}")
            except json.JSONDecodeError as e:
                raise ConfigError(f"loss_params is not a JSON object: {e.msg} in {self.loss_params!r}") from e
        if not isinstance(params, dict):
            raise ConfigError(f"loss_params must be a JSON object (a mapping), got {params!r}")
        return {**params, **({"beta": self.beta} if self.beta is not None else {})}

    def objective(self) -> losses.PreferenceLoss:
        objective = losses.build(self.loss, **self.loss_kwargs())
        diffusion_only = [s.name for s in objective.specs if s.kind not in LAYOUTS]
        if diffusion_only:
            text = ", ".join(n for n in losses.available() if losses.get(n).kind in LAYOUTS)
            raise ConfigError(f"loss {diffusion_only} works on diffusion denoising errors; text losses: {text}")
        return objective

    @property
    def layout(self) -> str:
        return LAYOUTS[self.objective().specs[0].kind]


# --------------------------------------------------------------------------------------------------- log-probs
def sequence_logps(model, input_ids, attention_mask, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each sequence, and their count.

    Args:
        model: a causal LM returning ``logits [N, T, V]``.
        input_ids, attention_mask: ``[N, T]`` right-padded prompt+completion tokens.
        completion_mask: ``[N, T]`` 1 on completion tokens (prompt and padding 0).

    Returns:
        ``logps [N]`` float32 (``sum_t log pi(y_t | x, y_<t)`` over completion tokens), ``lengths [N]`` token counts.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    labels, mask = input_ids[:, 1:], completion_mask[:, 1:]
    # log_softmax at the label only: gather minus logsumexp never materialises the [N, T, V] log-probs twice.
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def pad_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``[(prompt_ids, completion_ids), ...]`` -> right-padded ``input_ids, attention_mask, completion_mask``.

    Returns:
        ``[N, T]`` long tensors; ``completion_mask`` is 1 on completion tokens only.
    """
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    completion = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


# --------------------------------------------------------------------------------------------------- data
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return all(not str(m.get("content") or "").strip() for m in value if isinstance(m, dict))
    return True


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _require(row: Any, columns: tuple[str, ...], where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a mapping of columns (got {type(row).__name__})")
    for column in columns:
        if column not in row or row[column] is None:
            raise DataError(f"{where} has no column {column!r} (expected columns: {', '.join(columns)})")


class CompletionTokenizer:
    """Tokenizes ``(prompt, completions)`` as TRL does: a completion is what prompt+completion adds to the prompt."""

    def __init__(self, tokenizer, config: LLMPreferenceConfig):
        self.tok, self.config = tokenizer, config

    def ids(self, text_or_messages: str | list, generation_prompt: bool = False) -> list[int]:
        if isinstance(text_or_messages, list):
            if self.tok.chat_template is None:
                name = self.config.tokenizer or self.config.model
                raise ConfigError(f"conversational rows need a chat template, and the tokenizer of {name!r} has none")
            out = self.tok.apply_chat_template(text_or_messages, tokenize=True, return_dict=True,
                                               add_generation_prompt=generation_prompt)  # fmt: skip
            return list(out["input_ids"])
        return list(self.tok(text=text_or_messages)["input_ids"])

    def split(self, prompt: str | list, completions: list, names: list[str], where: str):
        """``(prompt_ids, [completion_ids, ...])``, truncated; errors name the row and the column."""
        if not isinstance(prompt, (str, list)):
            raise DataError(f"{where}: column 'prompt' must be text or a list of messages")
        fulls = []
        for completion, name in zip(completions, names):
            if not isinstance(completion, (str, list)) or _is_empty(completion):
                raise DataError(f"{where}: column {name!r} is an empty completion (it has no log-likelihood); "
                                "drop the row or give it text")  # fmt: skip
            if isinstance(prompt, list) != isinstance(completion, list):
                raise DataError(f"{where}: 'prompt' and {name!r} must both be text or both be message lists")
            if isinstance(completion, str) and self.config.add_eos and self.tok.eos_token:
                completion = completion if completion.endswith(self.tok.eos_token) else completion + self.tok.eos_token
            fulls.append(self.ids(prompt + completion))
        prompt_ids = self.ids(prompt, generation_prompt=True)
        # The completion starts where the two tokenizations diverge (tokens can merge across the boundary, a chat
        # template can render a lone prompt differently); every completion shares the shortest prefix, as TRL.
        n = min(_common_prefix(prompt_ids, full) for full in fulls)
        prompt_ids, completion_ids = prompt_ids[:n], [full[n:] for full in fulls]
        cfg = self.config
        if cfg.max_prompt_length is not None:
            prompt_ids = prompt_ids[-cfg.max_prompt_length :]
        if cfg.max_length is not None:
            room = cfg.max_length - len(prompt_ids)
            if room < 1:
                raise DataError(f"{where}: the prompt has {len(prompt_ids)} tokens, so max_length {cfg.max_length} "
                                "leaves no completion token; raise max_length or set max_prompt_length")  # fmt: skip
            completion_ids = [c[:room] for c in completion_ids]
        for c, name in zip(completion_ids, names):
            if not c:
                raise DataError(f"{where}: column {name!r} adds no token to the prompt (an empty completion)")
        return prompt_ids, completion_ids

    def pair(self, row: Any, where: str, need_probs: bool = False) -> dict:
        """A pair row (or a listwise row: its best and worst candidates) -> token ids and per-row extras."""
        if isinstance(row, dict) and "completions" in row and "chosen" not in row:
            _require(row, COLUMNS["listwise"], where)
            scores = [float(s) for s in row["scores"]]
            row = {"prompt": row["prompt"], "chosen": row["completions"][scores.index(max(scores))],
                   "rejected": row["completions"][scores.index(min(scores))]}  # fmt: skip
        _require(row, ("chosen", "rejected"), where)
        chosen, rejected = row["chosen"], row["rejected"]
        if row.get("prompt") is None and _is_messages(chosen) and _is_messages(rejected):
            n = _common_prefix(chosen, rejected)  # implicit prompt: the messages both conversations share (TRL)
            if n == 0:
                raise DataError(f"{where} has no column 'prompt', and 'chosen' and 'rejected' share no first message")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            _require(row, COLUMNS["pair"], where)
            prompt = row["prompt"]
        prompt_ids, (c, r) = self.split(prompt, [chosen, rejected], ["chosen", "rejected"], where)
        example = {"prompt_ids": prompt_ids, "chosen_ids": c, "rejected_ids": r}
        if row.get("ref_chosen_logps") is not None or row.get("ref_rejected_logps") is not None:
            _require(row, ("ref_chosen_logps", "ref_rejected_logps"), where)
            example.update(ref_chosen_logps=float(row["ref_chosen_logps"]),
                           ref_rejected_logps=float(row["ref_rejected_logps"]))  # fmt: skip
        if need_probs:
            _require(row, ("label",), where)
            example["preference_prob"] = float(row["label"])
        return example

    def unpaired(self, row: Any, where: str, labelled: bool) -> list[dict]:
        """An unpaired row -> one example; a pair row -> its chosen (desirable) and rejected (undesirable) example."""
        if isinstance(row, dict) and "completion" not in row and "chosen" in row:
            pair = self.pair(row, where)
            return [{"prompt_ids": pair["prompt_ids"], "completion_ids": pair[f"{key}_ids"], "label": key == "chosen"}
                    for key in ("chosen", "rejected")]  # fmt: skip
        _require(row, COLUMNS["unpaired"] if labelled else COLUMNS["unpaired"][:2], where)
        label = row.get("label", False)
        if not isinstance(label, bool):
            raise DataError(f"{where}: column 'label' must be true (desirable) or false, got {label!r}")
        prompt_ids, (ids,) = self.split(row["prompt"], [row["completion"]], ["completion"], where)
        return [{"prompt_ids": prompt_ids, "completion_ids": ids, "label": label}]

    def listwise(self, row: Any, where: str) -> dict:
        _require(row, COLUMNS["listwise"], where)
        completions, scores = row["completions"], row["scores"]
        if not isinstance(completions, list) or len(completions) < 2 or not isinstance(scores, list):
            raise DataError(f"{where}: 'completions' must be a list of >= 2 completions and 'scores' a list")
        if len(scores) != len(completions):
            raise DataError(f"{where}: {len(completions)} completions but {len(scores)} scores")
        names = [f"completions[{k}]" for k in range(len(completions))]
        prompt_ids, ids = self.split(row["prompt"], completions, names, where)
        return {"prompt_ids": prompt_ids, "completion_ids": ids, "scores": [float(s) for s in scores]}


# --------------------------------------------------------------------------------------------------- the task
class LLMPreferenceTask:
    """A causal LM trained with a ``visalign.losses`` objective; implements the loop's ``Task`` protocol.

    Args:
        config: the run's options.
        model, tokenizer: already-built objects to use instead of loading ``config.model`` (a LoRA is injected
            into ``model`` in place).
    """

    def __init__(self, config: LLMPreferenceConfig, *, model=None, tokenizer=None):
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = cfg = config
        self.objective = cfg.objective()
        self.layout = cfg.layout
        required = {i for s in self.objective.specs for i in s.inputs}
        self.needs_reference = bool(required & REFERENCE_INPUTS)
        self.needs_kl = "kl_logratios" in required
        self.device = PartialState().device
        self.tokenizer = tokenizer if tokenizer is not None else _load(AutoTokenizer, cfg.tokenizer or cfg.model)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"the tokenizer of {cfg.model!r} has neither a pad nor an EOS token; set one")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is masked out; any id will do (TRL)
        base = model if model is not None else _load(AutoModelForCausalLM, cfg.model, dtype=DTYPES[cfg.dtype])
        if cfg.disable_dropout:
            for module in base.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        base.to(self.device)
        self.ref_model = None
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            targets = cfg.lora_target_modules
            targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
            with torch.random.fork_rng(devices=[]):  # LoRA init from the run's seed, not from whatever ran before
                torch.manual_seed(cfg.seed)
                self.model = get_peft_model(base, lora)
        else:
            self.model = base.requires_grad_(True)
            if self.needs_reference:
                self.ref_model = copy.deepcopy(base).requires_grad_(False).eval()
        self.model.train()
        self.train_examples, self.eval_examples = self._load_data()

    # ------------------------------------------------------------------ data
    def _load_data(self) -> tuple[list[dict], list[dict]]:
        cfg = self.config
        rows, name, _ = read_rows(cfg.data)
        if not rows:
            raise DataError(f"{name}: the dataset is empty")
        items = list(enumerate(rows))
        eval_items, eval_name = [], name
        if cfg.eval_data:
            eval_rows, eval_name, _ = read_rows(cfg.eval_data)
            eval_items = list(enumerate(eval_rows))
        elif cfg.eval_fraction > 0:
            held = set(random.Random(cfg.seed).sample(range(len(rows)), max(1, round(cfg.eval_fraction * len(rows)))))
            eval_items = [(i, r) for i, r in items if i in held]
            items = [(i, r) for i, r in items if i not in held]
        tok = CompletionTokenizer(self.tokenizer, cfg)
        need_probs = any("preference_probs" in s.inputs for s in self.objective.specs)
        npo_only = all(s.name == "npo" for s in self.objective.specs)
        if self.layout == "pair":
            train = [tok.pair(r, f"{name}: row {i}", need_probs) for i, r in items]
        elif self.layout == "unpaired":
            train = [e for i, r in items for e in tok.unpaired(r, f"{name}: row {i}", labelled=not npo_only)]
            if npo_only:  # NPO unlearns: it sees the undesirable completions only
                train = [e for e in train if not e["label"]]
        else:
            train = [tok.listwise(r, f"{name}: row {i}") for i, r in items]
            sizes = {len(e["completion_ids"]) for e in train}
            if len(sizes) > 1:
                raise DataError(f"{name}: rows have different numbers of completions {sorted(sizes)}; use one K")
        if not train:
            raise DataError(f"{name}: no training examples left (NPO needs rows with label false)")
        held_out = [tok.pair(r, f"{eval_name}: row {i}", need_probs) for i, r in eval_items]
        for examples, source, where in ((train, items, name), (held_out, eval_items, eval_name)):
            has = ["ref_chosen_logps" in e for e in examples]
            if any(has) and not all(has):  # a batch must not mix given and computed reference log-probs
                row = source[has.index(False)][0]
                raise DataError(f"{where}: row {row} has no column 'ref_chosen_logps', other rows do: give "
                                "precomputed reference log-probs for every row or for none")  # fmt: skip
        return train, held_out

    def train_dataset(self) -> list[dict]:
        return self.train_examples

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Token-id examples -> padded tensors (pairs: the chosen sequences, then the rejected ones)."""
        pad = self.tokenizer.pad_token_id
        if self.layout == "pair" or "chosen_ids" in rows[0]:
            batch = pad_sequences([(r["prompt_ids"], r["chosen_ids"]) for r in rows]
                                  + [(r["prompt_ids"], r["rejected_ids"]) for r in rows], pad)  # fmt: skip
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                if key in rows[0]:
                    batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
            if "preference_prob" in rows[0]:
                batch["preference_probs"] = torch.tensor([r["preference_prob"] for r in rows], dtype=torch.float32)
            return batch
        if self.layout == "listwise":
            batch = pad_sequences([(r["prompt_ids"], c) for r in rows for c in r["completion_ids"]], pad)
            batch["scores"] = torch.tensor([r["scores"] for r in rows], dtype=torch.float32)
            return batch
        batch = pad_sequences([(r["prompt_ids"], r["completion_ids"]) for r in rows], pad)
        batch["desirable"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
        if self.needs_kl:
            # Each prompt with the previous example's completion: mismatched pairs whose mean log-ratio estimates
            # KL(pi || pi_ref) (KTO, as TRL's collator).
            room = self.config.max_length or 1 << 30
            shifted = rows[-1:] + rows[:-1]
            kl = pad_sequences([(r["prompt_ids"], s["completion_ids"][: room - len(r["prompt_ids"])])
                                for r, s in zip(rows, shifted)], pad)  # fmt: skip
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    # ------------------------------------------------------------------ the objective
    def _logps(self, batch: dict, prefix: str = "", reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        args = [batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "completion_mask")]
        if not reference:
            return sequence_logps(self.model, *args)
        with torch.no_grad():
            if self.ref_model is not None:
                return sequence_logps(self.ref_model, *args)
            with self.model.disable_adapter():  # the reference is the base network: the LoRA switched off
                return sequence_logps(self.model, *args)

    def _pair_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        logps, lengths = self._logps(batch)
        pc, pr = logps.chunk(2)  # the collated batch holds the chosen sequences, then the rejected ones
        nc, nr = lengths.chunk(2)
        inputs = {"chosen_logps": pc, "rejected_logps": pr, "chosen_lengths": nc, "rejected_lengths": nr}
        if self.needs_reference:
            if "ref_chosen_logps" in batch:
                rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                rc, rr = self._logps(batch, reference=True)[0].chunk(2)
            inputs.update(ref_chosen_logps=rc, ref_rejected_logps=rr, chosen_logratios=pc - rc,
                          rejected_logratios=pr - rr)  # fmt: skip
        if "preference_probs" in batch:
            inputs["preference_probs"] = batch["preference_probs"]
        return inputs

    def loss_inputs(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The loss's tensor inputs for one batch (policy and reference forwards), and log-prob metrics."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.layout == "pair":
            inputs = self._pair_inputs(batch)
            pc, pr = inputs["chosen_logps"].detach(), inputs["rejected_logps"].detach()
            return inputs, {"logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
        logps, lengths = self._logps(batch)
        lp = logps.detach()
        if self.layout == "listwise":
            scores = batch["scores"]
            inputs = {"logps": logps.view(scores.shape), "lengths": lengths.view(scores.shape), "scores": scores}
            if self.needs_reference:
                inputs["logratios"] = (logps - self._logps(batch, reference=True)[0]).view(scores.shape)
            best, worst = scores.argmax(dim=1, keepdim=True), scores.argmin(dim=1, keepdim=True)
            lp = lp.view(scores.shape)
            return inputs, {"logps/chosen": lp.gather(1, best).mean(), "logps/rejected": lp.gather(1, worst).mean()}
        good = batch["desirable"]
        inputs = {"desirable": good}
        if self.needs_reference:
            inputs["logratios"] = logps - self._logps(batch, reference=True)[0]
        if self.needs_kl:
            with torch.no_grad():  # z is detached in KTO: no graph for the mismatched pairs
                inputs["kl_logratios"] = self._logps(batch, "kl_")[0] - self._logps(batch, "kl_", reference=True)[0]
        metrics = {"logps/chosen": torch.where(good, lp, 0).sum() / good.sum().clamp(min=1),
                   "logps/rejected": torch.where(good, 0, lp).sum() / (~good).sum().clamp(min=1)}  # fmt: skip
        return inputs, metrics

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, metrics = self.loss_inputs(batch)
        per_sample, loss_metrics = self.objective(**inputs)
        return per_sample.mean(), {**loss_metrics, **metrics}

    # ------------------------------------------------------------------ checkpoints, evaluation, export
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        mine = {n for n, p in params.items() if p.requires_grad}
        if set(state) != mine:
            differ = sorted(set(state) ^ mine)[:2]
            raise ConfigError(f"the checkpoint holds {len(state)} tensors and this run trains {len(mine)} (e.g. "
                              f"{differ}): resume with the same model and LoRA options")  # fmt: skip
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    @torch.no_grad()
    def evaluate(self, step: int, out_dir: str | Path) -> dict[str, float]:
        """Held-out pairs: implicit accuracy and margin, and the chosen-over-rejected log-prob margin.

        The implicit reward is the log-ratio ``r`` when the loss has a reference, else the mean token log-prob
        ``logps / n`` (SimPO's and ORPO's). Writes ``out_dir/metrics.json``.
        """
        if not self.eval_examples:
            return {}
        training = self.model.training
        self.model.eval()
        parts: list[torch.Tensor] = []
        size = self.config.eval_batch_size
        for i in range(0, len(self.eval_examples), size):
            batch = {k: v.to(self.device) for k, v in self.collate(self.eval_examples[i : i + size]).items()}
            x = self._pair_inputs(batch)
            pc, pr = x["chosen_logps"], x["rejected_logps"]
            if self.needs_reference:
                rc, rr = x["chosen_logratios"], x["rejected_logratios"]
            else:
                rc, rr = pc / x["chosen_lengths"], pr / x["rejected_lengths"]
            parts.append(torch.stack([pc, pr, rc, rr]).float().cpu())
        self.model.train(training)
        pc, pr, rc, rr = torch.cat(parts, dim=1)
        results = {
            "implicit_accuracy": float((rc > rr).float().mean()),
            "implicit_margin": float((rc - rr).mean()),
            "logps/chosen": float(pc.mean()),
            "logps/rejected": float(pr.mean()),
            "logps/margin": float((pc - pr).mean()),
            "pairs": float(len(pc)),
        }
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"step": step, **results}, indent=2) + "\n")
        return results

    def export(self, out_dir: str | Path, results: dict[str, float]) -> None:
        """The LoRA (peft format) or the full model, the tokenizer, and a model card with the results."""
        cfg, out = self.config, Path(out_dir)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)  # after the model: our card below replaces the one peft writes
        lora = cfg.finetune == "lora"
        auto = "peft import AutoPeftModelForCausalLM" if lora else "transformers import AutoModelForCausalLM"
        usage = f'from {auto}\n\nmodel = {auto.split()[-1]}.from_pretrained("{out}")'
        write_model_card(out, title=f"{cfg.model} aligned with {cfg.loss} (visalign)", base_model=cfg.model,
                         data=cfg.data, config=cfg, results=results, usage=usage,
                         library_name="peft" if lora else "transformers",
                         tags=("visalign", cfg.finetune, *self.objective.names))  # fmt: skip


def _load(cls, name: str, **kwargs):
    """``cls.from_pretrained(name)`` with one clear error when the model is neither a folder nor reachable."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load {cls.__name__} from {name!r}: not a model folder, and not a hub id reachable "
                          f"now ({str(e).splitlines()[0]})") from e  # fmt: skip
