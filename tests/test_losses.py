"""visalign.losses: exact values (fp64) against each paper's formula, written out here with ``math`` on scalars."""

from __future__ import annotations

import math
import re

import pytest
import torch

from visalign import losses as L
from visalign.errors import ConfigError, VisalignError

F64 = torch.float64

# Pairs chosen to cover Delta = 0, both signs, and r_c, r_r of both signs.
R_C = [0.0, 1.5, -2.0, 3.0, -0.5, 0.7]
R_R = [0.0, -1.0, 1.0, 3.0, 2.5, -4.0]
N_C = [1.0, 3.0, 2.0, 5.0, 4.0, 1.0]
N_R = [2.0, 1.0, 2.0, 3.0, 6.0, 7.0]
BETA = 0.3


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def ls(x: float) -> float:
    """log sigmoid(x), written independently of torch."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def f_score(r: float, kind: str, alpha: float = 0.5) -> float:
    return {
        "reverse_kl": r,
        "forward_kl": 1 - math.exp(-r),
        "js_divergence": math.log(2) + ls(r),
        "alpha_divergence": (math.exp((alpha - 1) * r) - 1) / (alpha - 1),
    }[kind]


# name -> (formula on one pair, extra hyper-parameters). ``d`` = beta * Delta.
PAIRWISE = {
    "sigmoid": (lambda rc, rr, b: -ls(b * (rc - rr)), {}),
    "hinge": (lambda rc, rr, b: max(0.0, 1 - b * (rc - rr)), {}),
    "ipo": (lambda rc, rr, b: (rc - rr - 1 / (2 * b)) ** 2, {}),
    "robust": (lambda rc, rr, b: (-(1 - 0.2) * ls(b * (rc - rr)) + 0.2 * ls(-b * (rc - rr))) / (1 - 0.4),
               {"label_smoothing": 0.2}),
    "cdpo": (lambda rc, rr, b: -(1 - 0.2) * ls(b * (rc - rr)) - 0.2 * ls(-b * (rc - rr)), {"label_smoothing": 0.2}),
    "exo_pair": (lambda rc, rr, b: sig(b * (rc - rr)) * (ls(b * (rc - rr)) - math.log(1 - 1e-3))
                 + sig(-b * (rc - rr)) * (ls(-b * (rc - rr)) - math.log(1e-3)), {"label_smoothing": 1e-3}),
    "nca_pair": (lambda rc, rr, b: -ls(b * rc) - 0.5 * ls(-b * rc) - 0.5 * ls(-b * rr), {}),
    "bco_pair": (lambda rc, rr, b: -ls(b * rc) - ls(-b * rr), {}),
    "sppo_hard": (lambda rc, rr, b: (rc - 0.5 / b) ** 2 + (rr + 0.5 / b) ** 2, {}),
    "apo_zero": (lambda rc, rr, b: 1 - sig(b * rc) + sig(b * rr), {}),
    "apo_down": (lambda rc, rr, b: sig(b * rc) + 1 - sig(b * (rc - rr)), {}),
    "discopop": (lambda rc, rr, b: (1 - sig(b * (rc - rr) / 0.05)) * -ls(b * (rc - rr))
                 + sig(b * (rc - rr) / 0.05) * math.exp(-b * (rc - rr)), {}),
    "poly": (lambda rc, rr, b: -ls(b * (rc - rr)) + 0.7 * (1 - sig(b * (rc - rr))), {"poly_alpha": 0.7}),
}  # fmt: skip


def pair_inputs(dtype=F64, requires_grad=False):
    r_c, r_r = t(R_C, dtype), t(R_R, dtype)
    return r_c.requires_grad_(requires_grad), r_r.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


def test_registry_has_trl_names_and_every_algorithm():
    trl_names = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "kto",
                 "apo_zero_unpaired"}  # fmt: skip
    ours = {"cdpo", "simpo", "cpo", "orpo", "npo", "lipo_lambda", "pro", "rankdpo", "poly", "soft", "mapo"}
    assert trl_names | ours <= set(L.available())
    assert L.available("listwise") == ["lipo_lambda", "pro", "rankdpo", "rwr"]
    assert L.get("sigmoid").params == {"beta": 0.1, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}


# ---------------------------------------------------------------------------------------------------------------
# Exact values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAIRWISE))
def test_pairwise_exact_values(name):
    formula, extra = PAIRWISE[name]
    r_c, r_r = pair_inputs()
    losses, metrics = L.get(name)(chosen_logratios=r_c, rejected_logratios=r_r, beta=BETA, **extra)
    expected = t([formula(a, b, BETA) for a, b in zip(R_C, R_R)])
    assert losses.dtype == F64
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    # TRL's metrics: beta * r, accuracy counts strict wins, margins.
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * sum(R_C) / 6, abs=1e-14)
    assert metrics["rewards/rejected"].item() == pytest.approx(BETA * sum(R_R) / 6, abs=1e-14)
    assert metrics["rewards/accuracies"].item() == pytest.approx(2 / 6)  # two strict wins, two ties
    assert metrics["rewards/margins"].item() == pytest.approx(BETA * (sum(R_C) - sum(R_R)) / 6, abs=1e-14)


def test_literal_values():
    one = t([1.0])
    zero = t([0.0])
    # -log sigma(1) = log(1 + e^-1)
    assert L.get("sigmoid")(chosen_logratios=one, rejected_logratios=zero, beta=1.0)[0].item() == pytest.approx(
        0.31326168751822286, abs=1e-15
    )
    assert L.get("hinge")(chosen_logratios=one, rejected_logratios=zero, beta=0.5)[0].item() == 0.5
    # IPO at Delta = 0, beta = 0.5: (0 - 1)^2
    assert L.get("ipo")(chosen_logratios=zero, rejected_logratios=zero, beta=0.5)[0].item() == 1.0
    # SPPO at r = 0: 2 * (1/(2 beta))^2
    assert L.get("sppo_hard")(chosen_logratios=zero, rejected_logratios=zero, beta=0.5)[0].item() == 2.0
    # APO-zero at r = 0: 1 - 1/2 + 1/2
    assert L.get("apo_zero")(chosen_logratios=zero, rejected_logratios=zero)[0].item() == 1.0


@pytest.mark.parametrize("beta", [0.1, 1.0, 5000.0])
@pytest.mark.parametrize("name", ["sigmoid", "robust", "poly", "soft"])
def test_dpo_family_at_zero_margin_is_log2(name, beta):
    r = t([0.0, 2.0, -3.0])
    extra = {"preference_probs": t([1.0, 1.0, 1.0])} if name == "soft" else {}
    extra |= {"poly_alpha": 0.0} if name == "poly" else {}
    losses, _ = L.get(name)(chosen_logratios=r, rejected_logratios=r, beta=beta, **extra)
    torch.testing.assert_close(losses, torch.full_like(r, math.log(2)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", L.F_DIVERGENCES)
def test_f_divergence_scores_and_fdpo(kind):
    r = t(R_C)
    expected = t([f_score(x, kind) for x in R_C])
    torch.testing.assert_close(L.f_divergence_score(r, kind, 0.5), expected, rtol=1e-12, atol=1e-12)
    r_c, r_r = pair_inputs()
    losses, metrics = L.get("sigmoid")(chosen_logratios=r_c, rejected_logratios=r_r, beta=BETA, f_divergence_type=kind)
    expected = t([-ls(BETA * (f_score(a, kind) - f_score(b, kind))) for a, b in zip(R_C, R_R)])
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    # Rewards are logged on the raw log-ratios whatever the divergence (as TRL).
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * sum(R_C) / 6)
    # alpha = 1 is the reverse-KL limit.
    torch.testing.assert_close(L.f_divergence_score(r, "alpha_divergence", 1.0), r)


def test_length_normalised_losses():
    r_c, r_r, n_c, n_r = *pair_inputs(), t(N_C), t(N_R)
    ipo, _ = L.get("ipo")(chosen_logratios=r_c, rejected_logratios=r_r, chosen_lengths=n_c, rejected_lengths=n_r,
                          beta=BETA)  # fmt: skip
    norm, _ = L.get("sigmoid_norm")(chosen_logratios=r_c, rejected_logratios=r_r, chosen_lengths=n_c,
                                    rejected_lengths=n_r, beta=BETA)  # fmt: skip
    cases = list(zip(R_C, R_R, N_C, N_R))
    torch.testing.assert_close(
        ipo, t([(a / m - b / n - 1 / (2 * BETA)) ** 2 for a, b, m, n in cases]), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(norm, t([-ls(BETA * (a / m - b / n)) for a, b, m, n in cases]), rtol=1e-12, atol=0)
    # Integer token counts are accepted.
    again, _ = L.get("sigmoid_norm")(chosen_logratios=r_c, rejected_logratios=r_r, chosen_lengths=n_c.long(),
                                     rejected_lengths=n_r.long(), beta=BETA)  # fmt: skip
    torch.testing.assert_close(again, norm)


def test_aot_sorts_margins_over_the_batch():
    pc, pr = t([-1.0, -5.0, -2.0]), t([-3.0, -1.0, -2.5])
    rc, rr = t([-2.0, -2.0, -2.0]), t([-1.0, -4.0, -2.0])
    losses, metrics = L.get("aot")(chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                   beta=BETA, label_smoothing=0.1)  # fmt: skip
    d = [a - b for a, b in zip(sorted([2.0, -4.0, 0.5]), sorted([-1.0, 2.0, 0.0]))]
    torch.testing.assert_close(losses, t([-0.9 * ls(BETA * x) - 0.1 * ls(-BETA * x) for x in d]), rtol=1e-12, atol=0)
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * (1 - 3 + 0) / 3)
    unpaired, _ = L.get("aot_unpaired")(chosen_logratios=pc, rejected_logratios=pr, beta=BETA)
    d = [a - b for a, b in zip(sorted([-1.0, -5.0, -2.0]), sorted([-3.0, -1.0, -2.5]))]
    torch.testing.assert_close(unpaired, t([-ls(BETA * x) for x in d]), rtol=1e-12, atol=0)


def test_soft_label_dpo():
    r_c, r_r = pair_inputs()
    p = [1.0, 0.5, 0.9, 0.0, 0.3, 0.75]
    losses, _ = L.get("soft")(chosen_logratios=r_c, rejected_logratios=r_r, preference_probs=t(p), beta=BETA)
    expected = [-(q * ls(BETA * (a - b)) + (1 - q) * ls(-BETA * (a - b))) for a, b, q in zip(R_C, R_R, p)]
    torch.testing.assert_close(losses, t(expected), rtol=1e-12, atol=1e-12)
    # p = 1 is DPO.
    dpo, _ = L.get("sigmoid")(chosen_logratios=r_c, rejected_logratios=r_r, beta=BETA)
    torch.testing.assert_close(losses[0], dpo[0])


def test_reference_free_losses():
    pc, pr, n_c, n_r = t([-3.0, -10.0, -0.5]), t([-4.0, -6.0, -2.0]), t([3.0, 5.0, 1.0]), t([2.0, 4.0, 2.0])
    kw = dict(chosen_logps=pc, rejected_logps=pr, chosen_lengths=n_c, rejected_lengths=n_r)
    rows = list(zip(pc.tolist(), pr.tolist(), n_c.tolist(), n_r.tolist()))
    nll = [-a * 3 / 9.0 for a in pc.tolist()]  # -logps_i * B / sum(n_c): batch mean = token-level NLL

    simpo, m = L.get("simpo")(**kw, beta=2.0, simpo_gamma=0.5)
    torch.testing.assert_close(
        simpo, t([-ls(2.0 * (a / m_ - b / n) - 0.5) for a, b, m_, n in rows]), rtol=1e-12, atol=0
    )
    assert m["rewards/chosen"].item() == pytest.approx(2.0 * (-1.0 - 2.0 - 0.5) / 3)

    cpo, m = L.get("cpo")(chosen_logps=pc, rejected_logps=pr, chosen_lengths=n_c, beta=0.1, cpo_alpha=0.5)
    torch.testing.assert_close(cpo, t([-ls(0.1 * (a - b)) + 0.5 * q for (a, b, _, _), q in zip(rows, nll)]))
    assert m["nll_loss"].item() == pytest.approx(13.5 / 9)

    def log_odds(a):  # log(p / (1 - p)), p = e^a
        return a - math.log(1 - math.exp(a))

    orpo, m = L.get("orpo")(**kw, beta=0.2)
    ratio = [ls(log_odds(a / m_) - log_odds(b / n)) for a, b, m_, n in rows]
    torch.testing.assert_close(orpo, t([q - 0.2 * x for q, x in zip(nll, ratio)]), rtol=1e-12, atol=0)
    assert m["log_odds_ratio"].item() == pytest.approx(sum(ratio) / 3)

    sft, m = L.get("sft")(chosen_logps=pc, chosen_lengths=n_c)
    torch.testing.assert_close(sft, t(nll))
    assert sft.mean().item() == pytest.approx(13.5 / 9)  # sum of -logps over all chosen tokens / token count


def test_kto_exact_values_and_reference_point():
    r = t([1.0, -2.0, 0.5, 3.0])
    desirable = torch.tensor([True, False, True, False])
    kl = t([0.2, 0.6])  # z = 0.4
    losses, m = L.get("kto")(logratios=r, desirable=desirable, kl_logratios=kl, beta=0.5, desirable_weight=1.5,
                             undesirable_weight=0.5)  # fmt: skip
    z = 0.4
    expected = [1.5 * (1 - sig(0.5 * (1.0 - z))), 0.5 * (1 - sig(0.5 * (z + 2.0))), 1.5 * (1 - sig(0.5 * (0.5 - z))),
                0.5 * (1 - sig(0.5 * (z - 3.0)))]  # fmt: skip
    torch.testing.assert_close(losses, t(expected), rtol=1e-12, atol=0)
    assert m["kl"].item() == pytest.approx(0.4)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * 0.75) and m["rewards/rejected"].item() == pytest.approx(
        0.25
    )
    # A negative KL estimate is clamped to 0, and z carries no gradient.
    r.requires_grad_()
    kl = t([-1.0, -3.0]).requires_grad_()
    losses, m = L.get("kto")(logratios=r, desirable=desirable, kl_logratios=kl, beta=0.5)
    assert m["kl"].item() == 0.0
    assert losses[0].item() == pytest.approx(1 - sig(0.5))
    losses.sum().backward()
    assert kl.grad is None or not kl.grad.any()


def test_apo_zero_unpaired_and_npo():
    r, desirable = t([1.0, -2.0, 0.5]), torch.tensor([True, False, False])
    losses, _ = L.get("apo_zero_unpaired")(logratios=r, desirable=desirable, beta=0.5)
    torch.testing.assert_close(losses, t([1 - sig(0.5), sig(-1.0), sig(0.25)]))
    losses, m = L.get("npo")(logratios=r, beta=0.5)
    torch.testing.assert_close(losses, t([-(2 / 0.5) * ls(-0.5 * x) for x in [1.0, -2.0, 0.5]]), rtol=1e-12, atol=0)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * -0.5 / 3)


def lambda_loss_reference(r: list[float], psi: list[float], beta: float) -> float:
    """LiPO-lambda for one list by explicit double loop (gain 2^psi - 1, discount log2(1 + rank))."""
    s = [beta * x for x in r]
    order = sorted(range(len(s)), key=lambda i: -s[i])
    rank = {i: pos + 1 for pos, i in enumerate(order)}
    total = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if psi[i] > psi[j]:
                weight = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1)) * abs(
                    1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j])
                )
                total += weight * -ls(s[i] - s[j])
    return total


@pytest.mark.parametrize("name", ["lipo_lambda", "rankdpo"])
def test_lambda_weighted_listwise_losses(name):
    r = [[0.5, -1.0, 2.0, 0.1], [1.0, 1.0, -0.5, 3.0]]
    psi = [[0.9, 0.2, 0.5, 0.2], [0.1, 0.7, 0.4, 1.0]]
    losses, m = L.get(name)(logratios=t(r), scores=t(psi), beta=0.7)
    torch.testing.assert_close(
        losses, t([lambda_loss_reference(a, b, 0.7) for a, b in zip(r, psi)]), rtol=1e-12, atol=0
    )
    # K = 2, chosen ranked first by the model: Delta = |1 - 0| * |1/log2(2) - 1/log2(3)|.
    two, _ = L.get(name)(logratios=t([[1.0, 0.0]]), scores=t([[1.0, 0.0]]), beta=1.0)
    assert two.item() == pytest.approx((1 - 1 / math.log2(3)) * -ls(1.0), abs=1e-15)


def pro_reference(pi: list[float], n: list[float], psi: list[float], sft_weight: float, temperature: bool) -> float:
    """PRO for one list by explicit loops over the ranking (Song et al. 2024, Eq. 5, official code's temperatures)."""
    idx = sorted(range(len(psi)), key=lambda i: -psi[i])
    a = [pi[i] / n[i] for i in idx]
    p = [psi[i] for i in idx]
    total = 0.0
    for k in range(len(a) - 1):
        temps = [p[k] - p[i] if temperature else 1.0 for i in range(k + 1, len(a))]
        t_pos = max(temps) if temperature else 1.0
        denom = math.exp(a[k] * t_pos) + sum(math.exp(a[i] * tt) for i, tt in zip(range(k + 1, len(a)), temps))
        total += -(a[k] * t_pos - math.log(denom))
    return total + sft_weight * (len(a) - 1) ** 2 * -pi[idx[0]]


@pytest.mark.parametrize("temperature", [True, False])
def test_pro(temperature):
    pi = [[-3.0, -1.0, -6.0], [-2.0, -4.0, -1.0]]
    n = [[3.0, 1.0, 2.0], [2.0, 2.0, 4.0]]
    psi = [[0.2, 0.9, 0.5], [1.5, 0.3, 0.8]]
    losses, _ = L.get("pro")(logps=t(pi), lengths=t(n), scores=t(psi), sft_weight=0.05, reward_temperature=temperature)
    expected = [pro_reference(a, b, c, 0.05, temperature) for a, b, c in zip(pi, n, psi)]
    torch.testing.assert_close(losses, t(expected), rtol=1e-12, atol=0)
    # K = 2, unit temperatures, no SFT term: a softmax over two = -log sigma(a_best - a_other).
    two, _ = L.get("pro")(logps=t([[-2.0, -1.0]]), lengths=t([[1.0, 1.0]]), scores=t([[1.0, 0.0]]), sft_weight=0.0,
                          reward_temperature=False)  # fmt: skip
    assert two.item() == pytest.approx(-ls(-1.0))


def test_mapo_exact_and_direction():
    e_w, e_l = t([0.10, 0.30, 0.20]), t([0.20, 0.10, 0.20])

    def f(e, s=0.5):
        return s * e / (math.exp(s * e) - 1)

    losses, m = L.get("mapo")(chosen_errors=e_w, rejected_errors=e_l, beta=0.1, mapo_snr=0.5, num_train_timesteps=1000)
    expected = [w - 0.1 * ls(1000 * (f(w) - f(x))) for w, x in zip(e_w.tolist(), e_l.tolist())]
    torch.testing.assert_close(losses, t(expected), rtol=1e-12, atol=0)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)
    # Lowering e_w relative to e_l lowers the loss (the sign one public port flipped), at every scale.
    for e_l_value in [0.05, 0.2, 1.0]:
        grid = t([e_l_value * k for k in (0.5, 0.8, 1.0, 1.25, 2.0)])
        values, _ = L.get("mapo")(chosen_errors=grid, rejected_errors=torch.full_like(grid, e_l_value))
        assert bool((values[1:] > values[:-1]).all()), values
        raised, _ = L.get("mapo")(chosen_errors=torch.full_like(grid, e_l_value), rejected_errors=grid)
        # Raising e_l instead lowers it too, down to the SFT term e_w once the margin term saturates.
        assert bool((raised[1:] <= raised[:-1]).all()) and raised[-1] < raised[0], raised
    # f(0) = 1 (the limit), finite loss and gradient at zero error.
    zero = t([0.0]).requires_grad_()
    loss, _ = L.get("mapo")(chosen_errors=zero, rejected_errors=t([0.0]))
    loss.sum().backward()
    assert torch.isfinite(zero.grad).all() and loss.item() == pytest.approx(0.1 * math.log(2))


