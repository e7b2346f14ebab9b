"""Text preference data and log-probs for causal LMs: TRL-format rows tokenized once, completion-token sums.

The text side of the log-ratio convention (docs/design.md): ``r = sum_t log pi(y_t | x, y_<t) - (same under the
reference)`` over completion tokens, prompt tokens masked out. Used by ``trainers/llm_preference.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import DataError
from .errors import ConfigError

COLUMNS = {
    "pair": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "listwise": ("prompt", "completions", "scores"),
}


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

    def __init__(self, tokenizer, config: Any):  # an LLMPreferenceConfig: max_length, max_prompt_length, add_eos
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
