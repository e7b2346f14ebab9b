"""Preference training of transformers causal LMs (DPO, IPO, KTO, ORPO, ... any loss of ``visalign.losses``).

``visalign train llm-dpo --model M --data D [--loss sigmoid] [--beta 0.1] ...`` tokenizes the data once, then runs
on the shared loop (``trainers/base.py``). Each step computes the summed completion-token log-probs of the policy
(and of the reference), forms the log-ratios of docs/design.md (``r = sum log pi(y|x) - sum log pi_ref(y|x)``, prompt
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
from visalign.config import field, resolve_dtype
from visalign.data import DataError, read_rows
from visalign.errors import ConfigError
from visalign.text import CompletionTokenizer, pad_sequences, sequence_logps

LAYOUTS = {"pairwise": "pair", "reference_free": "pair", "sft": "pair", "unpaired": "unpaired", "listwise": "listwise"}
# Tensor inputs that only exist with a reference model.
REFERENCE_INPUTS = {"chosen_logratios", "rejected_logratios", "ref_chosen_logps", "ref_rejected_logps", "logratios",
                    "kl_logratios"}  # fmt: skip


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


class LLMPreferenceTask:
    """A causal LM trained with a ``visalign.losses`` objective; implements the loop's ``Task`` protocol.

    Args:
        config: the run's options.
        model, tokenizer: already-built objects to use instead of loading ``config.model`` (a LoRA is injected
            into ``model`` in place).
    """

    def __init__(self, config: LLMPreferenceConfig, *, model=None, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from visalign.distributed import process_state

        self.config = cfg = config
        self.objective = cfg.objective()
        self.layout = cfg.layout
        required = {i for s in self.objective.specs for i in s.inputs}
        self.needs_reference = bool(required & REFERENCE_INPUTS)
        self.needs_kl = "kl_logratios" in required
        self.device = process_state().device
        self.tokenizer = tokenizer if tokenizer is not None else _load(AutoTokenizer, cfg.tokenizer or cfg.model)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"the tokenizer of {cfg.model!r} has neither a pad nor an EOS token; set one")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is masked out; any id will do (TRL)
        base = model if model is not None else _load(AutoModelForCausalLM, cfg.model, dtype=resolve_dtype(cfg.dtype))
        if cfg.disable_dropout:
            for module in base.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        base.to(self.device)
        if cfg.gradient_checkpointing:  # before any copy: the reference copy never runs backward anyway
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