def test_diffusion_logratios_make_sigmoid_diffusion_dpo():
    e_w, e_l, ref_w, ref_l = t([0.11, 0.52]), t([0.13, 0.40]), t([0.12, 0.50]), t([0.12, 0.45])
    r_w, r_l = L.diffusion_logratios(e_w, ref_w), L.diffusion_logratios(e_l, ref_l)
    torch.testing.assert_close(r_w, -0.5 * (e_w - ref_w))
    losses, m = L.get("sigmoid")(chosen_logratios=r_w, rejected_logratios=r_l, beta=5000.0)
    # Wallace et al. 2024, Eq. 14 with mean errors: -log sigma(-beta/2 ((e_w - e_l) - (e_ref_w - e_ref_l)))
    expected = [-ls(-2500.0 * ((a - b) - (c - d))) for a, b, c, d in zip([0.11, 0.52], [0.13, 0.40], [0.12, 0.50],
                                                                            [0.12, 0.45])]  # fmt: skip
    torch.testing.assert_close(losses, t(expected), rtol=1e-12, atol=1e-12)
    assert m["rewards/accuracies"].item() == 0.5  # implicit accuracy (e_w - e_ref_w) < (e_l - e_ref_l)


# ---------------------------------------------------------------------------------------------------------------
# Symmetry, monotonicity, gradients
# ---------------------------------------------------------------------------------------------------------------


