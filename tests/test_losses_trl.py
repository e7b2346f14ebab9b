"""Opt-in: every loss that overlaps with TRL equals ``trl==1.16.0``'s own computation (skipped without the extra).

TRL 1.16 has no standalone loss function: DPO and KTO compute their losses inside ``_compute_loss``. So this test
builds real ``DPOTrainer`` / ``KTOTrainer`` objects on a tiny offline Llama, takes TRL's own per-token log-probs
(its fused LM head), feeds random reference log-probs through TRL's ``precompute_ref_log_probs`` path, sets each
``loss_type`` in turn and compares TRL's loss and logged metrics with ``visalign.losses`` on the same log-probs.
CPO/SimPO and ORPO expose ``cpo_loss`` / ``odds_ratio_loss`` methods, which are called on random tensors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="optional extra: pip install 'visalign[trl]' (trl==1.16.0)")
if trl.__version__ != "1.16.0":
    pytest.skip(f"compares against trl==1.16.0, found {trl.__version__}", allow_module_level=True)

from visalign import losses as L  # noqa: E402

BETA = 0.5
WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, a word-level tokenizer and 8 random preference / unpaired rows, all built offline."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")  # fmt: skip
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    def length() -> int:
        return int(torch.randint(1, 6, (1,), generator=g))

    rows = [{"prompt": text(3), "chosen": " " + text(length()), "rejected": " " + text(length())} for _ in range(8)]
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 3 != 0} for i, r in enumerate(rows)]
    common = dict(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, save_strategy="no")
    return {"model": model, "tokenizer": tokenizer, "pairs": Dataset.from_list(rows),
            "unpaired": Dataset.from_list(unpaired), "common": common}  # fmt: skip


def policy_logps(model, input_ids, attention_mask, completion_mask):
    """Summed completion log-probs through TRL's own fused LM head, exactly as its trainers compute them."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                    use_cache=False)  # fmt: skip
    seq_len = input_ids.shape[1] - 1
    return out.log_probs[:, -seq_len:].sum(dim=1), completion_mask[:, 1:].sum(dim=1)


@pytest.fixture(scope="module")
def dpo(world):
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(per_device_train_batch_size=8, max_length=None, **world["common"])
        trainer = DPOTrainer(model=copy.deepcopy(world["model"]), ref_model=copy.deepcopy(world["model"]), args=args,
                             train_dataset=world["pairs"], processing_class=world["tokenizer"])  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    logps, lengths = policy_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen, rejected = logps.chunk(2)
    n_c, n_r = lengths.chunk(2)
    assert (n_c > 0).all() and (n_r > 0).all()
    # Random reference log-probs through TRL's precomputed-reference path.
    g = torch.Generator().manual_seed(1)
    ref_c = chosen + 2 * torch.randn(chosen.shape, generator=g)
    ref_r = rejected + 2 * torch.randn(rejected.shape, generator=g)
    trainer.precompute_ref_logps = True
    batch = {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    inputs = dict(chosen_logratios=chosen - ref_c, rejected_logratios=rejected - ref_r, chosen_logps=chosen,
                  rejected_logps=rejected, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, chosen_lengths=n_c,
                  rejected_lengths=n_r)  # fmt: skip
    return trainer, batch, inputs


def trl_dpo(trainer, batch, names, weights, params):
    trainer.loss_types, trainer.loss_weights = list(names), list(weights)
    trainer.beta = params.get("beta", BETA)
    trainer.label_smoothing = params.get("label_smoothing", 0.0)
    trainer.f_divergence_type = params.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = params.get("f_alpha_divergence_coef", 0.5)
    trainer.args.discopop_tau = params.get("discopop_tau", 0.05)
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics[mode].items()}