def test_swapping_chosen_and_rejected_negates_delta():
    r_c, r_r = pair_inputs()
    delta = r_c - r_r

    def call(name, a, b, **kw):
        return L.get(name)(chosen_logratios=a, rejected_logratios=b, beta=BETA, **kw)[0]

    # DPO: loss(Delta) - loss(-Delta) = -beta Delta exactly.
    torch.testing.assert_close(call("sigmoid", r_c, r_r) - call("sigmoid", r_r, r_c), -BETA * delta)
    # Robust DPO: the same, divided by (1 - 2 eps).
    torch.testing.assert_close(call("robust", r_c, r_r, label_smoothing=0.2) - call("robust", r_r, r_c,
                               label_smoothing=0.2), -BETA * delta / 0.6)  # fmt: skip
    # Hinge and IPO see -Delta.
    torch.testing.assert_close(call("hinge", r_r, r_c), torch.relu(1 + BETA * delta))
    torch.testing.assert_close(call("ipo", r_r, r_c), (-delta - 1 / (2 * BETA)) ** 2)
    # Every Delta-only loss depends on the pair only through Delta: swapped == (0, Delta) reversed.
    for name in ["sigmoid", "hinge", "ipo", "robust", "cdpo", "exo_pair", "discopop", "poly"]:
        torch.testing.assert_close(call(name, r_r, r_c), call(name, torch.zeros_like(delta), delta))
    # Soft labels: swapping the pair and p -> 1 - p leaves the loss unchanged.
    p = t([0.9, 0.1, 0.5, 0.3, 0.7, 1.0])
    soft = L.get("soft")
    torch.testing.assert_close(
        soft(chosen_logratios=r_c, rejected_logratios=r_r, preference_probs=p)[0],
        soft(chosen_logratios=r_r, rejected_logratios=r_c, preference_probs=1 - p)[0],
    )
    # Metrics swap too.
    m1 = L.get("sigmoid")(chosen_logratios=r_c, rejected_logratios=r_r)[1]
    m2 = L.get("sigmoid")(chosen_logratios=r_r, rejected_logratios=r_c)[1]
    assert m1["rewards/chosen"] == m2["rewards/rejected"] and m1["rewards/margins"] == -m2["rewards/margins"]


@pytest.mark.parametrize("name, extra", [("sigmoid", {}), ("robust", {"label_smoothing": 0.3}), ("hinge", {}),
                                         ("poly", {"poly_alpha": 1.0}),
                                         ("poly", {"poly_alpha": -0.5})])  # fmt: skip
def test_monotone_non_increasing_in_delta(name, extra):
    delta = torch.linspace(-30, 30, 601, dtype=F64)
    losses, _ = L.get(name)(chosen_logratios=delta, rejected_logratios=torch.zeros_like(delta), beta=0.5, **extra)
    assert bool((losses[1:] <= losses[:-1] + 1e-12).all())


@pytest.mark.parametrize("name", ["cdpo", "exo_pair"])
def test_smoothed_losses_are_minimal_at_the_target_probability(name):
    # With smoothed labels the optimum is not Delta -> inf but sigma(beta Delta) = 1 - eps (cDPO; EXO, Eq. 16).
    eps, beta = 0.1, 0.5
    delta = torch.linspace(-20, 20, 40001, dtype=F64)
    losses, _ = L.get(name)(chosen_logratios=delta, rejected_logratios=torch.zeros_like(delta), beta=beta,
                            label_smoothing=eps)  # fmt: skip
    assert delta[losses.argmin()].item() == pytest.approx(math.log((1 - eps) / eps) / beta, abs=2e-3)