DPO_CASES = [
    ("sigmoid", {}),
    ("hinge", {}),
    ("ipo", {}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.2}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}),
    ("sft", {}),
    ("sigmoid_norm", {}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("hinge", {"f_divergence_type": "js_divergence"}),
    ("ipo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}),
    ("exo_pair", {"label_smoothing": 0.05, "f_divergence_type": "forward_kl"}),
    ("robust", {"label_smoothing": 0.1, "f_divergence_type": "js_divergence"}),
    ("discopop", {"discopop_tau": 0.2, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ("sigmoid_norm", {"f_divergence_type": "forward_kl"}),
    ("sigmoid:1.0,bco_pair:0.5,sft:1.0", {}),
    ("sigmoid:0.3,ipo:0.7", {"f_divergence_type": "js_divergence"}),
]


@pytest.mark.parametrize("spec, params", DPO_CASES, ids=[f"{s}-{p}" if p else s for s, p in DPO_CASES])
def test_dpo_losses_match_trl(dpo, spec, params):
    trainer, batch, inputs = dpo
    terms = L.parse_loss_spec(spec)
    accepted = {p for name, _ in terms for p in L.get(name).params}
    ours = L.build(terms, **{k: v for k, v in {"beta": BETA, **params}.items() if k in accepted})
    our_losses, our_metrics = ours(**{k: v for k, v in inputs.items() if k in ours.inputs or k in _optional(ours)})
    trl_loss, trl_metrics = trl_dpo(trainer, batch, [n for n, _ in terms], [w for _, w in terms], params)
    torch.testing.assert_close(our_losses.mean(), trl_loss, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        if key in our_metrics:
            assert our_metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def _optional(objective):
    return {i for s in objective.specs for i in s.optional_inputs}


@pytest.fixture(scope="module")
def kto(world):
    from trl import KTOConfig, KTOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = KTOConfig(per_device_train_batch_size=8, train_sampling_strategy="sequential", **world["common"])
        trainer = KTOTrainer(model=copy.deepcopy(world["model"]), ref_model=copy.deepcopy(world["model"]), args=args,
                             train_dataset=world["unpaired"], processing_class=world["tokenizer"])  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    logps, _ = policy_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    kl_logps = trainer._compute_kl_logps(trainer.model, batch)  # TRL's mismatched-pair log-probs
    g = torch.Generator().manual_seed(2)
    ref = logps + 2 * torch.randn(logps.shape, generator=g)
    ref_kl = kl_logps - 1.0 + torch.randn(kl_logps.shape, generator=g)  # mean KL estimate > 0: z is not clamped
    trainer.precompute_ref_logps = True
    batch = {**batch, "ref_logps": ref, "ref_KL_logps": ref_kl}
    return trainer, batch, dict(logratios=logps - ref, desirable=batch["label"].bool(), kl_logratios=kl_logps - ref_kl)


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_kto_losses_match_trl(kto, name):
    trainer, batch, inputs = kto
    trainer.loss_type, trainer.calculate_KL = name, name == "kto"
    trainer.beta, trainer.desirable_weight, trainer.undesirable_weight = BETA, 1.3, 0.7
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    spec = L.get(name)
    ours, metrics = spec(**{k: v for k, v in inputs.items() if k in spec.inputs}, beta=BETA, desirable_weight=1.3,
                         undesirable_weight=0.7)  # fmt: skip
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected") + (("kl",) if name == "kto" else ()):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    if name == "kto":
        assert trl_metrics["kl"] > 0


def random_policy(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -1 - 19 * torch.rand(n, generator=g), -1 - 19 * torch.rand(n, generator=g)
    n_c, n_r = torch.randint(1, 9, (n,), generator=g).float(), torch.randint(1, 9, (n,), generator=g).float()
    return pc, pr, n_c, n_r


@pytest.mark.parametrize("loss_type, label_smoothing", [("simpo", 0.0), ("simpo", 0.1), ("sigmoid", 0.0),
                                                        ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])  # fmt: skip
def test_cpo_and_simpo_match_trl(world, loss_type, label_smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = CPOConfig(loss_type=loss_type, beta=BETA, label_smoothing=label_smoothing, simpo_gamma=0.3,
                         **world["common"])  # fmt: skip
        trainer = CPOTrainer(model=copy.deepcopy(world["model"]), args=args, train_dataset=world["pairs"],
                             processing_class=world["tokenizer"])  # fmt: skip
    pc, pr, n_c, n_r = random_policy(3)
    # TRL's CPO feeds length-averaged log-probs to simpo and ipo, summed ones to sigmoid and hinge.
    averaged = loss_type in ("simpo", "ipo")
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(pc / n_c if averaged else pc, pr / n_r if averaged else pr)
    kw = dict(beta=BETA)
    if loss_type == "simpo":
        ours, m = L.get("simpo")(chosen_logps=pc, rejected_logps=pr, chosen_lengths=n_c, rejected_lengths=n_r,
                                 simpo_gamma=0.3, label_smoothing=label_smoothing, **kw)  # fmt: skip
    elif loss_type == "sigmoid":  # CPO's preference term; its NLL term is the token-mean NLL checked via "sft"
        ours, m = L.get("cpo")(chosen_logps=pc, rejected_logps=pr, chosen_lengths=n_c, cpo_alpha=0.0,
                               label_smoothing=label_smoothing, **kw)  # fmt: skip
    elif loss_type == "hinge":  # reference-free: the log-ratios are the policy log-likelihoods
        ours, m = L.get("hinge")(chosen_logratios=pc, rejected_logratios=pr, **kw)
    else:
        ours, m = L.get("ipo")(chosen_logratios=pc, rejected_logratios=pr, chosen_lengths=n_c, rejected_lengths=n_r,
                               **kw)  # fmt: skip
    torch.testing.assert_close(ours, trl_losses, rtol=1e-5, atol=1e-6)
    if loss_type != "ipo":  # our ipo logs beta * summed log-ratios; TRL's CPO logs beta * averaged ones
        assert m["rewards/chosen"].item() == pytest.approx(trl_chosen.mean().item(), rel=1e-5)
        assert m["rewards/rejected"].item() == pytest.approx(trl_rejected.mean().item(), rel=1e-5)


def test_orpo_matches_trl(world):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=copy.deepcopy(world["model"]), args=ORPOConfig(beta=BETA, **world["common"]),
                              train_dataset=world["pairs"], processing_class=world["tokenizer"])  # fmt: skip
    pc, pr, n_c, n_r = random_policy(4)
    trl_losses, trl_chosen, _, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(pc / n_c, pr / n_r)
    ours, m = L.get("orpo")(chosen_logps=pc, rejected_logps=pr, chosen_lengths=n_c, rejected_lengths=n_r, beta=BETA)
    nll, _ = L.get("sft")(chosen_logps=pc, chosen_lengths=n_c)
    # ORPO = NLL - beta * log sigma(log odds ratio); TRL returns the second term as +beta * log sigma(...).
    torch.testing.assert_close(ours - nll, -trl_losses, rtol=1e-5, atol=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(trl_ratio.item(), rel=1e-5)
    assert m["log_odds_chosen"].item() == pytest.approx(trl_log_odds.item(), rel=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(trl_chosen.mean().item(), rel=1e-5)