def pair_layout_inputs(spec, sign: float, dtype=torch.float32):
    """Inputs for one pair-layout loss whose margins are |beta Delta| = 50 (sign picks the direction)."""
    big = 500.0 * sign  # beta = 0.1 -> beta * (r_c - r_r) = 0.1 * 2 * 250 = 50
    values = {
        "chosen_logratios": t([big / 2, 1.0], dtype), "rejected_logratios": t([-big / 2, -1.0], dtype),
        "chosen_logps": t([-1.0, -2.0], dtype) if sign > 0 else t([-501.0, -2.0], dtype),
        "rejected_logps": t([-501.0, -1.0], dtype) if sign > 0 else t([-1.0, -1.0], dtype),
        "ref_chosen_logps": t([-251.0, -2.0], dtype), "ref_rejected_logps": t([-251.0, -3.0], dtype),
        "chosen_lengths": t([1.0, 2.0], dtype), "rejected_lengths": t([1.0, 3.0], dtype),
        "preference_probs": t([0.8, 0.5], dtype),
        "chosen_errors": t([0.001, 0.3], dtype) if sign > 0 else t([5.0, 0.3], dtype),
        "rejected_errors": t([5.0, 0.3], dtype) if sign > 0 else t([0.001, 0.3], dtype),
    }  # fmt: skip
    return {k: v.requires_grad_(k not in ("chosen_lengths", "rejected_lengths", "preference_probs"))
            for k, v in values.items() if k in spec.inputs or k in spec.optional_inputs}  # fmt: skip


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", [n for n in L.available() if L.get(n).kind in ("pairwise", "reference_free",
                                                                                 "errors", "sft")])  # fmt: skip
def test_gradients_finite_at_large_margins(name, sign):
    spec = L.get(name)
    inputs = pair_layout_inputs(spec, sign)
    params = {"beta": 0.1} if "beta" in spec.params else {}
    losses, _ = spec(**inputs, **params)
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    for key, value in inputs.items():
        if value.requires_grad:
            assert value.grad is not None and torch.isfinite(value.grad).all(), (key, value.grad)


def test_gradients_finite_at_large_margins_unpaired_and_listwise():
    r = t([250.0, -250.0, 500.0], torch.float32).requires_grad_()
    cases = [
        ("kto", {"desirable": torch.tensor([True, False, True]), "kl_logratios": t([1.0], torch.float32)}),
        ("apo_zero_unpaired", {"desirable": torch.tensor([True, False, False])}),
        ("npo", {}),
    ]
    for name, kw in cases:
        losses, _ = L.get(name)(logratios=r, beta=0.2, **kw)
        (grad,) = torch.autograd.grad(losses.sum(), r)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all(), name
    lr = t([[500.0, -500.0, 0.0]], torch.float32).requires_grad_()
    for name in ["lipo_lambda", "rankdpo"]:
        losses, _ = L.get(name)(logratios=lr, scores=t([[0.0, 1.0, 0.5]], torch.float32), beta=0.1)
        (grad,) = torch.autograd.grad(losses.sum(), lr)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all(), name
    lp = t([[-1.0, -500.0, -900.0]], torch.float32).requires_grad_()
    losses, _ = L.get("pro")(logps=lp, lengths=t([[1.0, 1.0, 1.0]]), scores=t([[0.0, 1.0, 0.5]]))
    (grad,) = torch.autograd.grad(losses.sum(), lp)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()


def test_rwr_is_a_softmax_weighted_sum_of_errors():
    errors = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]], dtype=F64, requires_grad=True)
    scores = torch.tensor([[0.0, math.log(2.0), math.log(3.0)], [1.0, -math.inf, 1.0]], dtype=F64)
    losses, metrics = L.get("rwr")(errors=errors, scores=scores, temperature=1.0)
    # weights 1/6, 2/6, 3/6 and 1/2, 0, 1/2 (the -inf sample is invalid)
    assert torch.allclose(losses, torch.tensor([(1 + 4 + 9) / 6, 0.5 * 0.5 + 0.5 * 4.0], dtype=F64))
    losses.sum().backward()
    assert torch.allclose(errors.grad, torch.tensor([[1 / 6, 2 / 6, 3 / 6], [0.5, 0.0, 0.5]], dtype=F64))
    assert metrics["rwr/max_weight"].item() == pytest.approx((0.5 + 0.5) / 2)
    hot, _ = L.get("rwr")(errors=errors.detach(), scores=scores, temperature=1e3)  # nearly uniform over valid
    cold, _ = L.get("rwr")(errors=errors.detach(), scores=scores, temperature=1e-3)  # the best sample alone
    assert hot[0].item() == pytest.approx(2.0, abs=1e-2) and cold[0].item() == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        L.get("rwr").validate(temperature=0.0)
    with pytest.raises(VisalignError, match="at least one finite score"):
        L.get("rwr")(errors=errors, scores=torch.full((2, 3), -math.inf, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------
# One contract test over every registry entry
# ---------------------------------------------------------------------------------------------------------------


def contract_inputs(spec, dtype):
    """Random valid inputs for any registered loss, by the names its signature uses."""
    g = torch.Generator().manual_seed(0)
    b, k = 4, 3

    def rand(*shape, lo=-2.0, hi=2.0):
        return (torch.rand(*shape, generator=g, dtype=F64) * (hi - lo) + lo).to(dtype)

    pool = {
        "chosen_logratios": rand(b), "rejected_logratios": rand(b),
        "chosen_logps": rand(b, lo=-20, hi=-1), "rejected_logps": rand(b, lo=-20, hi=-1),
        "ref_chosen_logps": rand(b, lo=-20, hi=-1), "ref_rejected_logps": rand(b, lo=-20, hi=-1),
        "chosen_lengths": torch.tensor([3, 5, 2, 7]), "rejected_lengths": torch.tensor([4, 1, 6, 2]),
        "preference_probs": rand(b, lo=0, hi=1),
        "chosen_errors": rand(b, lo=0, hi=1), "rejected_errors": rand(b, lo=0, hi=1),
        "logratios": rand(b, k) if spec.kind == "listwise" else rand(b),
        "desirable": torch.tensor([True, False, True, False]), "kl_logratios": rand(b),
        "logps": rand(b, k, lo=-20, hi=-1), "lengths": torch.randint(1, 9, (b, k), generator=g),
        "scores": rand(b, k, lo=0, hi=1), "errors": rand(b, k, lo=0, hi=1),
    }  # fmt: skip
    inputs = {name: pool[name] for name in spec.inputs}
    for name, value in inputs.items():
        if value.is_floating_point() and name not in ("preference_probs", "scores", "kl_logratios"):
            value.requires_grad_()
    return inputs


@pytest.mark.parametrize("name", L.available())
def test_contract(name):
    spec = L.get(name)
    assert spec.summary and spec.kind in L.KINDS and set(spec.inputs) <= L.TENSOR_INPUTS
    assert re.search(r"\b20\d\d\b|TRL", spec.fn.__doc__ or ""), "the docstring cites its paper (author, year, Eq.)"
    spec.validate()  # defaults pass their own checks
    for dtype, out_dtype in [(F64, F64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        inputs = contract_inputs(spec, dtype)
        losses, metrics = spec(**inputs)
        n = next(iter(inputs.values())).shape[0]
        assert losses.shape == (n,) and losses.dtype == out_dtype, (losses.shape, losses.dtype)
        assert torch.isfinite(losses).all()
        assert metrics and all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad and
                               torch.isfinite(v) for v in metrics.values()), metrics  # fmt: skip
        if spec.kind == "pairwise":
            assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(metrics)
        grads = torch.autograd.grad(losses.mean(), [v for v in inputs.values() if v.requires_grad], allow_unused=True)
        assert any(g_ is not None and g_.abs().sum() > 0 for g_ in grads)
        assert all(g_ is None or torch.isfinite(g_).all() for g_ in grads)
    # The registry entry builds alone, with weight 1, to the same values.
    built, _ = L.build(name)(**contract_inputs(spec, F64))
    torch.testing.assert_close(built, spec(**contract_inputs(spec, F64))[0])


# ---------------------------------------------------------------------------------------------------------------
# Combinations
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_combination_matches_manual_sum():
    r_c, r_r = pair_inputs()
    logps, n = t([-3.0, -4.0, -1.0, -8.0, -2.0, -5.0]), t(N_C)
    inputs = dict(chosen_logratios=r_c, rejected_logratios=r_r, chosen_logps=logps, chosen_lengths=n)
    objective = L.build("sigmoid:1.0, bco_pair:0.5, sft", beta=BETA)
    assert objective.terms == [("sigmoid", 1.0), ("bco_pair", 0.5), ("sft", 1.0)]
    assert objective.inputs == {"chosen_logratios", "rejected_logratios", "chosen_logps", "chosen_lengths"}
    losses, metrics = objective(**inputs)
    expected = (L.get("sigmoid")(chosen_logratios=r_c, rejected_logratios=r_r, beta=BETA)[0]
                + 0.5 * L.get("bco_pair")(chosen_logratios=r_c, rejected_logratios=r_r, beta=BETA)[0]
                + L.get("sft")(chosen_logps=logps, chosen_lengths=n)[0])  # fmt: skip
    torch.testing.assert_close(losses, expected)
    assert {"loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/margins", "nll_loss"} <= set(metrics)
    same, _ = L.build([("sigmoid", 1.0), ("bco_pair", 0.5), "sft"], beta=BETA)(**inputs)
    torch.testing.assert_close(same, losses)
    # Shared parameters go to every term that takes them; each term keeps its own defaults otherwise.
    mixed = L.build("robust,exo_pair", label_smoothing=0.1)
    a, _ = mixed(chosen_logratios=r_c, rejected_logratios=r_r)
    b = L.get("robust")(chosen_logratios=r_c, rejected_logratios=r_r, label_smoothing=0.1)[0] + L.get("exo_pair")(
        chosen_logratios=r_c, rejected_logratios=r_r, label_smoothing=0.1)[0]  # fmt: skip
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_loss_name_lists_available():
    with pytest.raises(ConfigError, match="unknown loss 'dpo_typo'") as err:
        L.get("dpo_typo")
    assert all(name in str(err.value) for name in L.available())
    with pytest.raises(ConfigError, match="available: .*sigmoid"):
        L.build("sigmoid:1,sigmod:0.5")


def test_chosen_rejected_batch_mismatch():
    with pytest.raises(
        VisalignError, match=r"batch sizes differ \(chosen_logratios has 3, rejected_logratios has 4\)"
    ):
        L.get("sigmoid")(chosen_logratios=torch.zeros(3), rejected_logratios=torch.zeros(4))
    with pytest.raises(VisalignError, match="must have shape \\[B\\]"):
        L.get("sigmoid")(chosen_logratios=torch.zeros(3, 1), rejected_logratios=torch.zeros(3, 1))
    with pytest.raises(VisalignError, match="batch sizes differ"):
        L.get("mapo")(chosen_errors=torch.zeros(2), rejected_errors=torch.zeros(3))
    with pytest.raises(VisalignError, match="shape \\[B, K\\]"):
        L.get("lipo_lambda")(logratios=torch.zeros(4), scores=torch.zeros(4))


@pytest.mark.parametrize("spec, params, message", [
    ("robust", {"label_smoothing": 0.5}, "label_smoothing must lie in \\[0, 0.5\\)"),
    ("robust", {"label_smoothing": -0.1}, "label_smoothing must lie in \\[0, 0.5\\)"),
    ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing must lie in \\(0, 1\\); the EXO paper recommends 1e-3"),
    ("sigmoid", {"beta": 0.0}, "beta must be a positive number"),
    ("ipo", {"beta": -1.0}, "beta must be a positive number"),
    ("sigmoid", {"f_divergence_type": "chi2"}, "f_divergence_type must be one of"),
    ("discopop", {"discopop_tau": 0.0}, "discopop_tau must be > 0"),
    ("kto", {"undesirable_weight": 0.0}, "undesirable_weight must be > 0"),
    ("sigmoid", {"label_smoothing": 0.1}, "no loss in \\['sigmoid'\\] takes parameter"),
    ("sigmoid,kto", {}, "cannot be summed"),
    ("sigmoid:-1", {}, "weight must be a finite number >= 0"),
    ("sigmoid:abc", {}, "weight 'abc' is not a number"),
    ("sigmoid,sigmoid", {}, "appears twice"),
    ("", {}, "empty loss specification"),
])  # fmt: skip
def test_bad_configuration(spec, params, message):
    with pytest.raises(ConfigError, match=message):
        L.build(spec, **params)


def test_bad_parameters_also_fail_on_direct_calls():
    r = torch.zeros(2)
    with pytest.raises(ConfigError, match="label_smoothing must lie in \\[0, 0.5\\)"):
        L.get("robust")(chosen_logratios=r, rejected_logratios=r, label_smoothing=0.7)
    with pytest.raises(ConfigError, match="label_smoothing must lie in \\(0, 1\\)"):
        L.get("exo_pair")(chosen_logratios=r, rejected_logratios=r, label_smoothing=0.0)


def test_bad_tensors():
    r, n = torch.zeros(3), torch.tensor([2, 0, 1])
    with pytest.raises(VisalignError, match="chosen_lengths\\[1\\] is 0.*empty completion"):
        L.get("sigmoid_norm")(chosen_logratios=r, rejected_logratios=r, chosen_lengths=n, rejected_lengths=n + 1)
    with pytest.raises(VisalignError, match="preference_probs must lie in \\[0, 1\\]"):
        L.get("soft")(chosen_logratios=r, rejected_logratios=r, preference_probs=torch.tensor([0.5, 1.5, 0.0]))
    with pytest.raises(VisalignError, match="desirable must be a bool tensor"):
        L.get("kto")(logratios=r, desirable=torch.tensor([1, 0, 1]), kl_logratios=r)
    with pytest.raises(VisalignError, match="needs input\\(s\\) \\['chosen_lengths'\\]"):
        L.build("sigmoid,sft")(chosen_logratios=r, rejected_logratios=r, chosen_logps=r)
    with pytest.raises(VisalignError, match="unknown loss input"):
        L.build("sigmoid")(chosen_logratios=r, rejected_logratios=r, chosen_logratio=r)
    with pytest.raises(VisalignError, match="empty batch"):
        L.get("sigmoid")(chosen_logratios=torch.zeros(0), rejected_logratios=torch.zeros(0))
